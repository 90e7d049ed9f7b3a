"""An engine's compiled programs: lowered from abstract shapes, compiled ahead or on demand
(``compiling.Programs``), and called.

Every program has a key and a ``lower()`` that traces and lowers it from its arguments' shapes:
``('round', phase, cohort_size)`` (a streamed cohort's: also its padded data shape), the
personalised evaluation ``('personal', phase, eval_batch, eval_clients)`` and the global one
``('global', phase, eval_batch, test shape)``. Every input and output has a fixed sharding
(states, round index, cohort ids and data replicated, but a streamed cohort's states and data
split over the client devices; the backbone by the engine's strategy), so
one executable serves every round of its phase. The backbone is always an argument, never a
closed-over constant (XLA would embed it in the program).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedms_jax.compiling import abstract
from fedms_jax.federated import evaluation
from fedms_jax.federated.placement import replicated
from fedms_jax.federated.types import Phase

PyTree = Any


def lower_round(engine, phase: Phase, server: PyTree, clients: PyTree, cohort_size: int, data: PyTree = None):
    """The round program at ``phase`` for a cohort of ``cohort_size``, lowered (traced) from the
    states' shapes: ``server`` and ``clients`` may be arrays or ShapeDtypeStructs. ``data``: a
    streamed cohort's data (its shapes; then ``clients`` is the cohort's states, and both are
    split over the client devices: ``Engine.cohort_sharding``), or None for the engine's data."""
    rep = replicated(engine.mesh)
    streamed = data is not None
    split = engine.cohort_sharding if streamed else rep
    index = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
    # DP with a secret: its key data are the last argument (a value is never compiled in).
    secret = () if engine.noise_key is None else (
        jax.ShapeDtypeStruct(engine.noise_key.shape, engine.noise_key.dtype, sharding=rep),)
    if engine.versions:  # FedBuff: each client's server version and staleness weight
        secret = (index((cohort_size,)), jax.ShapeDtypeStruct((cohort_size,), jnp.float32, sharding=rep)) + secret
    return engine.round_fn(phase, streamed).lower(
        abstract(server, rep), abstract(clients, split), index(()), index((cohort_size,)), index((cohort_size,)),
        abstract(engine.backbone),
        abstract(data, split) if streamed else abstract(engine.data), *secret)


def lowering(engine, kind: str, phase: Phase, *args) -> tuple[tuple, Callable]:
    """(key, lower) of a program: ``lower()`` traces and lowers it from ``args``' shapes
    (``compile_ahead`` says what ``args`` are for each kind)."""
    rep = replicated(engine.mesh)
    if kind == "round":
        server, clients, cohort_size, *data = args
        if not data or data[0] is None:
            return ("round", phase, cohort_size), lambda: lower_round(engine, phase, server, clients, cohort_size)
        # A streamed cohort's program: one per padded size (bucket).
        key = ("round", phase, cohort_size, "streamed", tuple(data[0].images.shape))
        return key, lambda: lower_round(engine, phase, server, clients, cohort_size, data[0])
    if kind == "personal":
        server, clients, test = args
        key = ("personal", phase, engine.eval_batch, engine.eval_clients)
        return key, lambda: evaluation.personal_program(engine, phase).lower(
            *(abstract(x, rep) for x in (server, clients)), abstract(engine.backbone), abstract(test, rep))
    if kind == "global":
        server, images, labels = args
        key = ("global", phase, engine.eval_batch, tuple(images.shape))
        return key, lambda: evaluation.global_program(engine, phase).lower(
            abstract(server, rep), abstract(engine.backbone), *(abstract(x, rep) for x in (images, labels)))
    raise ValueError(f"unknown program kind {kind!r}")


def compile_ahead(engine, programs: list[tuple]) -> None:
    """Starts compiling ``programs`` in the engine's background threads, in order: each is
    ``('round', phase, server, clients, cohort_size[, data])``, ``('personal', phase, server,
    clients, test)`` or ``('global', phase, server, images, labels)``, with the arguments'
    arrays or ShapeDtypeStructs (their shapes are taken now: the arrays may be donated)."""
    if not engine.placement.jitted:
        return
    for kind, phase, *args in programs:
        args = [a if isinstance(a, int) else abstract(a) for a in args]
        key, lower = lowering(engine, kind, phase, *args)
        engine.executables.submit(key, lower)


def call(engine, kind: str, phase: Phase, *args) -> PyTree:
    """Runs evaluation program ``kind`` ('personal': args (server, clients, test); 'global':
    (server, images, labels)) with the engine's backbone."""
    if not engine.placement.jitted:
        fn = evaluation.personal_program(engine, phase) if kind == "personal" else evaluation.global_program(engine, phase)
        return fn(*_with_backbone(kind, args, engine.backbone))
    args = engine.place(args)
    key, lower = lowering(engine, kind, phase, *args)
    return engine.executables.get(key, lower)(*_with_backbone(kind, args, engine.backbone))


def _with_backbone(kind: str, args: tuple, backbone: PyTree) -> tuple:
    """An evaluation program's arguments: personal (server, clients, backbone, test); global
    (server, backbone, images, labels)."""
    if kind == "personal":
        server, clients, test = args
        return server, clients, backbone, test
    server, images, labels = args
    return server, backbone, images, labels

