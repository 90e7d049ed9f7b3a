"""Placement backends: how a function of one client runs over a leading client axis.

A backend has two operations, used by training and evaluation alike:

  * ``map_reduce(fn, broadcast, per_client)``: ``fn(broadcast, client) -> ClientOutput`` for
    every client; returns the per-unit weighted mean of the uploads (or, ``mean=False``, the
    weighted sum: budget-aware rounds add the sums of several client groups), the per-unit total
    weights, and every client's new state and metrics (stacked);
  * ``map(fn, broadcast, per_client)``: ``fn(broadcast, client) -> pytree`` for every client,
    stacked (evaluation).

``Vmap`` runs inside the caller's jit: ``vmap(spmd_axis_name=axes)`` with per-client inputs
*and* outputs constrained to the mesh axes ``axes`` (the DrJAX pattern; 'clients', or
('clients', 'model') when the backbone's strategy computes data-parallel over the whole mesh:
``sharding.client_axes``), so XLA partitions the clients over those devices. Cohorts larger
than fit at once run in chunks (``lax.scan`` over vmapped chunks), summing weighted uploads as
they go so memory holds one chunk; a chunk takes the same share of clients from every device's
block (``_chunked``), so clients split over the devices stay where they are. ``Sequential``
is a Python loop over clients with ``fn`` jitted once: the same math, for debugging and
comparison. Algorithms never see which backend runs them.

We wrote this module rather than use drjax: drjax fixes the number of clients of a placement
when the program is defined and offers neither chunking nor a sequential backend, and the
stateful-client gather/scatter lives outside its primitives anyway.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedms_jax.choices import BACKENDS as BACKEND_CHOICES
from fedms_jax.federated import sharding
from fedms_jax.federated.aggregate import weighted_mean, weighted_sum
from fedms_jax.federated.types import ClientOutput

PyTree = Any
CLIENTS = "clients"
ClientFn = Callable[[PyTree, PyTree], ClientOutput]


def clients_sharding(mesh: Mesh, axes: tuple[str, ...] = (CLIENTS,)) -> NamedSharding:
    """The leading (client) axis split over the mesh axes ``axes``."""
    return NamedSharding(mesh, P(tuple(axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_clients_of(per_client: PyTree) -> int:
    return jax.tree_util.tree_leaves(per_client)[0].shape[0]


def _pad_clients(tree: PyTree, m: int, to: int) -> PyTree:
    """Pads the leading axis from m to ``to`` with zeros (a zero client: no examples)."""
    if to == m:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, jnp.zeros((to - m,) + x.shape[1:], x.dtype)]), tree)


def _chunked(x: jax.Array, n: int, d: int) -> jax.Array:
    """[m, ...] -> [n, m / n, ...] chunks, each taking m / n / d consecutive clients from every
    one of the ``d`` contiguous blocks the client devices hold (clients split over them): chunk
    j holds rows i * m / d + j * m / (n d) + r of device i, so no client moves between devices."""
    m, rest = x.shape[0], x.shape[1:]
    return x.reshape((d, n, m // (n * d)) + rest).swapaxes(0, 1).reshape((n, m // n) + rest)


def _unchunked(x: jax.Array, d: int) -> jax.Array:
    """The inverse of ``_chunked``: [n, c, ...] -> [n * c, ...] in the original client order."""
    n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
    return x.reshape((n, d, c // d) + rest).swapaxes(0, 1).reshape((n * c,) + rest)


class Vmap:
    """Clients vmapped (and chunked) inside the caller's jit, sharded over ``mesh``'s ``axes``.

    chunk_size: clients per vmapped chunk in ``map_reduce`` (None: the whole cohort at once);
    must be a multiple of the devices the client axis spans (``num_devices``).
    axes: the mesh axes the clients are split over (``sharding.client_axes(strategy)``; default
    'clients' only).
    """

    jitted = True  # runs inside the caller's jit

    def __init__(self, mesh: Mesh | None = None, chunk_size: int | None = None,
                 axes: tuple[str, ...] = (CLIENTS,)) -> None:
        self.mesh = mesh
        self.chunk_size = chunk_size or None
        self.axes = tuple(axes)

    @property
    def num_devices(self) -> int:
        """The devices the client axis spans: the product of the mesh's ``axes``."""
        if self.mesh is None:
            return 1
        n = 1
        for axis in self.axes:
            n *= self.mesh.shape[axis]
        return n

    def constrain(self, tree: PyTree) -> PyTree:
        """Splits the leading (client) axis of every leaf over the mesh's ``axes``."""
        if self.mesh is None:
            return tree
        split = clients_sharding(self.mesh, self.axes)
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, split), tree)

    def _vmapped(self, fn: Callable) -> Callable:
        axis = None if self.mesh is None else self.axes[0] if len(self.axes) == 1 else self.axes
        inner = jax.vmap(fn, in_axes=(None, 0), spmd_axis_name=axis)
        return lambda broadcast, chunk: self.constrain(inner(broadcast, self.constrain(chunk)))

    def _check_chunk(self, chunk: int, m: int) -> None:
        if m % chunk:
            raise ValueError(f"cohort size {m} is not a multiple of placement.chunk_size {chunk}")
        if chunk % self.num_devices:
            raise ValueError(
                f"clients per chunk ({chunk}) must be a multiple of the {self.num_devices} devices on "
                f"the mesh axes {self.axes}"
            )

    def map_reduce(self, fn: ClientFn, broadcast: PyTree, per_client: PyTree, *,
                   chunk_size: int | None = None, mean: bool = True):
        """per_client leaves [m, ...] -> (mean upload {unit: ..}, totals {unit: []}, states [m, ..],
        metrics [m, ..]). ``chunk_size`` overrides the backend's; ``mean=False`` returns the
        weighted sum of the uploads instead of their mean."""
        m = num_clients_of(per_client)
        chunk = chunk_size or self.chunk_size or m
        self._check_chunk(chunk, m)
        vmapped = self._vmapped(fn)
        reduce = weighted_mean if mean else (lambda summed, totals: summed)
        if chunk == m:
            out = vmapped(broadcast, per_client)
            totals = jax.tree_util.tree_map(jnp.sum, out.weight)
            return reduce(weighted_sum(out.upload, out.weight), totals), totals, out.state, out.metrics
        n, d = m // chunk, self.num_devices
        chunks = jax.tree_util.tree_map(lambda x: _chunked(x, n, d), per_client)
        shape = jax.eval_shape(vmapped, broadcast, jax.tree_util.tree_map(lambda x: x[0], chunks))
        zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], s.dtype), tree)

        def body(carry, c):
            acc, totals = carry
            out = vmapped(broadcast, c)
            acc = jax.tree_util.tree_map(jnp.add, acc, weighted_sum(out.upload, out.weight))
            totals = jax.tree_util.tree_map(lambda t, w: t + w.sum(), totals, out.weight)
            return (acc, totals), (out.state, out.metrics)

        (summed, totals), (states, metrics) = jax.lax.scan(body, (zeros(shape.upload), zeros(shape.weight)), chunks)
        states, metrics = self.constrain(jax.tree_util.tree_map(lambda x: _unchunked(x, d), (states, metrics)))
        return reduce(summed, totals), totals, states, metrics

    def map(self, fn: Callable, broadcast: PyTree, per_client: PyTree, *, chunk_size: int | None = None) -> PyTree:
        """fn over every client, ``chunk_size`` clients at a time (rounded up to the devices;
        the client axis is padded with zero clients and the padding dropped again)."""
        m = num_clients_of(per_client)
        d = self.num_devices
        chunk = -(-min(chunk_size or m, m) // d) * d
        n = -(-m // chunk)
        padded = _pad_clients(per_client, m, n * chunk)
        vmapped = self._vmapped(fn)
        if n == 1:
            out = vmapped(broadcast, padded)
        else:
            chunks = jax.tree_util.tree_map(lambda x: x.reshape((n, chunk) + x.shape[1:]), padded)
            out = jax.lax.map(lambda c: vmapped(broadcast, c), chunks)
            out = jax.tree_util.tree_map(lambda x: x.reshape((n * chunk,) + x.shape[2:]), out)
        return jax.tree_util.tree_map(lambda x: x[:m], out)


class Sequential:
    """One jitted client at a time from Python; the same results as ``Vmap``. ``mesh`` is where
    the states live (the clients run one at a time, wherever JAX puts them)."""

    jitted = False  # drives its own jitted per-client programs
    num_devices = 1

    def __init__(self, mesh: Mesh | None = None) -> None:
        self.mesh = mesh
        self._jit: dict[Callable, Callable] = {}  # per instance: no program outlives its engine

    def _jitted(self, fn: Callable) -> Callable:
        if fn not in self._jit:
            self._jit[fn] = jax.jit(fn)
        return self._jit[fn]

    def _each(self, fn: Callable, broadcast: PyTree, per_client: PyTree) -> list:
        f = self._jitted(fn)
        return [f(broadcast, jax.tree_util.tree_map(lambda x: x[i], per_client)) for i in range(num_clients_of(per_client))]

    def map_reduce(self, fn: ClientFn, broadcast: PyTree, per_client: PyTree, *,
                   chunk_size: int | None = None, mean: bool = True):
        outs = self._each(fn, broadcast, per_client)
        stack = lambda *xs: jnp.stack(xs)
        weights = jax.tree_util.tree_map(lambda *ws: jnp.stack(ws).astype(jnp.float32), *[o.weight for o in outs])
        uploads = jax.tree_util.tree_map(stack, *[o.upload for o in outs])
        totals = jax.tree_util.tree_map(jnp.sum, weights)
        states = jax.tree_util.tree_map(stack, *[o.state for o in outs])
        metrics = jax.tree_util.tree_map(stack, *[o.metrics for o in outs])
        summed = weighted_sum(uploads, weights)
        return (weighted_mean(summed, totals) if mean else summed), totals, states, metrics

    def map(self, fn: Callable, broadcast: PyTree, per_client: PyTree, *, chunk_size: int | None = None) -> PyTree:
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *self._each(fn, broadcast, per_client))


Placement = Vmap | Sequential


# placement.backend -> (mesh, chunk_size, strategy) -> backend
BACKENDS = {
    "vmap": lambda mesh, chunk_size, strategy: Vmap(mesh, chunk_size, sharding.client_axes(strategy)),
    "sequential": lambda mesh, chunk_size, strategy: Sequential(mesh),
}
assert tuple(BACKENDS) == BACKEND_CHOICES, "fedms_jax.choices.BACKENDS and the registry disagree"


def make_placement(backend: str, mesh: Mesh | None, chunk_size: int | None = None,
                   strategy: str = "replicated") -> Placement:
    """The backend; ``Vmap`` splits the clients over ``sharding.client_axes(strategy)``."""
    if backend not in BACKENDS:
        raise ValueError(f"placement.backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")
    return BACKENDS[backend](mesh, chunk_size, strategy)


def put_tree(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Device arrays re-placed by ``sharding``; host arrays made into arrays placed so, each
    process supplying its devices' slices (``Engine.place``, ``Engine.place_cohort``)."""
    def put(x):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)
