"""Image preprocessing inside the jitted step: uint8 -> resized, normalised float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Normalisation constants by model family (those of the HF image processors).
IMAGENET_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # google/vit-* processors
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # facebook/dinov2-* processors


def preprocess(
    images: jax.Array,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_channels: int = 3,
) -> jax.Array:
    """uint8 images [B, h, w, c] -> float32 [B, image_size, image_size, num_channels].

    Grey images (c = 1) are repeated to ``num_channels``; pixels scaled to [0, 1], resized
    bilinearly (antialiased when shrinking) and normalised with ``(x - mean) / std``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"raw images must be uint8, got dtype {images.dtype}")
    x = images.astype(jnp.float32) / 255.0
    c = x.shape[-1]
    if c == 1 and num_channels != 1:
        x = jnp.repeat(x, num_channels, axis=-1)
    elif c != num_channels:
        raise ValueError(f"images have {c} channels, the model expects {num_channels}")
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, num_channels), "bilinear")
    mean_a = jnp.asarray(mean[:num_channels] if len(mean) >= num_channels else mean * num_channels, jnp.float32)
    std_a = jnp.asarray(std[:num_channels] if len(std) >= num_channels else std * num_channels, jnp.float32)
    return (x - mean_a) / std_a
