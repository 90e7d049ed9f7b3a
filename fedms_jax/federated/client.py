"""Client side: one client's round (local training with ``lax.scan`` over steps) for any stage.

``client_update(stage, phase, settings)`` is the function every placement backend maps over a
cohort: ``(broadcast, client) -> ClientOutput``. It asks the stage for the local problem
(``client_init``), trains its params on ``stage.loss`` over ``Features`` (from
``stage.featurize``), and asks the stage what to upload and keep (``client_final``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax.federated.types import ClientOutput, Features, Phase, split_units

PyTree = Any


def sample_indices(count: jax.Array, key: jax.Array, batch_size: int) -> jax.Array:
    """[batch_size] int32 indices, uniformly with replacement from ``[0, count)``."""
    return jax.random.randint(key, (batch_size,), 0, jnp.maximum(count, 1))


def caches_frozen(max_examples: int, local_steps: int, batch_size: int) -> bool:
    """Whether running the frozen part once over a client's ``max_examples`` padded examples is
    no more work than running it on every step's batch."""
    return max_examples <= local_steps * batch_size


def uses_cache(settings, max_examples: int) -> bool:
    """Whether a client with ``max_examples`` padded examples featurizes once per round."""
    return settings.cache_frozen and caches_frozen(max_examples, settings.local_steps, settings.batch_size)


def local_train(
    stage, phase: Phase, settings, backbone: PyTree, params: PyTree, ctx: PyTree,
    images: jax.Array, labels: jax.Array, count: jax.Array, key: jax.Array,
) -> tuple[PyTree, jax.Array, dict]:
    """``settings.local_steps`` optimizer steps on ``stage.loss`` -> (params, mean loss, mean aux).

    ``params`` is what the client differentiates and updates; ``ctx`` the loss's fixed inputs.
    images uint8 [max_n, H, W, C], labels [max_n], count scalar: one client's padded data. Step s
    samples its batch with ``fold_in(key, s)``. The optimizer state starts fresh each round and
    covers only ``params``. When the client holds no more examples than its steps would process
    (a static fact, see ``uses_cache``), ``stage.featurize`` runs once over all of them and each
    step gathers its batch from the result; otherwise it runs on every step's batch.
    """
    optimizer = settings.client_optimizer
    prep = settings.prep
    grad_fn = jax.value_and_grad(lambda p, f, y, r: stage.loss(p, ctx, backbone, f, y, r, phase), has_aux=True)
    cached = uses_cache(settings, images.shape[0])
    if cached:
        frozen = stage.featurize(backbone, ctx, prep(images), phase)

    def step(carry, i):
        params, opt_state = carry
        k_batch, k_drop = jax.random.split(jax.random.fold_in(key, i))
        idx = sample_indices(count, k_batch, settings.batch_size)
        if cached:
            feats = jax.tree_util.tree_map(lambda f: f[idx], frozen)
        else:
            feats = stage.featurize(backbone, ctx, prep(images[idx]), phase)
        (loss, aux), grads = grad_fn(params, feats, labels[idx], k_drop if settings.use_rng else None)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, aux)

    (params, _), (losses, aux) = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(settings.local_steps))
    return params, losses.mean(), jax.tree_util.tree_map(jnp.mean, aux)


def client_update(stage, phase: Phase, settings) -> Callable[[PyTree, PyTree], ClientOutput]:
    """One client's round at ``phase``: ``(backbone, down), client -> ClientOutput``.

    client: {'images', 'labels', 'count', 'key', 'state'} of one client. Every unit the client
    uploads is weighted by its example count.
    """

    def update(broadcast, client):
        backbone, down = broadcast
        params, ctx = stage.client_init(down, client["state"], phase)
        new, loss, aux = local_train(
            stage, phase, settings, backbone, params, ctx,
            client["images"], client["labels"], client["count"], client["key"],
        )
        upload, state = stage.client_final(down, client["state"], params, new, phase)
        upload = split_units(upload)
        count = client["count"].astype(jnp.float32)
        return ClientOutput(upload, {name: count for name in upload}, state, {"loss": loss, **aux})

    return update


def featurize_branch(expert, backbone: PyTree, images: jax.Array, phase: Phase) -> Features:
    """The default featurizer: the SAL trunk's branch point (blocks below the active ones are
    frozen and LoRA-free)."""
    return Features(expert.trunk(backbone, images, phase.num_active))
