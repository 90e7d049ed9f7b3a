"""CLIP: vision tower (``VisionTransformer`` with flavor 'clip'), text tower, logit scale."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import Encoder, EncoderSpec
from fedms_jax.models.vision import VisionSpec, VisionTransformer


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """CLIP text tower: causal encoder, EOT pooling, projection to ``projection_dim``."""

    encoder: EncoderSpec
    vocab_size: int
    max_positions: int
    projection_dim: int
    eos_token_id: int

    @classmethod
    def from_hf(cls, config: Any) -> "TextSpec":
        """From a transformers CLIPConfig."""
        text = config.text_config
        return cls(
            encoder=EncoderSpec.from_hf(text),
            vocab_size=int(text.vocab_size),
            max_positions=int(text.max_position_embeddings),
            projection_dim=int(config.projection_dim),
            eos_token_id=int(text.eos_token_id),
        )


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
    vision: VisionSpec
    text: TextSpec

    @classmethod
    def from_hf(cls, config: Any, *, image_size: int | None = None) -> "CLIPSpec":
        return cls(VisionSpec.from_hf(config, image_size=image_size), TextSpec.from_hf(config))


def check_token_ids(input_ids: Any, spec: TextSpec) -> None:
    if not hasattr(input_ids, "shape") or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be an integer array [batch, length], got {getattr(input_ids, 'shape', input_ids)!r}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > spec.max_positions:
        raise ValueError(
            f"input_ids length {input_ids.shape[1]} exceeds max_position_embeddings {spec.max_positions}"
        )


class TextTransformer(nn.Module):
    """CLIP's text tower. input_ids [B, S] int -> text embeddings [B, projection_dim]."""

    spec: TextSpec
    dtype: Any = jnp.float32

    def setup(self) -> None:
        enc = self.spec.encoder
        self.token_embed = nn.Embed(self.spec.vocab_size, enc.hidden_size, dtype=self.dtype)
        self.pos_embed = self.param(
            "pos_embed", nn.initializers.normal(0.01), (self.spec.max_positions, enc.hidden_size)
        )
        self.encoder = Encoder(enc, None, self.dtype, causal=True)
        self.final_ln = nn.LayerNorm(epsilon=enc.layer_norm_eps, dtype=self.dtype)
        self.projection = nn.Dense(self.spec.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        check_token_ids(input_ids, self.spec)
        s = input_ids.shape[1]
        h = self.token_embed(input_ids) + self.pos_embed[:s].astype(self.dtype)
        # Causal attention: tokens up to EOT never see the padding after it, so no padding mask
        # is needed for the pooled output.
        h = self.final_ln(self.encoder(h))
        if self.spec.eos_token_id == 2:
            # Checkpoints saved before transformers PR #24773 carry eos_token_id=2; HF then pools
            # at the largest token id (EOT is the vocabulary's last token).
            eot = jnp.argmax(input_ids, axis=-1)
        else:
            eot = jnp.argmax(input_ids == self.spec.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(h, eot[:, None, None], axis=1)[:, 0]
        return self.projection(pooled)


class CLIP(nn.Module):
    """Both towers and the logit scale. Parameter tree: {vision, text, logit_scale}."""

    spec: CLIPSpec
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.vision = VisionTransformer(self.spec.vision, self.lora, self.dtype)
        self.text = TextTransformer(self.spec.text, self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def image_features(self, images: jax.Array, num_active: int | None = None) -> jax.Array:
        """images [B, H, W, C] -> unnormalised image embeddings [B, P]."""
        return self.vision(images, num_active).features

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, S] -> unnormalised text embeddings [B, P]."""
        return self.text(input_ids)

    def __call__(
        self, images: jax.Array, input_ids: jax.Array, num_active: int | None = None
    ) -> jax.Array:
        """-> logits_per_image [B_images, B_texts], as HF CLIPModel."""
        img = l2_normalize(self.image_features(images, num_active))
        txt = l2_normalize(self.text_features(input_ids))
        return jnp.exp(self.logit_scale) * img @ txt.T


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)
