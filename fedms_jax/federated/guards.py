"""What wraps every client's update before its outputs are aggregated: the guard (a client
that produced NaN/Inf or had no examples is excluded) and DP-FedAvg's client side (the whole
upload clipped, every unit weighted 1)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedms_jax.federated.types import ClientOutput, tree_where
from fedms_jax.privacy.mechanism import clip_by_global_norm

PyTree = Any
EXCLUDED = "excluded"  # the per-client metric: 1 for a client the guard excluded
SERVER_FINITE = "server_finite"  # the round's metric: 1 if every float of the new server state is finite


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every float in ``tree`` is finite: one reduction over the leaves concatenated.
    (Per-leaf flags ``and``-ed together compile to a chain that XLA fused into every ``where``
    reading the result: 58 copies of a 207-long chain made up a quarter of a stage-1 round
    program and more than half its compile time.)"""
    floats = [x.ravel().astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(jnp.concatenate(floats)).all() if floats else jnp.ones((), bool)


def guard(update: Callable) -> Callable:
    """A client whose upload, new state or metrics hold NaN/Inf, that has no examples, or that
    is not ``present`` (dropped out, late, unavailable: ``fedms_jax.system``) gets
    weight 0 in every unit and a zero upload (so it cannot poison a mean), keeps its old state,
    and is counted in the round's ``excluded_clients``."""

    def guarded(broadcast, client):
        out = update(broadcast, client)
        ok = (client["count"] > 0) & all_finite((out.upload, out.state, out.metrics))
        if "present" in client:  # a client that takes no part this round (``system``): as if excluded
            ok = ok & client["present"]
        return ClientOutput(
            upload=jax.tree_util.tree_map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out.upload),
            weight=jax.tree_util.tree_map(lambda w: jnp.where(ok, w, 0.0), out.weight),
            state=tree_where(ok, out.state, client["state"]),
            metrics={
                **jax.tree_util.tree_map(lambda m: jnp.where(ok, m, 0.0), out.metrics),
                EXCLUDED: 1.0 - ok.astype(jnp.float32),
            },
        )

    return guarded


def privatized(update: Callable, clip: float) -> Callable:
    """DP-FedAvg's client side (``fedms_jax.privacy``; after ``guard``): the whole upload (every
    unit together) scaled to L2 norm at most ``clip``, and every unit weighted 1, so the server
    divides each unit's noisy sum by the number of clients asked to train it (public; an
    excluded client counts, with its zero upload) instead of by their example counts, which
    are private. Adds the metrics ``dp_update_norm`` (before clipping) and ``dp_clipped``."""

    def private(broadcast, client):
        out = update(broadcast, client)
        upload, norm = clip_by_global_norm(out.upload, clip)
        return ClientOutput(
            upload=upload,
            weight=jax.tree_util.tree_map(jnp.ones_like, out.weight),
            state=out.state,
            metrics={**out.metrics, "dp_update_norm": norm, "dp_clipped": (norm > clip).astype(jnp.float32)},
        )

    return private
