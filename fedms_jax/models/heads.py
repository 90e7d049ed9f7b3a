"""Classifier heads: linear (ViT) and CLIP zero-shot (frozen or tuned class-prompt embeddings)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.models.clip import CLIP, l2_normalize

DEFAULT_TEMPLATE = "a photo of a {}."


class LinearHead(nn.Module):
    """features [B, F] -> logits [B, num_classes]."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="dense")(
            features.astype(jnp.float32)
        )


class ZeroShotHead(nn.Module):
    """CLIP zero-shot classifier: ``exp(logit_scale) * cos(image_embedding, class_embedding)``.

    Parameters ``class_embeddings`` [C, P] and ``logit_scale`` are initialised from the frozen
    text tower by ``zero_shot_params``; ``init`` gives placeholders of the right shape only.
    """

    num_classes: int
    projection_dim: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        emb = self.param(
            "class_embeddings", nn.initializers.normal(1.0), (self.num_classes, self.projection_dim)
        )
        scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())
        img = l2_normalize(features.astype(jnp.float32))
        return jnp.exp(scale) * img @ l2_normalize(emb).T


def class_prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    if "{}" not in template:
        raise ValueError(f"prompt template must contain '{{}}', got {template!r}")
    return [template.format(label.replace("_", " ")) for label in labels]


def tokenize_prompts(
    tokenizer_dir: str | os.PathLike, prompts: Sequence[str], max_length: int
) -> np.ndarray:
    """Tokenises with transformers' CLIPTokenizer from the checkpoint directory -> [C, S] int32."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    enc = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(enc["input_ids"], np.int32)


def zero_shot_params(
    clip: CLIP,
    clip_params: Any,
    input_ids: np.ndarray,
) -> dict:
    """Text embeddings of the class prompts, computed once: {'class_embeddings', 'logit_scale'}.

    Args:
      clip: the CLIP module; clip_params: its params.
      input_ids: [C, S] tokenised class prompts (``tokenize_prompts``).
    """
    text = jax.jit(lambda p, ids: clip.apply({"params": p}, ids, method=CLIP.text_features))
    emb = np.asarray(text(clip_params, jnp.asarray(input_ids)))
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return {
        "class_embeddings": emb.astype(np.float32),
        "logit_scale": np.asarray(clip_params["logit_scale"], np.float32),
    }
