"""Local training primitives: the SAL loss and one LoRA gradient step.

Only the *active* trainable tree ``{'lora': top-k blocks, 'head': ...}`` is differentiated and
updated, so inactive blocks cost no gradient compute and no optimizer state: the optimizer is
initialised on the active tree, whose shape depends on the static k.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from fedms_jax.models.expert import Expert

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy. logits [B, C] float, labels [B] int, mask [B] (1 = counts)."""
    chex.assert_rank(logits, 2)
    chex.assert_rank(labels, 1)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def expert_loss(
    expert: Expert,
    num_active: int,
    backbone: PyTree,
    trainable: PyTree,
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array | None = None,
    frozen_head: PyTree | None = None,
) -> tuple[jax.Array, jax.Array]:
    """-> (loss, logits [B, C]). ``trainable['lora']`` needs only the top ``num_active`` blocks."""
    logits = expert.logits(backbone, trainable, images, num_active, frozen_head=frozen_head, rng=rng)
    return cross_entropy(logits, labels), logits


def make_train_step(
    expert: Expert, optimizer: optax.GradientTransformation, num_active: int
) -> Callable[..., tuple[PyTree, PyTree, jax.Array]]:
    """One local gradient step on the active trainable tree (un-jitted; callers jit or scan it).

    Returns ``step(backbone, trainable, opt_state, images, labels, rng, frozen_head=None)
    -> (trainable, opt_state, loss)``, where ``trainable`` holds only the active blocks' LoRA and
    ``opt_state = optimizer.init(trainable)``.
    """

    def step(backbone, trainable, opt_state, images, labels, rng, frozen_head=None):
        grad_fn = jax.value_and_grad(
            lambda t: expert_loss(expert, num_active, backbone, t, images, labels, rng, frozen_head),
            has_aux=True,
        )
        (loss, _), grads = grad_fn(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def compiled_step_flops(
    expert: Expert,
    optimizer: optax.GradientTransformation,
    num_active: int,
    backbone: PyTree,
    trainable: PyTree,
    batch_size: int,
) -> float:
    """FLOPs of one compiled LoRA gradient step at SAL level k, from XLA's cost analysis.

    ``trainable`` must already hold only the active blocks (``sal.active_lora``).
    """
    s = expert.spec
    images = jax.ShapeDtypeStruct((batch_size, s.image_size, s.image_size, s.num_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    step = make_train_step(expert, optimizer, num_active)
    compiled = (
        jax.jit(step)
        .lower(backbone, trainable, opt_state, images, labels, jax.random.key(0))
        .compile()
    )
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
        cost = cost[0]
    return float(cost["flops"])
