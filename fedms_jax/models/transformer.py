"""The pre-LayerNorm transformer encoder shared by ViT and both CLIP towers.

Parameter names are this package's own (``blocks_3/attn/q/kernel``); ``hf.py`` maps them to the
Hugging Face spellings. Each block's Dense layers are ``attn/{q,k,v,o}`` and ``mlp/{fc1,fc2}``,
which are also the names LoRA targets use.

The encoder runs any contiguous range of blocks, with or without LoRA, so the SAL forward can
run the frozen trunk (blocks ``[0, L-k)``) and the adapted top (``[L-k, L)``) separately.

Scanned layers (``Encoder.scan``, the default): a range of two or more blocks runs as one
``lax.scan`` over the blocks' parameters stacked along a new leading axis, so a program holds one
block body however deep the range is, and its trace and compile times stop growing with depth
(as big_vision's and MaxText's scanned encoders). The parameters stay stored per block
(``blocks_i``): Hugging Face loading and export, LoRA units per block, per-unit aggregation and
the sharding rules see the same tree either way; the stacking happens inside the program (a copy
of the range's weights, negligible next to a block's matmuls). With LoRA dropout the scanned
encoder draws one dropout key per block from the encoder's, so its masks differ from the
unrolled encoder's (equal in distribution); without dropout the two are equal.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedms_jax.models.lora import LORA_COLLECTION, LoRADense, LoRASpec

def _gelu_exact(x: jax.Array) -> jax.Array:
    # torch's formula, 0.5 x (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False) goes through
    # erfc, which XLA:CPU evaluates with an extra exp and select per element: the GELU and its
    # derivative were ~7% of a W1 training step (profile in experiments/benchmarks/RESULTS.md).
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476).astype(x.dtype))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Shape of a transformer encoder (hashable, so it can be a Flax module attribute)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    hidden_act: str
    layer_norm_eps: float
    # DINOv2's LayerScale: each residual branch is multiplied by a learned per-channel vector
    # (``layer_scale1/2.lambda1`` in transformers) before it is added back.
    layer_scale: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        activation(self.hidden_act)

    @classmethod
    def from_hf(cls, config: Any) -> "EncoderSpec":
        """From a transformers ViTConfig, CLIPVisionConfig, CLIPTextConfig or Dinov2Config."""
        dinov2 = getattr(config, "model_type", None) == "dinov2"
        # DINOv2 configs give the MLP width as a ratio (transformers: int(hidden * mlp_ratio)).
        mlp_dim = int(config.hidden_size * config.mlp_ratio) if dinov2 else int(config.intermediate_size)
        return cls(
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=int(config.num_attention_heads),
            mlp_dim=mlp_dim,
            hidden_act=str(config.hidden_act),
            layer_norm_eps=float(config.layer_norm_eps),
            layer_scale=dinov2,
        )


def check_num_active(num_active: int, num_layers: int) -> int:
    """Validates the SAL number of active (LoRA-adapted) top blocks, k in [0, L]."""
    if isinstance(num_active, bool) or not isinstance(num_active, int):
        raise ValueError(f"num_active must be a Python int (static), got {num_active!r}")
    if not 0 <= num_active <= num_layers:
        raise ValueError(f"num_active must be in [0, {num_layers}], got {num_active}")
    return num_active


def _lora_for(lora: LoRASpec | None, name: str) -> LoRASpec | None:
    return lora if lora is not None and name in lora.targets else None


class Attention(nn.Module):
    spec: EncoderSpec
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, causal: bool, use_lora: bool, deterministic: bool
    ) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        h = self.spec.num_heads
        dense = lambda name: LoRADense(d, lora=_lora_for(self.lora, name), dtype=self.dtype, name=name)
        kw = dict(use_lora=use_lora, deterministic=deterministic)
        q = dense("q")(x, **kw).reshape(b, t, h, d // h)
        k = dense("k")(x, **kw).reshape(b, t, h, d // h)
        v = dense("v")(x, **kw).reshape(b, t, h, d // h)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // h) ** -0.5
        if causal:
            mask = jnp.tril(jnp.ones((t, t), bool))
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        # Softmax in float32 even under bf16 compute: the row sums lose precision otherwise.
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return dense("o")(out, **kw)


class MLP(nn.Module):
    spec: EncoderSpec
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, use_lora: bool, deterministic: bool) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        kw = dict(use_lora=use_lora, deterministic=deterministic)
        y = LoRADense(self.spec.mlp_dim, lora=_lora_for(self.lora, "fc1"), dtype=self.dtype, name="fc1")(x, **kw)
        y = activation(self.spec.hidden_act)(y)
        return LoRADense(x.shape[-1], lora=_lora_for(self.lora, "fc2"), dtype=self.dtype, name="fc2")(y, **kw)


class Block(nn.Module):
    """Pre-LN block: ``h + attn(ln1(h))`` then ``h + mlp(ln2(h))``; with LayerScale (DINOv2)
    ``h + layer_scale1 * attn(ln1(h))`` then ``h + layer_scale2 * mlp(ln2(h))``."""

    spec: EncoderSpec
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, *, use_lora: bool, deterministic: bool) -> jax.Array:
        eps = self.spec.layer_norm_eps
        ln = lambda name: nn.LayerNorm(epsilon=eps, dtype=self.dtype, name=name)
        kw = dict(use_lora=use_lora, deterministic=deterministic)
        a = Attention(self.spec, self.lora, self.dtype, name="attn")(ln("ln1")(h), causal=self.causal, **kw)
        h = h + self._scaled("layer_scale1", a)
        m = MLP(self.spec, self.lora, self.dtype, name="mlp")(ln("ln2")(h), **kw)
        return h + self._scaled("layer_scale2", m)

    def _scaled(self, name: str, x: jax.Array) -> jax.Array:
        if not self.spec.layer_scale:
            return x
        gamma = self.param(name, nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return x * gamma.astype(x.dtype)


def stack_blocks(blocks: Sequence[Any]) -> Any:
    """Per-block trees (equal structure) -> one tree whose leaves gain a leading block axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)


