"""Vision transformers (HF ViTModel, CLIP's vision tower, DINOv2) with the SAL-aware forward.

The three architectures are one module, ``VisionTransformer``, configured by a ``VisionSpec``
built from a transformers config: ViT has a biased patch embedding, a final LayerNorm over all
tokens and an optional tanh pooler; CLIP has an unbiased patch embedding, a LayerNorm before the
encoder (``pre_layrnorm``), a LayerNorm on the class token and a linear projection; DINOv2 is ViT
with LayerScale in every block, no pooler, and (its linear-probe convention) features
``[CLS] ⊕ mean(patch tokens)`` of the final LayerNorm's output, so ``feature_dim = 2 D``.

SAL forward at level k (static): the lower ``L - k`` blocks are the frozen *trunk*, run without
LoRA, and the gradient stops at their output (``stop_gradient``), so backprop never enters them:
the compute saved is real, not masked. The top k blocks run with LoRA. The hidden states entering
the lowest active block are the *branch point*: the MoFM runs the trunk once and the top blocks
once per expert from there, and its gate reads the branch point's class token.

Frozen bottom blocks (``model.frozen_blocks = F``): ``VisionSpec.split(F)`` cuts an L-block
network into a *stem* (embeddings + blocks ``[0, F)``, input images [B, H, W, C]) and a *top*
(blocks ``[F, L)`` renumbered ``0 .. L-F-1`` + the final norm / pooling, ``input='tokens'``: its
input is the stem's output [B, T, D] and its ``embed`` is the identity); ``split_params`` cuts
the parameter tree the same way. ``top(stem(x))`` is the full network, at every SAL level
k <= L - F, so the stem's output can be computed once per image and cached.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import Encoder, EncoderSpec, check_num_active

Flavor = Literal["vit", "clip", "dinov2"]
FLAVORS: tuple[str, ...] = ("vit", "clip", "dinov2")
INPUTS: tuple[str, ...] = ("images", "tokens")


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """Architecture of a vision transformer.

    Attributes:
      encoder: the blocks' shape.
      image_size, patch_size, num_channels: input geometry; tokens T = (image/patch)^2 + 1.
      flavor: 'vit' (HF ViTModel), 'clip' (HF CLIPVisionModelWithProjection) or 'dinov2'
        (HF Dinov2Model; the encoder must have ``layer_scale``).
      pooler: ViT only: whether the tanh pooler exists.
      projection_dim: CLIP only: width of the image embedding.
      input: 'images' (normalised pixels [B, H, W, C]; the module owns the embeddings), or
        'tokens' (the token states [B, T, D] a frozen stem computed from such images: the
        module has no embedding parameters and ``embed`` is the identity; image_size and
        patch_size still give T). ``split`` makes such a spec.
    """

    encoder: EncoderSpec
    image_size: int
    patch_size: int
    num_channels: int = 3
    flavor: Flavor = "vit"
    pooler: bool = False
    projection_dim: int | None = None
    input: Literal["images", "tokens"] = "images"

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {list(INPUTS)}, got {self.input!r}")
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {list(FLAVORS)}, got {self.flavor!r}")
        if (self.flavor == "dinov2") != self.encoder.layer_scale:
            raise ValueError(
                f"flavor {self.flavor!r} needs encoder.layer_scale={self.flavor == 'dinov2'}, "
                f"got {self.encoder.layer_scale}"
            )
        if self.flavor == "dinov2" and self.pooler:
            raise ValueError("a DINOv2 backbone has no pooler (pooler must be False)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.flavor == "clip" and not self.projection_dim:
            raise ValueError(f"a CLIP vision tower needs projection_dim, got {self.projection_dim!r}")

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """T: the patches and the class token."""
        return self.num_patches + 1

    def split(self, frozen_blocks: int) -> tuple["VisionSpec", "VisionSpec"]:
        """(stem, top) of this images-input network at block ``F = frozen_blocks``, 0 < F < L.

        stem: embeddings + blocks ``[0, F)``, images in, tokens [B, T, D] out (run it with
        ``VisionTransformer.hidden_states``: no final norm, no LoRA). top: blocks ``[F, L)``
        (renumbered from 0) + final norm / pooling / projection, ``input='tokens'``.
        """
        if self.input != "images":
            raise ValueError("only an images-input spec can be split")
        L = self.num_layers
        if isinstance(frozen_blocks, bool) or not isinstance(frozen_blocks, int) or not 0 < frozen_blocks < L:
            raise ValueError(f"frozen_blocks must be an integer in [1, {L - 1}], got {frozen_blocks!r}")
        stem = dataclasses.replace(self, encoder=dataclasses.replace(self.encoder, num_layers=frozen_blocks))
        top = dataclasses.replace(
            self, encoder=dataclasses.replace(self.encoder, num_layers=L - frozen_blocks), input="tokens"
        )
        return stem, top

    @property
    def feature_dim(self) -> int:
        if self.flavor == "clip":
            return self.projection_dim
        return 2 * self.encoder.hidden_size if self.flavor == "dinov2" else self.encoder.hidden_size

    @classmethod
    def from_hf(cls, config: Any, *, image_size: int | None = None, pooler: bool = True) -> "VisionSpec":
        """From a transformers ViTConfig, CLIPVisionConfig, CLIPConfig (its vision part) or
        Dinov2Config. Raises ValueError for DINOv2 variants this module does not implement."""
        kind = type(config).__name__
        if kind == "Dinov2Config":
            return cls._dinov2(config, image_size)
        if kind == "CLIPConfig":
            vision = config.vision_config
            return cls._clip(vision, int(config.projection_dim), image_size)
        if kind == "CLIPVisionConfig":
            return cls._clip(config, int(config.projection_dim), image_size)
        if kind == "ViTConfig":
            return cls(
                encoder=EncoderSpec.from_hf(config),
                image_size=int(image_size or config.image_size),
                patch_size=int(config.patch_size),
                num_channels=int(config.num_channels),
                flavor="vit",
                pooler=pooler,
            )
        raise ValueError(
            f"config must be a ViTConfig, CLIPVisionConfig, CLIPConfig or Dinov2Config, got {kind}"
        )

    @classmethod
    def _dinov2(cls, config: Any, image_size: int | None) -> "VisionSpec":
        if getattr(config, "use_swiglu_ffn", False):
            raise ValueError(
                "Dinov2Config.use_swiglu_ffn = True (the SwiGLU MLP of DINOv2-g) is not supported: "
                "use a checkpoint with the standard GELU MLP (dinov2-small / -base / -large)"
            )
        if not getattr(config, "qkv_bias", True):
            raise ValueError("Dinov2Config.qkv_bias = False is not supported (query/key/value need biases)")
        sizes = {}
        for name in ("image_size", "patch_size"):
            v = getattr(config, name)
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ValueError(f"Dinov2Config.{name} = {list(v)}: only square sizes are supported")
                v = v[0]
            sizes[name] = int(v)
        return cls(
            encoder=EncoderSpec.from_hf(config),
            image_size=int(image_size or sizes["image_size"]),
            patch_size=sizes["patch_size"],
            num_channels=int(config.num_channels),
            flavor="dinov2",
        )

    @classmethod
    def _clip(cls, vision: Any, projection_dim: int, image_size: int | None) -> "VisionSpec":
        return cls(
            encoder=EncoderSpec.from_hf(vision),
            image_size=int(image_size or vision.image_size),
            patch_size=int(vision.patch_size),
            num_channels=int(vision.num_channels),
            flavor="clip",
            projection_dim=projection_dim,
        )


_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "pre_ln")


def split_params(params: Any, frozen_blocks: int) -> tuple[dict, dict]:
    """A backbone's ``'params'`` cut as ``VisionSpec.split(frozen_blocks)`` cuts its spec:
    (stem: the embeddings + ``encoder/blocks_0 .. blocks_{F-1}``; top: ``encoder/blocks_F ..
    blocks_{L-1}`` renamed ``blocks_0 .. blocks_{L-F-1}`` + everything after the encoder (final
    norm, pooler, projection)). The leaves are shared, not copied."""
    blocks = params["encoder"]
    L = len(blocks)
    if not 0 < frozen_blocks < L:
        raise ValueError(f"frozen_blocks must be in [1, {L - 1}], got {frozen_blocks!r}")
    stem = {k: v for k, v in params.items() if k in _EMBEDDINGS}
    stem["encoder"] = {f"blocks_{i}": blocks[f"blocks_{i}"] for i in range(frozen_blocks)}
    top = {k: v for k, v in params.items() if k not in _EMBEDDINGS and k != "encoder"}
    top["encoder"] = {f"blocks_{i - frozen_blocks}": blocks[f"blocks_{i}"] for i in range(frozen_blocks, L)}
    return stem, top


@flax.struct.dataclass
class Branch:
    """The hidden states entering the lowest active block.

    Attributes:
      hidden: [B, T, D] token states (class token first).
      cls: [B, D] the class token's state, ``hidden[:, 0]``.
    """

    hidden: jax.Array
    cls: jax.Array


@flax.struct.dataclass
class VisionOutput:
    """features: [B, F] pooled (CLIP: projected) image features; branch: the branch point."""

    features: jax.Array
    branch: Branch


def check_images(images: Any, spec: VisionSpec) -> None:
    """Raises ValueError unless images is a float array [B, H, W, C] of the spec's geometry."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise ValueError(f"images must be an array, got {type(images).__name__}")
    want = (spec.image_size, spec.image_size, spec.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(
            f"images must have shape [batch, {want[0]}, {want[1]}, {want[2]}], "
            f"got {tuple(images.shape)}"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point (normalised pixels), got dtype {images.dtype}"
        )


def check_tokens(tokens: Any, spec: VisionSpec) -> None:
    """Raises ValueError unless tokens is a float array [B, T, D] of the spec's shape."""
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise ValueError(f"tokens must be an array, got {type(tokens).__name__}")
    want = (spec.num_tokens, spec.encoder.hidden_size)
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != want:
        raise ValueError(f"tokens must have shape [batch, {want[0]}, {want[1]}], got {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.floating):
        raise ValueError(f"tokens must be floating point, got dtype {tokens.dtype}")


class VisionTransformer(nn.Module):
    """ViT / CLIP vision tower. Parameters float32; ``dtype`` is the computation dtype."""

    spec: VisionSpec
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32
    scan: bool = True  # scanned encoder blocks (``transformer.Encoder.scan``)
    remat: bool = False  # blocks rematerialised in the backward pass (``transformer.Encoder.remat``)

    def setup(self) -> None:
        spec, d = self.spec, self.spec.encoder.hidden_size
        eps = spec.encoder.layer_norm_eps
        p = spec.patch_size
        if spec.input == "images":  # a tokens-input module (a split's top) has no embeddings
            self.patch_embed = nn.Conv(
                d, (p, p), strides=(p, p), padding="VALID", use_bias=spec.flavor != "clip",
                dtype=self.dtype,
            )
            self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (d,))
            self.pos_embed = self.param(
                "pos_embed", nn.initializers.normal(0.02), (spec.num_patches + 1, d)
            )
            if spec.flavor == "clip":
                self.pre_ln = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        if spec.flavor == "clip":
            self.projection = nn.Dense(spec.projection_dim, use_bias=False, dtype=self.dtype)
        elif spec.pooler:
            self.pooler = nn.Dense(d, dtype=self.dtype)
        self.encoder = Encoder(spec.encoder, self.lora, self.dtype, scan=self.scan, remat=self.remat)
        self.final_ln = nn.LayerNorm(epsilon=eps, dtype=self.dtype)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def embed(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] (normalised floats) -> token states [B, T, D] entering block 0.

        A tokens-input spec: tokens [B, T, D] float -> the same tokens (in ``dtype``)."""
        if self.spec.input == "tokens":
            check_tokens(images, self.spec)
            return images.astype(self.dtype)
        check_images(images, self.spec)
        x = self.patch_embed(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, x.shape[-1]))
        h = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
        if self.spec.flavor == "clip":
            h = self.pre_ln(h)
        return h

    def pool(self, hidden: jax.Array) -> jax.Array:
        """Final token states [B, T, D] -> features [B, F]: the LN'd class token (CLIP: then
        projected; DINOv2: concatenated with the mean of the LN'd patch tokens, F = 2 D)."""
        if self.spec.flavor == "dinov2":
            h = self.final_ln(hidden)
            return jnp.concatenate([h[:, 0], h[:, 1:].mean(axis=1)], axis=-1)
        cls = self.final_ln(hidden[:, 0])
        return self.projection(cls) if self.spec.flavor == "clip" else cls

    def pooler_output(self, hidden: jax.Array) -> jax.Array:
        """ViT's optional pooler: tanh(Dense(LN(h)[:, 0])), as HF ViTModel.pooler_output."""
        if self.spec.flavor != "vit" or not self.spec.pooler:
            raise ValueError("pooler_output needs a ViT spec with pooler=True")
        return jnp.tanh(self.pooler(self.final_ln(hidden[:, 0])))

    def trunk(self, images: jax.Array, num_active: int) -> Branch:
        """Embeddings plus the frozen lower ``L - k`` blocks; no gradient flows back through them.

        images [B, H, W, C] (or, for a tokens-input spec, tokens [B, T, D]) -> Branch."""
        k = check_num_active(num_active, self.num_layers)
        h = self.encoder(self.embed(images), 0, self.num_layers - k, use_lora=False)
        h = jax.lax.stop_gradient(h)
        return Branch(hidden=h, cls=h[:, 0])

    def top(self, hidden: jax.Array, num_active: int, *, deterministic: bool = True) -> jax.Array:
        """The top k blocks with LoRA, from the branch point [B, T, D], pooled -> [B, F]."""
        k = check_num_active(num_active, self.num_layers)
        L = self.num_layers
        h = self.encoder(hidden, L - k, L, use_lora=True, deterministic=deterministic)
        return self.pool(h)

    def hidden_states(self, images: jax.Array) -> jax.Array:
        """All blocks without LoRA -> final token states [B, T, D] (before the final LN); for a
        split's stem, images [B, H, W, C] -> the tokens [B, T, D] its top takes."""
        return self.encoder(self.embed(images), use_lora=False)

    def init_all(self, images: jax.Array) -> VisionOutput:
        """For ``init``: touches every parameter (all LoRA adapters, the pooler if any)."""
        out = self(images)
        if self.spec.flavor == "vit" and self.spec.pooler:
            self.pooler_output(out.branch.hidden)
        return out

    def __call__(
        self, images: jax.Array, num_active: int | None = None, *, deterministic: bool = True
    ) -> VisionOutput:
        """SAL forward with k = ``num_active`` (static; default L) LoRA-adapted top blocks."""
        k = self.num_layers if num_active is None else num_active
        branch = self.trunk(images, k)
        features = self.top(branch.hidden, k, deterministic=deterministic)
        return VisionOutput(features=features, branch=branch)
