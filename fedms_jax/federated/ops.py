"""Pure helpers the engine and the algorithms share: masked means, cross-entropy, the default
featurizer, tree arithmetic, optimizer states per unit. No state, no engine, no algorithm."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedms_jax.federated.protocol import Features
from fedms_jax.federated.types import Phase, split_units

PyTree = Any


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of per-example ``values`` [B] over ``mask`` [B] (all of them when mask is None)."""
    if mask is None:
        return values.mean()
    return jnp.sum(values * mask) / jnp.maximum(mask.sum(), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over the real examples. logits [B, C] float, labels [B] int,
    mask [B] (1 = real example; None: all)."""
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels), mask)


def delta(new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, new, old)


def stack(tree: PyTree, n: int) -> PyTree:
    """n copies of ``tree`` along a new leading (client) axis."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def init_opt_states(optimizer: optax.GradientTransformation, params: PyTree, carried: PyTree | None = None) -> dict:
    """{entry: {unit: optimizer state}} for ``params`` ({entry: tree}); units present in
    ``carried`` (persistent states of the same form) take those."""
    states = {e: {u: optimizer.init(p) for u, p in split_units(t).items()} for e, t in params.items()}
    for e, units in (carried or {}).items():
        if e in states:
            states[e] = {u: units.get(u, s) for u, s in states[e].items()}
    return states


def featurize_branch(expert, backbone: PyTree, images: jax.Array, phase: Phase) -> Features:
    """The default featurizer: the SAL trunk's branch point (blocks below the active ones are
    frozen and LoRA-free)."""
    return Features(expert.trunk(backbone, images, phase.num_active))