# The hook the scanned encoder calls on each block's parameters inside the scan (identity by
# default). A sharding strategy can set it while a program traces, e.g. to gather a block's
# sharded weights once per layer (``federated.sharding.gather_layers``).
_LAYER_PARAMS_HOOK: contextvars.ContextVar[Callable[[Any], Any] | None] = contextvars.ContextVar(
    "layer_params_hook", default=None)


_UNROLLED: contextvars.ContextVar[bool] = contextvars.ContextVar("unrolled_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
    """Within the block, encoders trace their blocks unrolled even if ``scan`` is set. For XLA's
    cost analysis, which counts a loop body once: a scanned encoder's FLOPs would be one
    block's (``federated.accounting`` compiles its FLOP probes unrolled)."""
    token = _UNROLLED.set(True)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


@contextlib.contextmanager
def layer_params_hook(hook: Callable[[Any], Any] | None):
    """Within the block, scanned encoders pass every block's params through ``hook`` first."""
    token = _LAYER_PARAMS_HOOK.set(hook)
    try:
        yield
    finally:
        _LAYER_PARAMS_HOOK.reset(token)


class Encoder(nn.Module):
    """A stack of ``spec.num_layers`` blocks named ``blocks_0 .. blocks_{L-1}``.

    scan: run a range of two or more blocks as a ``lax.scan`` over their stacked parameters
    (one block body per program); False unrolls them in a Python loop. Same parameters, same
    outputs (module docstring).
    remat: rematerialise each block in the backward pass (``jax.checkpoint``): a block keeps
    only its input for the gradient, and its forward runs again when the gradient reaches it,
    so a deep model's training activations are one block's plus one token state per block
    (about a third more FLOPs). Same values and gradients.
    """

    spec: EncoderSpec
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32
    causal: bool = False
    scan: bool = True
    remat: bool = False

    def setup(self) -> None:
        self.blocks = [
            Block(self.spec, self.lora, self.dtype, self.causal) for _ in range(self.spec.num_layers)
        ]

    def __call__(
        self,
        h: jax.Array,
        start: int = 0,
        stop: int | None = None,
        *,
        use_lora: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """Runs blocks ``[start, stop)`` on h: [B, T, D] -> [B, T, D]."""
        stop = self.spec.num_layers if stop is None else stop
        scan = self.scan and stop - start >= 2 and not _UNROLLED.get()
        if (scan or self.remat) and stop > start and not self.is_initializing():
            return self._functional(h, start, stop, use_lora=use_lora, deterministic=deterministic, scan=scan)
        for i in range(start, stop):
            h = self.blocks[i](h, use_lora=use_lora, deterministic=deterministic)
        return h

    def _functional(self, h: jax.Array, start: int, stop: int, *, use_lora: bool, deterministic: bool,
                    scan: bool) -> jax.Array:
        """Blocks [start, stop) applied as one function of (token state, block variables): a
        ``lax.scan`` over their stacked variables (``scan``) or a loop, each block rematerialised
        with ``remat``."""
        names = [f"blocks_{i}" for i in range(start, stop)]
        collections = ["params"] + ([LORA_COLLECTION] if use_lora and self.lora is not None else [])
        per_block = [{c: self.variables[c][n] for c in collections} for n in names]
        dropout = use_lora and self.lora is not None and self.lora.dropout > 0 and not deterministic
        keys = jax.random.split(self.make_rng("dropout"), len(names)) if dropout else None
        block = Block(self.spec, self.lora, self.dtype, self.causal, parent=None)
        hook = _LAYER_PARAMS_HOOK.get()

        def body(h, xs):
            variables, key = xs
            if hook is not None:
                variables = {**variables, "params": hook(variables["params"])}
            rngs = {"dropout": key} if key is not None else None
            return block.apply(variables, h, use_lora=use_lora, deterministic=deterministic, rngs=rngs), None

        if self.remat:  # in a scan, the loop itself keeps XLA from merging the recomputation away
            body = jax.checkpoint(body, prevent_cse=not scan)
        if scan:
            h, _ = jax.lax.scan(body, h, (stack_blocks(per_block), keys))
            return h
        for i, variables in enumerate(per_block):
            h, _ = body(h, (variables, None if keys is None else keys[i]))
        return h
