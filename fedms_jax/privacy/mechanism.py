"""DP-FedAvg's JAX side: clipping a client's whole update and the server's Gaussian noise
(``fedms_jax.privacy`` states the mechanism and its assumptions)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def _check_floating(leaves: Sequence[Any], fn: str) -> None:
    for i, leaf in enumerate(leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"{fn}: leaf {i} has dtype {jnp.result_type(leaf)}; "
                            "only floating-point leaves can be clipped or noised")


def clip_by_global_norm(tree: PyTree, clip: float | jax.Array) -> tuple[PyTree, jax.Array]:
    """Scales the whole pytree by ``min(1, clip / ||tree||)``, all leaves jointly.

    Args:
      tree: pytree of floating arrays of any shapes (e.g. one client's model update).
      clip: the L2 bound ``C > 0``; a Python number or a (possibly traced) float scalar.

    Returns:
      ``(clipped, norm)``: ``clipped`` has ``tree``'s structure, shapes and dtypes; ``norm`` is the
      float32 scalar global L2 norm of ``tree`` *before* clipping. The norm is accumulated in
      float32; the scaling is done in ``promote(dtype, float32)`` and cast back. A tree whose norm
      is ``<= clip`` is returned bit for bit unchanged. Pure JAX: works under ``jit`` and ``vmap``
      (vmap over a batch of trees clips each one independently).
    """
    if isinstance(clip, numbers.Real) and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip_by_global_norm: clip must be a finite number > 0, got {clip!r}")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    _check_floating(leaves, "clip_by_global_norm")
    if not leaves:
        return tree, jnp.zeros((), jnp.float32)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))
    clip = jnp.asarray(clip, jnp.float32)
    over = norm > clip
    # The inner where keeps the unused branch finite (norm may be 0), so gradients stay clean.
    scale = jnp.where(over, clip / jnp.where(over, norm, 1.0), 1.0)

    def scaled(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        wide = jnp.promote_types(x.dtype, jnp.float32)
        # Select instead of multiplying by 1.0: the unclipped case must return the very bits (a
        # multiply could flush denormals or round a low-precision cast).
        return jnp.where(over, (x.astype(wide) * scale.astype(wide)).astype(x.dtype), x)

    return jax.tree_util.tree_unflatten(treedef, [scaled(x) for x in leaves]), norm


def gaussian_noise_like(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """Independent ``N(0, stddev^2)`` noise for every coordinate of every leaf.

    Args:
      tree: pytree of floating arrays (or ``jax.ShapeDtypeStruct``s); only shapes and dtypes are
        read.
      key: a PRNG key (typed or raw uint32). Leaf ``i`` (in ``jax.tree_util.tree_leaves`` order)
        uses ``jax.random.fold_in(key, i)``, so every process that holds the same key and the same
        tree structure draws the same noise, and no two leaves share a stream.
      stddev: the noise standard deviation (``noise_multiplier * clip`` for DP-FedAvg); a Python
        number ``>= 0`` or a (possibly traced) float scalar.

    Returns:
      A pytree with ``tree``'s structure, shapes and dtypes. Samples are drawn in
      ``promote(dtype, float32)`` and cast to the leaf's dtype. ``stddev == 0`` gives (signed)
      zeros, so adding the result leaves a sum bit for bit unchanged.
    """
    if isinstance(stddev, numbers.Real) and not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"gaussian_noise_like: stddev must be a finite number >= 0, got {stddev!r}")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    _check_floating(leaves, "gaussian_noise_like")
    std = jnp.asarray(stddev, jnp.float32)
    out = []
    for i, leaf in enumerate(leaves):
        dtype = jnp.result_type(leaf)
        wide = jnp.promote_types(dtype, jnp.float32)
        draw = jax.random.normal(jax.random.fold_in(key, i), jnp.shape(leaf), wide)
        out.append((draw * std.astype(wide)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
