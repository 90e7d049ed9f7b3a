"""Loading (and exporting) Hugging Face ViT, CLIP and DINOv2 checkpoints.

``load_pretrained(name_or_path)`` reads ``config.json`` and the weights (``model.safetensors``,
sharded safetensors with an index, or ``pytorch_model.bin`` -- torch is imported only for that
last case) from a local directory, or downloads them from the hub when given a hub id. The key
spellings are those of hub checkpoints and of ``save_pretrained`` (``encoder.layer.0.attention.
attention.query.weight``, ``vision_model.encoder.layers.0.self_attn.q_proj.weight``), with or
without a task-model prefix (``vit.``, ``dinov2.``), and the legacy LayerNorm ``gamma``/``beta``.
DINOv2's ``embeddings.mask_token`` (used only in self-supervised pre-training) is not part of the
Flax model; it is carried through unchanged so an export loads with no missing keys.

One table of ``(flax path, HF key, transform)`` rows drives both directions, so
``to_hf_state_dict`` (export, e.g. after ``merge_lora``) is the exact inverse of loading.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from fedms_jax.models.clip import CLIP, CLIPSpec
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.pos_embed import resize_pos_embed
from fedms_jax.models.vision import VisionSpec, VisionTransformer

__all__ = ["CheckpointError", "HubUnavailableError", "Pretrained", "load_pretrained", "resize_pos_embed",
           "resolve_checkpoint", "save_pretrained", "to_hf_state_dict"]

Kind = Literal["vit", "clip", "dinov2"]
Transform = Literal["linear", "conv", "copy", "squeeze"]

_HUB_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
]


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not describe a model we can load."""


class HubUnavailableError(OSError):
    """A hub id was given but the checkpoint could not be fetched (offline, or no such repo)."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint.

    Attributes:
      kind: 'vit', 'clip' or 'dinov2'.
      spec: VisionSpec (vit, dinov2) or CLIPSpec (clip), built from the checkpoint's config.json.
      params: the Flax 'params' tree of ``module()`` (numpy float32 arrays).
      path: the local directory it was read from (holds the tokenizer for CLIP).
      hf_config: the transformers config object.
      extras: checkpoint tensors the Flax model does not use (DINOv2's ``embeddings.mask_token``),
        by HF key, written back unchanged by ``save_pretrained``.
    """

    kind: Kind
    spec: VisionSpec | CLIPSpec
    params: dict
    path: Path
    hf_config: Any
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def vision_spec(self) -> VisionSpec:
        return self.spec.vision if isinstance(self.spec, CLIPSpec) else self.spec

    @property
    def vision_params(self) -> dict:
        return self.params["vision"] if self.kind == "clip" else self.params

    def module(self, lora: LoRASpec | None = None, dtype: Any = np.float32) -> Any:
        if self.kind == "clip":
            return CLIP(self.spec, lora, dtype)
        return VisionTransformer(self.spec, lora, dtype)

    def vision_module(self, lora: LoRASpec | None = None, dtype: Any = np.float32) -> VisionTransformer:
        return VisionTransformer(self.vision_spec, lora, dtype)


# ----------------------------------------------------------------------------- key tables


@dataclasses.dataclass(frozen=True)
class _Row:
    path: tuple[str, ...]
    key: str
    transform: Transform


def _dense(path: tuple[str, ...], key: str, bias: bool = True) -> list[_Row]:
    rows = [_Row(path + ("kernel",), key + ".weight", "linear")]
    if bias:
        rows.append(_Row(path + ("bias",), key + ".bias", "copy"))
    return rows


def _ln(path: tuple[str, ...], key: str) -> list[_Row]:
    return [_Row(path + ("scale",), key + ".weight", "copy"), _Row(path + ("bias",), key + ".bias", "copy")]


# Per flavor: the HF key of block i (before the role), and the HF name of each role in a block.
_ATTN_VIT = {"q": "attention.attention.query", "k": "attention.attention.key",
             "v": "attention.attention.value", "o": "attention.output.dense"}
