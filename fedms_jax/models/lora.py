"""LoRA: low-rank adapters kept in their own variable collection.

A LoRA-adapted Dense computes ``y = x W + b + (alpha / r) * dropout(x) A B`` with
``A: [in, r]`` random and ``B: [r, out]`` zero at initialisation, so a fresh adapter leaves the
backbone's output unchanged. ``W`` and ``b`` live in the ``'params'`` collection (frozen);
``A`` and ``B`` live in the ``'lora'`` collection, so ``jax.grad`` is taken with respect to the
LoRA tree alone and the frozen backbone is passed to every client by reference, never copied.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedms_jax.choices import LORA_TARGETS  # plain names: the config checks them before jax starts

LORA_COLLECTION = "lora"

# HF peft initialises A with kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Hyper-parameters of the LoRA adapters.

    Attributes:
      rank: r, the inner dimension of A [in, r] and B [r, out].
      alpha: scaling numerator; the adapter's output is multiplied by alpha / rank.
      dropout: dropout rate applied to the adapter's input (0 disables it).
      targets: which Dense layers of each block get an adapter, from ``LORA_TARGETS``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not targets:
            raise ValueError("lora.targets must name at least one layer, got ()")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"lora.targets has unknown target(s) {unknown}; choose from {list(LORA_TARGETS)}"
            )
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora.targets has duplicates: {list(targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRADense(nn.Module):
    """Dense layer with an optional LoRA adapter.

    Attributes:
      features: output width.
      lora: adapter spec, or None for a layer that never has one.
      use_bias: whether the frozen layer has a bias.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    lora: LoRASpec | None = None
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, use_lora: bool = False, deterministic: bool = True
    ) -> jax.Array:
        """x: [..., in] -> [..., features]. ``use_lora`` is static (a Python bool)."""
        d_in = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (d_in, self.features), jnp.float32
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and use_lora:
            r = self.lora.rank
            a = self.variable(
                LORA_COLLECTION, "a", lambda: _lora_a_init(self.make_rng("params"), (d_in, r))
            ).value
            b = self.variable(
                LORA_COLLECTION, "b", lambda: jnp.zeros((r, self.features), jnp.float32)
            ).value
            h = x
            if self.lora.dropout > 0.0:
                h = nn.Dropout(self.lora.dropout)(h, deterministic=deterministic)
            # The scale goes on the small [r, out] factor, not on the [..., out] activations:
            # scaling the activations cost a full pass over them (and their cotangent) per step.
            delta = jnp.dot(jnp.dot(h, a.astype(self.dtype)), (self.lora.scale * b).astype(self.dtype))
            y = y + delta.astype(y.dtype)
        return y


def merge_lora(params: Mapping[str, Any], lora: Mapping[str, Any], spec: LoRASpec) -> dict:
    """Folds LoRA into the backbone: ``kernel' = kernel + (alpha/r) A B``, for export.

    Args:
      params: the backbone's ``'params'`` tree.
      lora: a ``'lora'`` tree of the same model (all blocks, or only some: blocks missing from
        it are left as they are).
      spec: the adapters' spec (for the scale).

    Returns:
      A new ``'params'`` tree; running it without LoRA equals running ``params`` with ``lora``.
    """

    def merge(p: Any, l: Any, path: str) -> Any:
        if not isinstance(l, Mapping):
            raise ValueError(f"lora tree at {path!r} is a leaf where a dict was expected")
        if "a" in l and "b" in l:
            if "kernel" not in p:
                raise ValueError(f"lora adapter at {path!r} has no kernel in params")
            kernel = p["kernel"]
            delta = spec.scale * (l["a"].astype(jnp.float32) @ l["b"].astype(jnp.float32))
            if delta.shape != kernel.shape:
                raise ValueError(
                    f"lora adapter at {path!r} has shape {delta.shape}, kernel {kernel.shape}"
                )
            return {**p, "kernel": kernel + delta.astype(kernel.dtype)}
        out = dict(p)
        for key, sub in l.items():
            if key not in p:
                raise ValueError(f"lora tree has {path + '/' + key!r}, which params do not have")
            out[key] = merge(p[key], sub, f"{path}/{key}")
        return out

    return merge(dict(params), lora, "")


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
