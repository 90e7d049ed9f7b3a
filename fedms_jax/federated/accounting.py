"""What a round costs one client: bytes sent each way, parameters trained, FLOPs.

Bytes and parameter counts come from abstract shapes (``jax.eval_shape``: no compile). FLOPs
come from XLA's cost analysis of the compiled client, which counts a ``scan`` body once: the
client is the once-per-round work (``featurize`` over all examples, when the client caches it)
plus one step, so its training FLOPs are ``once + local_steps * (compiled - once)``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedms_jax.federated.client import client_update, uses_cache
from fedms_jax.federated.types import ClientStates, Phase, ServerState, tree_bytes

PyTree = Any


def _one_client(engine, server: ServerState, clients: ClientStates, phase: Phase):
    """Abstract shapes of one client's round inputs at ``phase``: (stage, down, client)."""
    cohort = jax.eval_shape(
        lambda: engine.gather(engine.data, clients, jnp.zeros((1,), jnp.int32), jnp.zeros((), jnp.int32))
    )
    one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), cohort)
    stage = engine.algorithm.stage(phase)
    down = jax.eval_shape(lambda s: stage.broadcast(s, phase), server)
    return stage, down, one


def bytes_per_client(engine, server: ServerState, clients: ClientStates, phase: Phase) -> tuple[int, int]:
    """(download, upload) bytes of one client in a round at ``phase``: the broadcast tree and
    the upload tree (for a frozen global expert the broadcast is an upper bound: a real client
    could cache it)."""
    stage, down, one = _one_client(engine, server, clients, phase)
    out = jax.eval_shape(client_update(stage, phase, engine.algorithm.settings), (engine.backbone, down), one)
    return tree_bytes(down), tree_bytes(out.upload)


def trainable_params(engine, server: ServerState, clients: ClientStates, phase: Phase) -> int:
    """How many parameters one client trains at ``phase`` (its local problem's params)."""
    stage, down, one = _one_client(engine, server, clients, phase)
    params, _ = jax.eval_shape(lambda d, st: stage.client_init(d, st, phase), down, one["state"])
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def _flops(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def client_flops(engine, server: ServerState, clients: ClientStates, phase: Phase) -> float:
    """FLOPs of one client's local training at ``phase`` (compiles the client: off the
    critical path, for benchmarks and comparisons)."""
    settings = engine.algorithm.settings
    stage, down, one = _one_client(engine, server, clients, phase)
    broadcast = (engine.backbone, down)
    total = _flops(jax.jit(client_update(stage, phase, settings)).lower(broadcast, one))
    once = 0.0
    if uses_cache(settings, one["images"].shape[0]):
        def featurize(backbone, down, client):
            _, ctx = stage.client_init(down, client["state"], phase)
            return stage.featurize(backbone, ctx, settings.prep(client["images"]), phase)

        once = _flops(jax.jit(featurize).lower(*broadcast, one))
    return once + settings.local_steps * (total - once)
