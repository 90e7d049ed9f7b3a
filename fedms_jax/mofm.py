"""MoFM -- the mixture of the global and the local expert, and the gate network that weighs them.

Our reading of FedMS (DESIGN.md section 1; the paper's full text is not available):

* the **gate adapter** is a residual bottleneck MLP on the backbone's [CLS] vector at the
  branch point (the input of the lowest active block): ``a = LN(h); a + W2 gelu(W1 a)``,
  d -> r -> d. It joins the server's aggregation every round. ``W2`` starts at zero, so the
  adapter starts as ``LN``.
* the **gate head** is a local linear layer d -> 2 (softmax); it starts at zero, i.e. at the
  even mixture 0.5 / 0.5, and never leaves its client.
* the **mixture** of the experts' class distributions,
  ``p(y|x) = w_g(x) softmax(z_global) + w_l(x) softmax(z_local)`` (``mode='probs'``, the
  default), or of their logits, ``softmax(w_g z_global + w_l z_local)`` (``mode='logits'``), or
  the local expert as a residual on the global one, ``softmax(z_global + w_l z_local)``
  (``mode='residual'``).
  Both return log-probabilities, so the loss is always ``-log p(y)``.

Gate weights are ``[..., 2]`` with index 0 = global expert, 1 = local expert.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fedms_jax.choices import MIX_MODES

PyTree = Any
GLOBAL, LOCAL = 0, 1


class GateAdapter(nn.Module):
    """[B, D] -> [B, D]: ``LN(h) + W2 gelu(W1 LN(h))`` with a rank-``rank`` bottleneck."""

    rank: int

    @nn.compact
    def __call__(self, cls: jax.Array) -> jax.Array:
        a = nn.LayerNorm(name="norm")(cls.astype(jnp.float32))
        h = nn.gelu(nn.Dense(self.rank, name="down")(a))
        return a + nn.Dense(cls.shape[-1], kernel_init=nn.initializers.zeros, name="up")(h)


class GateHead(nn.Module):
    """[B, D] -> gate weights [B, 2] (softmax; index 0 = global, 1 = local)."""

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        logits = nn.Dense(2, kernel_init=nn.initializers.zeros, name="dense")(features)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def init_gate(rng: jax.Array, dim: int, rank: int) -> tuple[PyTree, PyTree]:
    """-> (adapter params, head params) for a [CLS] vector of width ``dim``."""
    r_a, r_h = jax.random.split(rng)
    x = jnp.zeros((1, dim), jnp.float32)
    return GateAdapter(rank).init(r_a, x)["params"], GateHead().init(r_h, x)["params"]


def gate_weights(adapter: PyTree, head: PyTree, cls: jax.Array, rank: int) -> jax.Array:
    """cls [B, D] (the branch point's [CLS]) -> weights [B, 2] (global, local)."""
    chex.assert_rank(cls, 2)
    features = GateAdapter(rank).apply({"params": adapter}, cls)
    return GateHead().apply({"params": head}, features)


def fixed_weights(batch: int, local_weight: float) -> jax.Array:
    """The no-gate ablation: the same (1 - w, w) for every example, [B, 2]."""
    w = jnp.asarray([1.0 - local_weight, local_weight], jnp.float32)
    return jnp.broadcast_to(w, (batch, 2))


def mix(weights: jax.Array, z_global: jax.Array, z_local: jax.Array, mode: str = "probs") -> jax.Array:
    """The MoFM output as log-probabilities [B, C].

    weights [B, 2] (global, local), logits [B, C] each. ``probs`` mixes the two softmaxes
    (computed in log space: a weight of 0 removes that expert, up to e^-87); ``logits``
    mixes the logits before one softmax; ``residual`` adds the local expert's logits, scaled by
    its weight, to the global expert's: ``softmax(z_g + w_l z_l)`` (the local expert as a
    correction of the global one).
    """
    chex.assert_equal_shape((z_global, z_local))
    chex.assert_shape(weights, (z_global.shape[0], 2))
    zg, zl = z_global.astype(jnp.float32), z_local.astype(jnp.float32)
    if mode == "probs":
        # Clamped: a saturated softmax gives an exact 0, whose log's gradient would be NaN.
        log_w = jnp.log(jnp.maximum(weights, jnp.finfo(jnp.float32).tiny))
        return jnp.logaddexp(
            log_w[:, GLOBAL, None] + jax.nn.log_softmax(zg), log_w[:, LOCAL, None] + jax.nn.log_softmax(zl)
        )
    if mode == "logits":
        return jax.nn.log_softmax(weights[:, GLOBAL, None] * zg + weights[:, LOCAL, None] * zl)
    if mode == "residual":
        return jax.nn.log_softmax(zg + weights[:, LOCAL, None] * zl)
    raise ValueError(f"fedms.mixing must be one of {list(MIX_MODES)}, got {mode!r}")


def nll_per_example(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """``-log p(y)`` per example [B]. log_probs [B, C], labels [B] int."""
    chex.assert_rank(log_probs, 2)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean ``-log p(y)`` over the batch. log_probs [B, C], labels [B] int."""
    return nll_per_example(log_probs, labels).mean()
