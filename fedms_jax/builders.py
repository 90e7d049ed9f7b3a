"""From a validated config to the objects a run needs: expert, backbone params, optimizers."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from fedms_jax.config import Config
from fedms_jax.data.dataset import DataError
from fedms_jax.data.features import FrozenStem
from fedms_jax.data.preprocess import CLIP_STATS, IMAGENET_HALF, IMAGENET_STATS
from fedms_jax.models.expert import Expert
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import EncoderSpec
from fedms_jax.models.vision import VisionSpec, split_params

PyTree = Any


def lora_spec(config: Config) -> LoRASpec:
    c = config.lora
    return LoRASpec(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=c.targets)


@dataclasses.dataclass(frozen=True)
class Built:
    """expert; backbone: frozen params; stats: (mean, std) for preprocessing; head: the initial
    head params when they come from the checkpoint (CLIP zero-shot), else None."""

    expert: Expert
    backbone: PyTree
    stats: tuple[tuple[float, ...], tuple[float, ...]]
    head: PyTree | None = None


def build_expert(config: Config, class_names: Sequence[str], rng: jax.Array) -> Built:
    """The expert, its frozen backbone and (for CLIP) its zero-shot head.

    ``model.pretrained`` names a hub id or local checkpoint (loaded, position embeddings resized
    to ``model.image_size``); empty means a randomly initialised ViT of the configured shape.
    ``model.head='zero_shot'`` (CLIP) embeds ``model.prompt`` for each class name with the
    checkpoint's tokenizer and text tower, once; ``model.tune_head`` decides if it is trained.
    """
    m = config.model
    head = None
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    if m.pretrained:
        from fedms_jax.models.hf import load_pretrained


        try:
            pre = load_pretrained(m.pretrained, image_size=m.image_size)
        except ValueError as e:  # a malformed checkpoint, or one that cannot take image_size
            raise DataError(f"model.pretrained {m.pretrained!r}: {e}") from e
        spec, backbone = pre.vision_spec, pre.vision_params
        stats = {"clip": CLIP_STATS, "dinov2": IMAGENET_STATS}.get(pre.kind, IMAGENET_HALF)
        if m.head == "zero_shot":
            if pre.kind != "clip":
                raise ValueError(f"config.model.head = 'zero_shot' needs a CLIP checkpoint; {m.pretrained!r} is {pre.kind}")
            from fedms_jax.models.heads import class_prompts, tokenize_prompts, zero_shot_params

            length = pre.hf_config.text_config.max_position_embeddings
            ids = tokenize_prompts(pre.path, class_prompts(class_names, m.prompt), max_length=length)
            head = zero_shot_params(pre.module(), pre.params, ids)
    else:
        enc = EncoderSpec(m.hidden, m.layers, m.heads, m.mlp_dim, m.hidden_act, 1e-12)
        spec = VisionSpec(enc, image_size=m.image_size, patch_size=m.patch_size, flavor="vit")
        backbone = None
        stats = IMAGENET_HALF
    tune = m.tune_head or m.head == "linear"
    expert = Expert(spec, lora_spec(config), len(class_names), head_kind=m.head, tune_head=tune, dtype=dtype,
                    scan_layers=m.scan_layers, remat=m.remat)
    if backbone is None:
        backbone = jax.jit(expert.init_backbone)(rng)
    if head is not None:
        head = jax.tree_util.tree_map(jnp.asarray, head)
    return Built(expert, jax.tree_util.tree_map(jnp.asarray, backbone), stats, head)


def split_frozen(built: Built, frozen_blocks: int) -> tuple[Built, FrozenStem]:
    """(the federated part, the frozen stem) of a built expert at block F = ``frozen_blocks``.

    The federated part is an expert of the top ``L - F`` blocks whose input is tokens [B, T, D]
    (``VisionSpec.split``; its LoRA units ``blocks_0 .. blocks_{L-F-1}`` are the backbone's
    blocks ``F .. L-1``), with the top blocks' params and the same stats and head. The stem is
    embeddings + blocks ``[0, F)``: uint8 images -> tokens (``data.features.FrozenStem``).
    """
    e = built.expert
    stem_spec, top_spec = e.spec.split(frozen_blocks)
    stem_params, top_params = split_params(built.backbone, frozen_blocks)
    top = dataclasses.replace(built, expert=dataclasses.replace(e, spec=top_spec), backbone=top_params)
    return top, FrozenStem(stem_spec, stem_params, built.stats, e.dtype)


def lr_scale(config: Config):
    """The local learning-rate schedule as a factor of ``client.lr``: ``(step, steps) -> factor``
    over one round's steps (a segment's, for methods that split the round), or None
    (constant). It multiplies the optimizer's update outside the optimizer, so an optimizer
    state that persists across rounds (``Stage.persistent``) does not carry the schedule with it.
    cosine: ``optax.cosine_decay_schedule(1, steps)``."""
    if config.client.schedule != "cosine":
        return None
    return lambda step, steps: optax.cosine_decay_schedule(1.0, steps)(step)


def client_optimizer(config: Config) -> optax.GradientTransformation:
    """The clients' local optimizer at the peak learning rate (the schedule is ``lr_scale``)."""
    c = config.client
    lr: Any = c.lr
    if c.optimizer == "sgd":
        return optax.sgd(lr)
    if c.optimizer == "momentum":
        return optax.sgd(lr, momentum=c.momentum)
    return optax.adamw(lr, weight_decay=c.weight_decay)