_BLOCK_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "vit": ("encoder.layer.{i}.", {"ln1": "layernorm_before", "ln2": "layernorm_after", **_ATTN_VIT,
                                   "fc1": "intermediate.dense", "fc2": "output.dense"}),
    "dinov2": ("encoder.layer.{i}.", {"ln1": "norm1", "ln2": "norm2", **_ATTN_VIT,
                                      "fc1": "mlp.fc1", "fc2": "mlp.fc2"}),
    "clip": ("encoder.layers.{i}.", {"ln1": "layer_norm1", "ln2": "layer_norm2", "q": "self_attn.q_proj",
                                     "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
                                     "fc1": "mlp.fc1", "fc2": "mlp.fc2"}),
}


def _blocks(root: tuple[str, ...], prefix: str, num_layers: int, flavor: Kind) -> list[_Row]:
    rows: list[_Row] = []
    block_key, names = _BLOCK_KEYS[flavor]
    for i in range(num_layers):
        b = root + ("encoder", "blocks_%d" % i)
        k = prefix + block_key.format(i=i)
        if flavor == "dinov2":  # LayerScale
            rows += [_Row(b + (f"layer_scale{j}",), f"{k}layer_scale{j}.lambda1", "copy") for j in (1, 2)]
        rows += _ln(b + ("ln1",), k + names["ln1"]) + _ln(b + ("ln2",), k + names["ln2"])
        for n in ("q", "k", "v", "o"):
            rows += _dense(b + ("attn", n), k + names[n])
        for n in ("fc1", "fc2"):
            rows += _dense(b + ("mlp", n), k + names[n])
    return rows


def _vision_rows(spec: VisionSpec, root: tuple[str, ...]) -> list[_Row]:
    L = spec.num_layers
    if spec.flavor in ("vit", "dinov2"):
        rows = [
            _Row(root + ("patch_embed", "kernel"), "embeddings.patch_embeddings.projection.weight", "conv"),
            _Row(root + ("patch_embed", "bias"), "embeddings.patch_embeddings.projection.bias", "copy"),
            _Row(root + ("cls_token",), "embeddings.cls_token", "squeeze"),
            _Row(root + ("pos_embed",), "embeddings.position_embeddings", "squeeze"),
        ]
        rows += _blocks(root, "", L, spec.flavor) + _ln(root + ("final_ln",), "layernorm")
        if spec.pooler:
            rows += _dense(root + ("pooler",), "pooler.dense")
        return rows
    p = "vision_model."
    rows = [
        _Row(root + ("patch_embed", "kernel"), p + "embeddings.patch_embedding.weight", "conv"),
        _Row(root + ("cls_token",), p + "embeddings.class_embedding", "copy"),
        _Row(root + ("pos_embed",), p + "embeddings.position_embedding.weight", "copy"),
    ]
    rows += _ln(root + ("pre_ln",), p + "pre_layrnorm")
    rows += _blocks(root, p, L, "clip") + _ln(root + ("final_ln",), p + "post_layernorm")
    rows += _dense(root + ("projection",), "visual_projection", bias=False)
    return rows


def _rows(spec: VisionSpec | CLIPSpec) -> list[_Row]:
    if isinstance(spec, VisionSpec):
        return _vision_rows(spec, ())
    t = "text_model."
    rows = _vision_rows(spec.vision, ("vision",))
    rows += [
        _Row(("text", "token_embed", "embedding"), t + "embeddings.token_embedding.weight", "copy"),
        _Row(("text", "pos_embed"), t + "embeddings.position_embedding.weight", "copy"),
    ]
    rows += _blocks(("text",), t, spec.text.encoder.num_layers, "clip")
    rows += _ln(("text", "final_ln"), t + "final_layer_norm")
    rows += _dense(("text", "projection"), "text_projection", bias=False)
    rows.append(_Row(("logit_scale",), "logit_scale", "copy"))
    return rows


