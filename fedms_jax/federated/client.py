"""Client side: local training of any parameter tree with ``lax.scan`` over steps."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax.data.clients import sample_indices

PyTree = Any
# loss_fn(params, ctx, backbone, images float [B,H,W,C], labels [B], rng | None) -> (loss, aux)
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array, jax.Array, Any], tuple[jax.Array, dict]]


def caches_frozen(max_examples: int, local_steps: int, batch_size: int) -> bool:
    """Whether running the frozen part once over a client's ``max_examples`` padded examples is
    no more work than running it on every step's batch."""
    return max_examples <= local_steps * batch_size


def make_local_train(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    local_steps: int,
    batch_size: int,
    prep: Callable[[jax.Array], jax.Array],
    use_rng: bool = False,
    precompute: Callable[[PyTree, PyTree, jax.Array], PyTree] | None = None,
) -> Callable[..., tuple[PyTree, jax.Array, dict]]:
    """-> ``local_train(backbone, params, ctx, images, labels, count, key) -> (params, loss, aux)``.

    ``params`` is what the client differentiates and updates (e.g. the active LoRA units and a
    head); ``ctx`` holds the other inputs of the loss that stay fixed (anchors, frozen experts).
    images uint8 [max_n, H, W, C], labels [max_n], count scalar: one client's padded data.
    Step s samples its batch with ``fold_in(key, s)`` and ``prep`` (resize + normalise) runs in
    the jit. The optimizer state starts fresh each round and covers only ``params``. Returns the
    trained params and the mean over steps of the loss and of each ``aux`` scalar.

    ``precompute(backbone, ctx, images float [n, ...]) -> per-example pytree [n, ...]``: the part
    of the loss that no step changes (the frozen SAL trunk; a frozen expert's logits). When the
    client holds no more examples than its steps would process (``max_n <= local_steps *
    batch_size``, a static fact), it runs once over all of them and each step gathers its batch
    from the result, which ``loss_fn`` then gets in place of images; otherwise every step runs it.
    """

    def local_train(backbone, params, ctx, images, labels, count, key):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        cached = precompute is not None and caches_frozen(images.shape[0], local_steps, batch_size)
        if cached:
            frozen = precompute(backbone, ctx, prep(images))

        def step(carry, i):
            params, opt_state = carry
            k_batch, k_drop = jax.random.split(jax.random.fold_in(key, i))
            idx = sample_indices(count, k_batch, batch_size)
            x = jax.tree_util.tree_map(lambda f: f[idx], frozen) if cached else prep(images[idx])
            (loss, aux), grads = grad_fn(params, ctx, backbone, x, labels[idx], k_drop if use_rng else None)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, aux)

        (params, _), (losses, aux) = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(local_steps))
        return params, losses.mean(), jax.tree_util.tree_map(jnp.mean, aux)

    return local_train
