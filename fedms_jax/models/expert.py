"""An *expert*: frozen backbone + LoRA tree + classifier head, as pure functions.

Trees:
  * ``backbone``: the frozen ``'params'`` of the ``VisionTransformer`` (held once per device,
    never copied per client; never differentiated).
  * ``trainable = {'lora': ..., 'head': ...}``: what a client trains and the server aggregates.
    ``trainable['lora']`` may hold all blocks or only the active ones (see ``fedms_jax.sal``).
  * a frozen head (CLIP zero-shot head when not tuned) lives in ``frozen_head``.

With ``model.frozen_blocks = F`` the expert is the *top* of a split backbone
(``VisionSpec.split``): its spec has ``input='tokens'`` and L - F blocks, its inputs are the
frozen stem's tokens [B, T, D] wherever this module says images, and its LoRA units
``blocks_0 .. blocks_{L-F-1}`` are the full network's blocks ``F .. L-1``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp

from fedms_jax.models.heads import LinearHead, ZeroShotHead
from fedms_jax.models.lora import LORA_COLLECTION, LoRASpec
from fedms_jax.models.transformer import Block
from fedms_jax.models.vision import Branch, VisionSpec, VisionTransformer

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Expert:
    """Backbone module + head module; hashable, so it can be closed over by jitted functions.

    Attributes:
      spec, lora: the backbone's architecture and adapters.
      num_classes: C.
      head_kind: 'linear' or 'zero_shot' (CLIP only).
      tune_head: whether the head is trainable (always true for 'linear').
      dtype: computation dtype of the backbone.
      scan_layers: scanned encoder blocks (``transformer.Encoder.scan``).
      remat: blocks rematerialised in the backward pass (``transformer.Encoder.remat``).
    """

    spec: VisionSpec
    lora: LoRASpec
    num_classes: int
    head_kind: str = "linear"
    tune_head: bool = True
    dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool = False

    def __post_init__(self) -> None:
        if self.head_kind not in ("linear", "zero_shot"):
            raise ValueError(f"head must be 'linear' or 'zero_shot', got {self.head_kind!r}")
        if self.head_kind == "zero_shot" and self.spec.flavor != "clip":
            raise ValueError("head 'zero_shot' needs a CLIP backbone, got a ViT")
        if self.head_kind == "linear" and not self.tune_head:
            raise ValueError("a linear head is randomly initialised and must be tuned (tune_head=True)")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")

    @property
    def backbone(self) -> VisionTransformer:
        return VisionTransformer(self.spec, self.lora, self.dtype, scan=self.scan_layers, remat=self.remat)

    @property
    def head(self) -> LinearHead | ZeroShotHead:
        if self.head_kind == "zero_shot":
            return ZeroShotHead(self.num_classes, self.spec.feature_dim)
        return LinearHead(self.num_classes)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def _dummy_images(self) -> jax.Array:
        """A batch of one input: an image [1, H, W, C], or tokens [1, T, D] for a tokens spec."""
        s = self.spec
        if s.input == "tokens":
            return jnp.zeros((1, s.num_tokens, s.encoder.hidden_size), jnp.float32)
        return jnp.zeros((1, s.image_size, s.image_size, s.num_channels), jnp.float32)

    def _init_blocks(self, rng: jax.Array, collection: str) -> dict:
        """``{'blocks_i': ...}`` of one collection for all L blocks: one block's initialisation
        vmapped over L keys, so its program holds one block whatever the depth (initialising
        the whole module traced and compiled a forward through every block: 8 s of a
        ViT-B/32 build on a CPU, and more on a GPU)."""
        spec = self.spec
        block = Block(spec.encoder, self.lora, self.dtype)
        h = jnp.zeros((1, spec.num_tokens, spec.encoder.hidden_size), self.dtype)
        init = lambda r: block.init(r, h, use_lora=collection == LORA_COLLECTION, deterministic=True)[collection]
        stacked = jax.vmap(init)(jax.random.split(rng, spec.num_layers))
        return {f"blocks_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(spec.num_layers)}

    def init_backbone(self, rng: jax.Array) -> PyTree:
        """Random backbone params (for tests and offline runs without a checkpoint): the
        embeddings and final layers of a one-block model, then every block (``_init_blocks``)."""
        r_rest, r_blocks = jax.random.split(rng)
        one = dataclasses.replace(self.spec, encoder=dataclasses.replace(self.spec.encoder, num_layers=1))
        module = VisionTransformer(one, self.lora, self.dtype, scan=self.scan_layers)
        params = dict(module.init(r_rest, self._dummy_images(), method=VisionTransformer.init_all)["params"])
        params["encoder"] = self._init_blocks(r_blocks, "params")
        return params

    def init_lora(self, rng: jax.Array) -> PyTree:
        """A fresh LoRA tree for all L blocks (A random, B zero)."""
        return jax.jit(lambda r: {"encoder": self._init_blocks(r, LORA_COLLECTION)})(rng)

    def init_head(self, rng: jax.Array) -> PyTree:
        return self.head.init(rng, jnp.zeros((1, self.spec.feature_dim)))["params"]

    def init_trainable(self, rng: jax.Array, head: PyTree | None = None) -> dict:
        """{'lora': all blocks, 'head': head params (given, e.g. zero-shot, or initialised)}."""
        r_lora, r_head = jax.random.split(rng)
        head = self.init_head(r_head) if head is None else head
        return {"lora": self.init_lora(r_lora), "head": head if self.tune_head else {}}

    def trunk(self, backbone: PyTree, images: jax.Array, num_active: int) -> Branch:
        """images [B, H, W, C] (tokens [B, T, D] for a tokens-input spec) -> branch point
        (hidden [B, T, D], cls [B, D]); no gradient."""
        return self.backbone.apply({"params": backbone}, images, num_active, method=VisionTransformer.trunk)

    def features(
        self,
        backbone: PyTree,
        lora: PyTree,
        hidden: jax.Array,
        num_active: int,
        *,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Top k blocks with LoRA from the branch point [B, T, D] -> features [B, F].

        ``rng`` enables LoRA dropout (training); None runs deterministically.
        """
        variables = {"params": backbone, LORA_COLLECTION: lora}
        rngs = {"dropout": rng} if rng is not None else None
        return self.backbone.apply(
            variables, hidden, num_active, deterministic=rng is None, rngs=rngs,
            method=VisionTransformer.top,
        )

    def head_logits(self, head: PyTree, features: jax.Array) -> jax.Array:
        """features [B, F] -> logits [B, C] (float32)."""
        return self.head.apply({"params": head}, features)

    def logits_from_branch(
        self,
        backbone: PyTree,
        trainable: PyTree,
        hidden: jax.Array,
        num_active: int,
        *,
        frozen_head: PyTree | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        feats = self.features(backbone, trainable["lora"], hidden, num_active, rng=rng)
        return self.head_logits(self.head_params(trainable, frozen_head), feats)

    def logits(
        self,
        backbone: PyTree,
        trainable: PyTree,
        images: jax.Array,
        num_active: int,
        *,
        frozen_head: PyTree | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The SAL forward: images [B, H, W, C] float (tokens [B, T, D] for a tokens-input
        spec) -> logits [B, C]."""
        chex.assert_rank(images, 3 if self.spec.input == "tokens" else 4)
        branch = self.trunk(backbone, images, num_active)
        return self.logits_from_branch(
            backbone, trainable, branch.hidden, num_active, frozen_head=frozen_head, rng=rng
        )

    def head_params(self, trainable: PyTree, frozen_head: PyTree | None) -> PyTree:
        if self.tune_head:
            return trainable["head"]
        if frozen_head is None:
            raise ValueError("this expert's head is frozen: pass frozen_head")
        return frozen_head