def _to_flax(x: np.ndarray, transform: Transform, shape: tuple[int, ...]) -> np.ndarray:
    if transform == "linear":
        x = x.T
    elif transform == "conv":
        x = x.transpose(2, 3, 1, 0)  # torch OIHW -> flax HWIO
    elif transform == "squeeze":
        while x.ndim > len(shape) and x.shape[0] == 1:  # HF keeps [1, 1, D] / [1, T, D]
            x = x[0]
    return x


def _to_hf(x: np.ndarray, transform: Transform) -> np.ndarray:
    if transform == "linear":
        return x.T
    if transform == "conv":
        return x.transpose(3, 2, 0, 1)
    if transform == "squeeze":
        return x.reshape((1,) * (3 - x.ndim) + x.shape)
    return x


# Checkpoint tensors with no place in the Flax model, carried through to export.
_EXTRAS: dict[str, tuple[str, ...]] = {"dinov2": ("embeddings.mask_token",)}


# ----------------------------------------------------------------------------- reading files


def _normalise_key(key: str) -> str:
    key = re.sub(r"\.gamma$", ".weight", key)
    return re.sub(r"\.beta$", ".bias", key)


def _shards(path: Path, index: Path) -> list[Path]:
    """The shard files an ``*.index.json`` names: plain file names inside ``path`` only (a name
    with a directory part, ``..`` or a link out of the checkpoint directory is refused)."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    root = path.resolve()
    out = []
    for name in names:
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{index} names the shard {name!r}: shards must be file names inside {path}")
        shard = (path / name).resolve()
        if shard.parent != root:
            raise CheckpointError(f"{index} names the shard {name!r}, which resolves to {shard}, outside {path}")
        out.append(shard)
    return out


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return dict(load_file(str(single)))
    if index.exists():
        out: dict[str, np.ndarray] = {}
        for shard in _shards(path, index):
            out.update(load_file(str(shard)))
        return out
    bins = [path / "pytorch_model.bin"]
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.exists():
        bins = _shards(path, bin_index)
    if bins[0].exists():
        import torch  # only for legacy .bin checkpoints

        out = {}
        for b in bins:
            sd = torch.load(str(b), map_location="cpu", weights_only=True)
            out.update({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()})
        return out
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin"
    )


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (config, weights, tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS + ["pytorch_model*.bin*"]))
        return local
    except Exception as e:  # the hub client raises many types for "offline" / "not found"
        raise HubUnavailableError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, download the checkpoint elsewhere and pass its local "
            "directory (config.json + model.safetensors)."
        ) from e


def _kind_of(config: Any) -> Kind:
    model_type = getattr(config, "model_type", None)
    if model_type == "vit":
        return "vit"
    if model_type in ("clip", "dinov2"):
        return model_type
    raise CheckpointError(f"config.json model_type must be 'vit', 'clip' or 'dinov2', got {model_type!r}")


def _strip_prefix(state: dict[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
    """Finds the task-model prefix ('' or e.g. 'vit.') under which the wanted keys live."""
    for prefix in ("", "vit.", "dinov2.", "model.", "clip."):
        hits = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k in wanted for k in hits):
            return hits
    return state


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _expected_shapes(spec: VisionSpec | CLIPSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
    module = CLIP(spec) if isinstance(spec, CLIPSpec) else VisionTransformer(spec)
    vis = spec.vision if isinstance(spec, CLIPSpec) else spec
    images = jax.ShapeDtypeStruct((1, vis.image_size, vis.image_size, vis.num_channels), np.float32)
    if isinstance(spec, CLIPSpec):
        ids = jax.ShapeDtypeStruct((1, 4), np.int32)
        shapes = jax.eval_shape(module.init, jax.random.key(0), images, ids)
    else:
        init = lambda rng, x: module.init(rng, x, method=VisionTransformer.init_all)
        shapes = jax.eval_shape(init, jax.random.key(0), images)
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_pretrained(
    name_or_path: str | os.PathLike, *, image_size: int | None = None
) -> Pretrained:
    """Loads a ViT, CLIP or DINOv2 checkpoint into this package's Flax parameter tree.

    Args:
      name_or_path: a local directory (config.json + weights) or a hub id such as
        'openai/clip-vit-base-patch32' or 'facebook/dinov2-small'.
      image_size: resize the position embeddings for this input size (bicubic, as HF's
        ``interpolate_pos_encoding``); default: the checkpoint's own.

    Raises:
      ValueError: a checkpoint whose tensors disagree with its config (names key and shapes),
        missing tensors, an unsupported model type or variant (DINOv2 with SwiGLU).
      HubUnavailableError: a hub id that cannot be fetched (e.g. offline).
    """
    from transformers import AutoConfig

    path = resolve_checkpoint(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json")
    hf_config = AutoConfig.from_pretrained(str(path))
    kind = _kind_of(hf_config)
    native = VisionSpec.from_hf(hf_config)
    if image_size is not None and image_size % native.patch_size:
        raise ValueError(f"image_size {image_size} must be divisible by the checkpoint's "
                          f"patch_size {native.patch_size} ({path})")
    spec: VisionSpec | CLIPSpec
    if kind == "clip":
        spec = CLIPSpec.from_hf(hf_config, image_size=image_size)
    else:
        spec = VisionSpec.from_hf(hf_config, image_size=image_size, pooler=kind == "vit")
    state = {_normalise_key(k): v for k, v in _read_state_dict(path).items()}
    rows = _rows(spec)
    state = _strip_prefix(state, {r.key for r in rows})
    if kind == "vit" and "pooler.dense.weight" not in state:
        spec = dataclasses.replace(spec, pooler=False)
        rows = _rows(spec)
    expected = _expected_shapes(spec)
    vis = spec.vision if isinstance(spec, CLIPSpec) else spec
    missing = [r.key for r in rows if r.key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) its config implies, e.g. {missing[:3]}"
        )
    params: dict = {}
    for row in rows:
        x = np.asarray(state[row.key])
        want = expected[row.path]
        x = _to_flax(x, row.transform, want)
        if row.path[-1] == "pos_embed" and row.path[-2:-1] != ("text",) and x.ndim == 2:
            if x.shape[0] != want[0] and x.shape[0] == native.num_patches + 1:
                x = resize_pos_embed(x, vis.image_size // vis.patch_size)
        if tuple(x.shape) != want:
            raise CheckpointError(
                f"checkpoint tensor {row.key!r} has shape {tuple(np.asarray(state[row.key]).shape)}, "
                f"but config.json implies {want} (as Flax {'/'.join(row.path)})"
            )
        _set(params, row.path, x.astype(np.float32))
    extras = {k: np.asarray(state[k]) for k in _EXTRAS.get(kind, ()) if k in state}
    return Pretrained(kind=kind, spec=spec, params=params, path=path, hf_config=hf_config, extras=extras)


def to_hf_state_dict(spec: VisionSpec | CLIPSpec, params: Any) -> dict[str, np.ndarray]:
    """The inverse of loading: a Flax params tree -> HF state dict (numpy, HF key spellings)."""
    return {
        # np.array(order='C'), not ascontiguousarray: the latter turns 0-d logit_scale into [1].
        row.key: np.array(_to_hf(np.asarray(_get(params, row.path)), row.transform), order="C")
        for row in _rows(spec)
    }


def save_pretrained(pretrained: Pretrained, params: Any, directory: str | os.PathLike) -> Path:
    """Writes config.json + model.safetensors loadable by transformers (e.g. merged LoRA)."""
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    state = {**to_hf_state_dict(pretrained.spec, params), **pretrained.extras}
    save_file(state, str(tmp), metadata={"format": "pt"})
    config = copy.deepcopy(pretrained.hf_config)
    # Position embeddings may have been resized at load time: the config must say so.
    vision_config = config.vision_config if pretrained.kind == "clip" else config
    vision_config.image_size = pretrained.vision_spec.image_size
    config.save_pretrained(str(out))
    os.replace(tmp, out / "model.safetensors")
    return out
