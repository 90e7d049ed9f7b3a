"""Client side: local training of the active trainable tree with ``lax.scan`` over steps."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax.data.clients import sample_batch
from fedms_jax.data.preprocess import preprocess
from fedms_jax.models.expert import Expert
from fedms_jax.train import make_train_step

PyTree = Any


def make_local_train(
    expert: Expert,
    optimizer: optax.GradientTransformation,
    num_active: int,
    local_steps: int,
    batch_size: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> Callable[..., tuple[PyTree, jax.Array]]:
    """-> ``local_train(backbone, active, images, labels, count, key) -> (new_active, mean_loss)``.

    images uint8 [max_n, H, W, C], labels [max_n], count scalar: one client's padded data.
    Step s samples its batch with ``fold_in(key, s)``; the optimizer state starts fresh each
    round and covers only the active tree. Resizing and normalisation happen here, in the jit.
    """
    step = make_train_step(expert, optimizer, num_active)
    mean, std = stats
    s = expert.spec

    def local_train(backbone, active, images, labels, count, key):
        def body(carry, i):
            t, opt_state = carry
            k_batch, k_drop = jax.random.split(jax.random.fold_in(key, i))
            x, y = sample_batch(images, labels, count, k_batch, batch_size)
            x = preprocess(x, s.image_size, mean, std, s.num_channels)
            rng = k_drop if expert.lora.dropout > 0 else None
            t, opt_state, loss = step(backbone, t, opt_state, x, y, rng)
            return (t, opt_state), loss

        (new, _), losses = jax.lax.scan(body, (active, optimizer.init(active)), jnp.arange(local_steps))
        return new, losses.mean()

    return local_train
