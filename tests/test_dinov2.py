"""DINOv2 backbones: parity with transformers' PyTorch ``Dinov2Model``, export, variants refused.

Every model has random weights (fixed seeds) with its small tensors (biases, LayerNorms, LayerScale
``lambda1``, position embeddings) moved off their initial values, is written with transformers'
``save_pretrained``, read with ``load_pretrained`` and compared with the PyTorch forward of the very
same model object. No test touches the network.
"""
from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp

from fedms_jax.federated import sharding
from fedms_jax.models.hf import load_pretrained, save_pretrained, to_hf_state_dict
from fedms_jax.models.lora import LoRASpec, merge_lora
from fedms_jax.models.vision import VisionSpec

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("no_network")

# 518 px would be the real checkpoints' grid (37 x 37); a 5 x 5 grid at 70 px keeps this fast.
DINO_KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=4,
               image_size=70, patch_size=14, layerscale_value=0.5)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _close(name: str, got, want, atol: float = ATOL) -> float:
    got = np.asarray(got, np.float64)
    want = want.detach().numpy().astype(np.float64) if isinstance(want, torch.Tensor) else np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.abs(want).max() > 1e-2, name  # a trivial reference proves nothing
    diff = float(np.abs(got - want).max())
    print(f"\n[dinov2-parity] max|flax - torch| {name}: {diff:.3e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
    return diff


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "position_embeddings" in name or "cls_token" in name or "mask_token" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    torch.manual_seed(3)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**DINO_KW)).eval()
    _perturb(model, seed=103)
    d = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(str(d))
    return d, model


def _flax_outputs(pt, x: np.ndarray) -> dict[str, np.ndarray]:
    def f(m, images):
        h = m.hidden_states(images)
        return {"last_hidden_state": m.final_ln(h), "features": m.pool(h)}

    out = pt.module().apply({"params": pt.params}, jnp.asarray(x), method=f)
    return {k: np.asarray(v) for k, v in out.items()}


def _linear_input(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """Dinov2ForImageClassification's classifier input: [CLS] ⊕ mean of the patch tokens."""
    return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(dim=1)], dim=1)


@pytest.mark.parametrize("size", [70, 42, 98])
def test_dinov2_matches_hf_native_and_interpolated(dino, size):
    """At the native grid and at smaller / larger inputs (HF interpolates the position
    embeddings at run time; we resize them once at load time)."""
    d, model = dino
    pt = load_pretrained(d, image_size=None if size == 70 else size)
    assert pt.kind == "dinov2" and pt.spec.flavor == "dinov2" and not pt.spec.pooler
    assert pt.spec.image_size == size and pt.spec.feature_dim == 64
    assert pt.params["pos_embed"].shape == ((size // 14) ** 2 + 1, 32)
    x = _images(2, size, seed=size)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(x)).last_hidden_state
    got = _flax_outputs(pt, x)
    _close(f"dinov2@{size}/last_hidden_state", got["last_hidden_state"], ref)
    _close(f"dinov2@{size}/head_input", got["features"], _linear_input(ref))


def test_dinov2_image_classification_checkpoint_and_head_convention(tmp_path):
    """'dinov2.'-prefixed keys and a classifier: logits = a linear layer on our features."""
    torch.manual_seed(4)
    model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**DINO_KW, num_labels=3)).eval()
    _perturb(model, seed=104)
    model.save_pretrained(str(tmp_path))
    pt = load_pretrained(tmp_path)
    x = _images(3, 70, seed=5)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(x)).logits
    feats = _flax_outputs(pt, x)["features"]
    w, b = model.classifier.weight.detach().numpy(), model.classifier.bias.detach().numpy()
    _close("dinov2_cls/logits", feats @ w.T + b, ref)


def test_dinov2_export_round_trip_loads_in_transformers(dino, tmp_path):
    """Load (resized to 42 px), merge a trained LoRA, export: transformers loads it with no
    missing or unexpected keys and its forward equals ours with the LoRA applied."""
    d, model = dino
    pt = load_pretrained(d, image_size=42)
    np.testing.assert_array_equal(pt.extras["embeddings.mask_token"],
                                  model.embeddings.mask_token.detach().numpy())
    lora_spec = LoRASpec(rank=2, alpha=4.0, targets=("q", "v", "fc2"))
    module = pt.module(lora_spec)
    x = jnp.asarray(_images(2, 42, seed=7))
    lora = module.init(jax.random.key(0), x)["lora"]
    lora = jax.tree_util.tree_map(lambda a: a + 0.05, lora)  # B != 0: the adapter matters
    want = module.apply({"params": pt.params, "lora": lora}, x).features
    merged = merge_lora(pt.params, lora, lora_spec)
    out = save_pretrained(pt, merged, tmp_path / "export")
    back, info = transformers.Dinov2Model.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert json.loads((out / "config.json").read_text())["image_size"] == 42
    with torch.no_grad():
        ref = back.eval()(pixel_values=_nchw(np.asarray(x))).last_hidden_state
    _close("dinov2_export/head_input", want, _linear_input(ref), atol=3e-5)
    # And our own loader reads the export back exactly.
    again = load_pretrained(out)
    for key, value in to_hf_state_dict(pt.spec, merged).items():
        np.testing.assert_array_equal(to_hf_state_dict(again.spec, again.params)[key], value, err_msg=key)


