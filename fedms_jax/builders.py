"""From a validated config to the objects a run needs: expert, backbone params, optimizers."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedms_jax.data.preprocess import CLIP_STATS, IMAGENET_HALF
from fedms_jax.models.expert import Expert
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import EncoderSpec
from fedms_jax.models.vision import VisionSpec

PyTree = Any


def lora_spec(config: ml_collections.ConfigDict) -> LoRASpec:
    c = config.lora
    return LoRASpec(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), targets=tuple(c.targets))


def build_expert(
    config: ml_collections.ConfigDict, num_classes: int, rng: jax.Array
) -> tuple[Expert, PyTree, tuple[tuple[float, ...], tuple[float, ...]]]:
    """-> (expert, frozen backbone params, (mean, std) for preprocessing).

    ``model.pretrained`` names a hub id or local checkpoint (loaded, position embeddings resized
    to ``model.image_size``); empty means a randomly initialised ViT of the configured shape.
    """
    m = config.model
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    if m.pretrained:
        from fedms_jax.models.hf import load_pretrained

        pre = load_pretrained(m.pretrained, image_size=m.image_size)
        spec, backbone = pre.vision_spec, pre.vision_params
        stats = CLIP_STATS if pre.kind == "clip" else IMAGENET_HALF
    else:
        enc = EncoderSpec(m.hidden, m.layers, m.heads, m.mlp_dim, m.hidden_act, 1e-12)
        spec = VisionSpec(enc, image_size=m.image_size, patch_size=m.patch_size, flavor="vit")
        backbone = None
        stats = IMAGENET_HALF
    expert = Expert(spec, lora_spec(config), num_classes, head_kind=m.head, dtype=dtype)
    if backbone is None:
        backbone = jax.jit(expert.init_backbone)(rng)
    return expert, jax.tree_util.tree_map(jnp.asarray, backbone), stats


def client_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The clients' local optimizer; its schedule spans one round's local steps."""
    c = config.client
    lr: Any = c.lr
    if c.schedule == "cosine":
        lr = optax.cosine_decay_schedule(c.lr, c.local_steps)
    if c.optimizer == "sgd":
        return optax.sgd(lr)
    if c.optimizer == "momentum":
        return optax.sgd(lr, momentum=c.momentum)
    return optax.adamw(lr, weight_decay=c.weight_decay)
