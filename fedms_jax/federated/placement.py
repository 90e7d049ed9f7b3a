"""Placement: clients as a leading array axis, vmapped, sharded over a 'clients' mesh axis.

The one primitive is ``map_reduce``: run ``client_fn`` for every client of a cohort (a
broadcast value shared by all, a per-client pytree with a leading client axis), and return the
weighted mean of what the clients upload plus every client's other outputs. Backends:

  * ``vmap``: inside the caller's jit; per-client inputs are constrained to be sharded on the
    mesh's 'clients' axis, so XLA partitions the vmapped computation over every device. A cohort
    larger than fits at once runs in chunks (``lax.scan`` over vmapped chunks), summing the
    weighted uploads as it goes so memory holds one chunk.
  * ``sequential``: a Python loop over clients with the same ``client_fn`` (jitted once), for
    debugging and comparison. Same math, reduced on the host side in the same order.

We wrote this small module rather than use drjax: drjax fixes the number of clients of a
placement when the program is defined and offers neither chunking nor a sequential backend, and
the stateful-client gather/scatter lives outside its primitives anyway.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
CLIENTS = "clients"


class ClientOutput(NamedTuple):
    """What ``client_fn`` returns for one client.

    upload: the pytree averaged over the cohort (weighted by ``weight``).
    weight: scalar float (e.g. the client's example count; 0 excludes it).
    state: the client's new persistent state (any pytree; may be empty).
    metrics: per-client scalars (any pytree).
    """

    upload: PyTree
    weight: jax.Array
    state: PyTree
    metrics: PyTree


def make_mesh(devices: list | None = None) -> Mesh:
    """A ('clients', 'model') mesh whose 'clients' axis spans all (or the given) devices."""
    from fedms_jax.federated.sharding import make_mesh as make_2d

    return make_2d(devices=devices)


def clients_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _constrain(tree: PyTree, mesh: Mesh | None, spec: P) -> PyTree:
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, spec)
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def _weighted_sum(uploads: PyTree, weights: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(
        lambda u: jnp.tensordot(weights.astype(jnp.float32), u.astype(jnp.float32), axes=1).astype(u.dtype),
        uploads,
    )


def _mean(summed: PyTree, total: jax.Array) -> PyTree:
    """summed / total; a total weight of 0 (every client excluded) gives zeros."""
    return jax.tree_util.tree_map(lambda s: s / jnp.maximum(total, 1e-12).astype(s.dtype), summed)


def map_reduce(
    client_fn: Callable[[PyTree, PyTree], ClientOutput],
    broadcast: PyTree,
    per_client: PyTree,
    *,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
) -> tuple[PyTree, jax.Array, PyTree, PyTree]:
    """vmap backend (call inside jit). per_client leaves: [m, ...].

    Returns (weighted mean of uploads, total weight, stacked states [m, ...], stacked metrics).
    A total weight of 0 (every client excluded) gives a zero mean.
    """
    m = jax.tree_util.tree_leaves(per_client)[0].shape[0]
    chunk = m if not chunk_size else chunk_size
    if m % chunk:
        raise ValueError(f"cohort size {m} is not a multiple of placement.chunk_size {chunk}")
    n_dev = mesh.shape[CLIENTS] if mesh is not None else 1
    if chunk % n_dev:
        raise ValueError(
            f"clients per chunk ({chunk}) must be a multiple of the {n_dev} devices on the "
            f"'{CLIENTS}' mesh axis"
        )
    vmapped = jax.vmap(client_fn, in_axes=(None, 0))
    if chunk == m:
        out = vmapped(broadcast, _constrain(per_client, mesh, P(CLIENTS)))
        total = out.weight.sum()
        summed = _weighted_sum(out.upload, out.weight)
        states, metrics = out.state, out.metrics
    else:
        n = m // chunk
        chunks = jax.tree_util.tree_map(lambda x: x.reshape((n, chunk) + x.shape[1:]), per_client)
        up_shape = jax.eval_shape(
            lambda c: vmapped(broadcast, c).upload, jax.tree_util.tree_map(lambda x: x[0], chunks)
        )
        zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], s.dtype), up_shape)

        def body(carry, c):
            acc, total = carry
            out = vmapped(broadcast, _constrain(c, mesh, P(CLIENTS)))
            acc = jax.tree_util.tree_map(jnp.add, acc, _weighted_sum(out.upload, out.weight))
            return (acc, total + out.weight.sum()), (out.state, out.metrics)

        (summed, total), (states, metrics) = jax.lax.scan(body, (zero, jnp.zeros((), jnp.float32)), chunks)
        unchunk = lambda x: x.reshape((m,) + x.shape[2:])
        states = jax.tree_util.tree_map(unchunk, states)
        metrics = jax.tree_util.tree_map(unchunk, metrics)
    return _mean(summed, total), total, states, metrics


def map_reduce_sequential(
    client_fn: Callable[[PyTree, PyTree], ClientOutput],
    broadcast: PyTree,
    per_client: PyTree,
) -> tuple[PyTree, jax.Array, PyTree, PyTree]:
    """The sequential backend: one jitted client at a time, same results as ``map_reduce``."""
    m = jax.tree_util.tree_leaves(per_client)[0].shape[0]
    fn = _jitted_client(client_fn)
    outs = [fn(broadcast, jax.tree_util.tree_map(lambda x: x[i], per_client)) for i in range(m)]
    stack = lambda *xs: jnp.stack(xs)
    weights = jnp.stack([o.weight for o in outs]).astype(jnp.float32)
    uploads = jax.tree_util.tree_map(stack, *[o.upload for o in outs])
    total = weights.sum()
    mean = _mean(_weighted_sum(uploads, weights), total)
    states = jax.tree_util.tree_map(stack, *[o.state for o in outs])
    metrics = jax.tree_util.tree_map(stack, *[o.metrics for o in outs])
    return mean, total, states, metrics


_JIT_CACHE: dict[Any, Callable] = {}


def _jitted_client(client_fn: Callable) -> Callable:
    if client_fn not in _JIT_CACHE:
        _JIT_CACHE[client_fn] = jax.jit(client_fn)
    return _JIT_CACHE[client_fn]