def test_dinov2_swiglu_and_unbiased_qkv_are_refused(tmp_path):
    cfg = transformers.Dinov2Config(**DINO_KW, use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        VisionSpec.from_hf(cfg)
    transformers.Dinov2Model(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="use_swiglu_ffn = True"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="qkv_bias"):
        VisionSpec.from_hf(transformers.Dinov2Config(**DINO_KW, qkv_bias=False))


def test_dinov2_sal_trunk_top_and_sharding_rules(dino):
    """SAL on DINOv2: trunk + top at every k equals the full LoRA forward, the backbone
    gets no gradient and LoRA below the branch point none either; every sharding strategy has
    a valid spec for every leaf (LayerScale vectors included)."""
    d, _ = dino
    pt = load_pretrained(d)
    lora_spec = LoRASpec(rank=2, alpha=4.0, targets=("q", "k", "v", "o", "fc1", "fc2"))
    module = pt.module(lora_spec)
    x = jnp.asarray(_images(2, 70, seed=9))
    lora = jax.tree_util.tree_map(lambda a: a + 0.05, module.init(jax.random.key(1), x)["lora"])
    variables = {"params": pt.params, "lora": lora}
    L = pt.spec.num_layers
    for k in range(L + 1):
        def loss(lo, k=k):
            out = module.apply({"params": pt.params, "lora": lo}, x, k)
            return jnp.sum(out.features ** 2), out.features
        (_, feats), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        # Reference: all L blocks with LoRA, the adapters below the top k zeroed.
        masked = {"encoder": {
            name: (blk if int(name.split("_")[1]) >= L - k else jax.tree_util.tree_map(jnp.zeros_like, blk))
            for name, blk in lora["encoder"].items()}}
        want = module.apply({"params": pt.params, "lora": masked}, x).features
        np.testing.assert_allclose(np.asarray(feats), np.asarray(want), rtol=0, atol=1e-5)
        for name, blk in grads["encoder"].items():
            active = int(name.split("_")[1]) >= L - k
            norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(blk))
            assert (norm > 0) == active, (k, name, norm)
    assert module.apply(variables, x).features.shape == (2, 2 * 32)
    for strategy in sharding.STRATEGIES:
        specs = sharding.partition_specs(pt.params, strategy, model_size=2)
        assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(pt.params)


def test_fedms_runs_on_a_dinov2_checkpoint_and_idx_files_and_plans(dino, tmp_path):
    """End to end offline: IDX files + a DINOv2 directory through `run` (both FedMS stages, the
    DINOv2 head, SAL levels 1 and 2) and `fedms-jax plan` on the same config."""
    import struct

    from fed_helpers import tiny_config

    from fedms_jax import plan
    from fedms_jax.run import run

    d, _ = dino
    rng = np.random.default_rng(0)
    data = tmp_path / "idx"
    data.mkdir()
    for split, n in (("train", 160), ("t10k", 40)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 4)):
            arr = np.asarray(arr, np.uint8)
            header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
            (data / f"{split}-{kind}-ubyte").write_bytes(header + arr.tobytes())
    config = tiny_config("algorithm=fedms", "rounds=2", "stage1_rounds=1", "sal.k0=1", "sal.every=1",
                         f"model.pretrained={d}", "model.image_size=28", "data.name=idx",
                         f"data.data_dir={data}", "data.train_examples=120", "data.test_examples=32")
    out = run(config, tmp_path / "work", progress=False)
    m = out.metrics
    assert m["stage"] == 2 and m["active_blocks"] == 2 and np.isfinite(m["loss"])
    assert 0.0 <= m["personalized_accuracy"] <= 1.0 and 0.0 <= m["gate_local_weight"] <= 1.0
    b = out.experiment
    assert b.settings.expert.spec.flavor == "dinov2" and b.settings.expert.spec.feature_dim == 64
    assert len(b.train) == 120 and len(b.test) == 32
    assert b.settings.stats == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv2's processor
    rows = plan.plan(config, [plan.Layout(1, 1, "replicated")])
    assert rows and "error" not in rows[0] and rows[0]["backbone_mb"] > 0
    # The backbone's depth is known once it is loaded: a k0 beyond it is a config error then.
    from fedms_jax.config import ConfigError
    from fedms_jax.run import build

    depth = DINO_KW["num_hidden_layers"]
    deeper = dataclasses.replace(config, sal=dataclasses.replace(config.sal, k0=depth + 1))
    with pytest.raises(ConfigError, match=rf"config.sal.k0 = {depth + 1}: must be <= the {depth} blocks of model.pretrained"):
        build(deeper)
