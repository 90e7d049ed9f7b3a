"""Checkpoint loading: file formats, key spellings, error reporting, export round trips.

All checkpoints are tiny random models written by transformers into temporary directories. No
test touches the network: the module runs with the hub client offline and socket connections
refused, and the hub-id test asserts that no connection was even attempted.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import torch  # the README test command installs it; a missing torch must fail, not skip
import transformers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fedms_jax.models.hf import (  # noqa: E402
    HubUnavailableError,
    load_pretrained,
    resize_pos_embed,
    save_pretrained,
    to_hf_state_dict,
)

VIT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4)

pytestmark = pytest.mark.usefixtures("no_network")


# ----------------------------------------------------------------------------- helpers


def _perturb_small_tensors(model: "torch.nn.Module", seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _assert_same_params(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype == np.float32, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _vit_outputs(pt, x: np.ndarray) -> dict[str, np.ndarray]:
    def f(m, images):
        h = m.hidden_states(images)
        return {"last_hidden_state": m.final_ln(h), "pooler_output": m.pooler_output(h)}

    out = pt.module().apply({"params": pt.params}, jnp.asarray(x), method=f)
    return {k: np.asarray(v) for k, v in out.items()}


def _write_ckpt(directory: Path, config: dict, state: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(dir, torch model, on-disk state dict, config dict, loaded Pretrained) of a tiny ViTModel."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VIT_KW)).eval()
    _perturb_small_tensors(model, seed=10)
    d = tmp_path_factory.mktemp("vit")
    model.save_pretrained(str(d))
    state = load_file(str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    return d, model, state, config, load_pretrained(d)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=16,
                         eos_token_id=99, bos_token_id=98, pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=4),
        projection_dim=24,
    )
    model = transformers.CLIPModel(cfg).eval()
    _perturb_small_tensors(model, seed=11)
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(str(d))
    return d, model, load_file(str(d / "model.safetensors")), load_pretrained(d)


def test_fixture_checkpoint_uses_hub_key_spellings(vit):
    """The on-disk keys are the hub spellings the loader documents (not transformers' internal)."""
    _, _, state, _, pt = vit
    assert "encoder.layer.0.attention.attention.query.weight" in state
    assert "pooler.dense.weight" in state
    assert pt.spec.pooler
    assert pt.params["encoder"]["blocks_0"]["attn"]["q"]["kernel"].shape == (32, 32)
    np.testing.assert_array_equal(
        pt.params["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"],
        state["encoder.layer.1.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        pt.params["patch_embed"]["kernel"],
        state["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
    )


# ----------------------------------------------------------------------------- bad inputs


def test_tensor_shape_disagreeing_with_config_names_the_key(vit, tmp_path):
    _, _, state, config, _ = vit
    key = "encoder.layer.1.attention.attention.query.weight"
    bad = dict(state)
    bad[key] = np.zeros((24, 32), np.float32)
    d = _write_ckpt(tmp_path / "bad_q", config, bad)
    with pytest.raises(ValueError, match=re.escape(key)) as e:
        load_pretrained(d)
    assert "(24, 32)" in str(e.value)  # the offending shape is reported


def test_config_hidden_size_disagreeing_with_tensors(vit, tmp_path):
    _, _, state, config, _ = vit
    d = _write_ckpt(tmp_path / "bad_hidden", {**config, "hidden_size": 48}, state)
    with pytest.raises(ValueError, match=r"checkpoint tensor '[\w.]+' has shape .*config\.json") as e:
        load_pretrained(d)
    assert "embeddings.patch_embeddings.projection.weight" in str(e.value)


def test_config_intermediate_size_disagreeing_with_tensors(vit, tmp_path):
    _, _, state, config, _ = vit
    d = _write_ckpt(tmp_path / "bad_mlp", {**config, "intermediate_size": 80}, state)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight"):
        load_pretrained(d)


def test_missing_tensor_is_named(vit, tmp_path):
    _, _, state, config, _ = vit
    key = "encoder.layer.0.output.dense.bias"
    d = _write_ckpt(tmp_path / "missing", config, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=re.escape(key)) as e:
        load_pretrained(d)
    assert "lacks 1 tensor" in str(e.value)


def test_config_with_more_layers_than_the_weights(vit, tmp_path):
    _, _, state, config, _ = vit
    d = _write_ckpt(tmp_path / "deeper", {**config, "num_hidden_layers": 3}, state)
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\."):
        load_pretrained(d)


def test_unsupported_model_type(vit, tmp_path):
    _, _, state, _, _ = vit
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)
    d = _write_ckpt(tmp_path / "bert", bert.to_dict(), state)
    with pytest.raises(ValueError, match="'bert'"):
        load_pretrained(d)


def test_unsupported_activation(vit, tmp_path):
    _, _, state, config, _ = vit
    d = _write_ckpt(tmp_path / "act", {**config, "hidden_act": "mish"}, state)
    with pytest.raises(ValueError, match="mish"):
        load_pretrained(d)


def test_missing_directory_and_files(vit, tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_pretrained(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_pretrained(str(tmp_path / "does_not_exist" / "deeper"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(empty)
    _, _, _, config, _ = vit
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(empty)


@pytest.mark.parametrize("image_size", [18, 30])
def test_image_size_not_divisible_by_patch(vit, image_size):
    d = vit[0]
    with pytest.raises(ValueError, match=rf"{image_size}.*patch_size 4"):
        load_pretrained(d, image_size=image_size)


def test_resize_pos_embed_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(np.zeros((1 + 12, 4), np.float32), 4)


def test_hub_id_offline_raises_hub_unavailable(monkeypatch, tmp_path, no_network):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # An empty cache: nothing previously downloaded can satisfy the request.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)  # so the relative id cannot name a local directory
    before = len(no_network)
    repo = "fedms-jax-tests/no-such-model"
    with pytest.raises(HubUnavailableError, match=re.escape(repo)) as e:
        load_pretrained(repo)
    assert isinstance(e.value, OSError)
    assert "local directory" in str(e.value)  # tells the user what to do instead
    assert len(no_network) == before, "a network connection was attempted"


# ----------------------------------------------------------------------------- other file layouts


def test_pytorch_model_bin(vit, tmp_path):
    """A legacy pytorch_model.bin (hub key spellings) loads the same params and matches HF."""
    _, model, state, config, pt = vit
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, d / "pytorch_model.bin")
    assert not list(d.glob("*.safetensors"))
    from_bin = load_pretrained(d)
    _assert_same_params(from_bin.params, pt.params)

    x = _images(2, 16, seed=0)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(x))
    got = _vit_outputs(from_bin, x)
    np.testing.assert_allclose(got["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["pooler_output"], ref.pooler_output.numpy(), atol=1e-4)


def test_sharded_pytorch_model_bin(vit, tmp_path):
    _, _, state, config, pt = vit
    d = tmp_path / "bin_sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
              "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: torch.from_numpy(state[k].copy()) for k in ks}, d / name)
        weight_map.update({k: name for k in ks})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_params(load_pretrained(d).params, pt.params)


def test_half_precision_bin_is_upcast(vit, tmp_path):
    _, _, state, config, pt = vit
    d = tmp_path / "bin_fp16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    torch.save({k: torch.from_numpy(v.copy()).half() for k, v in state.items()},
               d / "pytorch_model.bin")
    half = load_pretrained(d)
    want = jax.tree.map(lambda a: a.astype(np.float16).astype(np.float32), pt.params)
    _assert_same_params(half.params, want)


def test_legacy_gamma_beta_layernorm_names(vit, tmp_path):
    _, _, state, config, pt = vit
    renamed = {}
    for k, v in state.items():
        if "layernorm" in k:
            k = re.sub(r"\.weight$", ".gamma", re.sub(r"\.bias$", ".beta", k))
        renamed[k] = v
    assert "layernorm.gamma" in renamed and "encoder.layer.0.layernorm_before.beta" in renamed
    assert sum(k.endswith((".gamma", ".beta")) for k in renamed) == 2 * (2 * 2 + 1)
    d = _write_ckpt(tmp_path / "gamma_beta", config, renamed)
    _assert_same_params(load_pretrained(d).params, pt.params)


def test_sharded_safetensors(vit, tmp_path):
    _, model, _, _, pt = vit
    d = tmp_path / "sharded"
    model.save_pretrained(str(d), max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    assert not (d / "model.safetensors").exists()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    _assert_same_params(load_pretrained(d).params, pt.params)


def test_task_model_prefix_is_stripped(vit, tmp_path):
    """'vit.'-prefixed keys plus a classifier (ViTForImageClassification layout) load the same."""
    _, _, state, config, pt = vit
    prefixed = {"vit." + k: v for k, v in state.items() if not k.startswith("pooler.")}
    prefixed["classifier.weight"] = np.ones((3, 32), np.float32)
    prefixed["classifier.bias"] = np.zeros((3,), np.float32)
    d = _write_ckpt(tmp_path / "prefixed", config, prefixed)
    loaded = load_pretrained(d)
    assert not loaded.spec.pooler
    want = {k: v for k, v in pt.params.items() if k != "pooler"}
    _assert_same_params(loaded.params, want)


# ----------------------------------------------------------------------------- export


def test_to_hf_state_dict_is_the_exact_inverse_vit(vit):
    _, _, state, _, pt = vit
    exported = to_hf_state_dict(pt.spec, pt.params)
    assert sorted(exported) == sorted(state)
    for k, v in state.items():
        assert exported[k].shape == v.shape and exported[k].dtype == v.dtype, k
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_to_hf_state_dict_is_the_exact_inverse_clip(clip):
    _, _, state, pt = clip
    exported = to_hf_state_dict(pt.spec, pt.params)
    assert sorted(exported) == sorted(state)
    assert state["logit_scale"].shape == ()  # a 0-d tensor must stay 0-d
    for k, v in state.items():
        assert exported[k].shape == v.shape and exported[k].dtype == v.dtype, k
        assert exported[k].flags.c_contiguous, k
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_save_pretrained_clip_round_trip(clip, tmp_path):
    _, model, _, pt = clip
    out = save_pretrained(pt, pt.params, tmp_path / "export_clip")
    _assert_same_params(load_pretrained(out).params, pt.params)
    reloaded = transformers.CLIPModel.from_pretrained(str(out)).eval()
    want, got = model.state_dict(), reloaded.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_save_pretrained_round_trip_through_transformers(vit, tmp_path):
    d, model, _, config, pt = vit
    out = save_pretrained(pt, pt.params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == config["hidden_size"]
    reloaded = transformers.ViTModel.from_pretrained(str(out)).eval()
    x = _images(2, 16, seed=1)
    with torch.no_grad():
        ref, got = model(pixel_values=_nchw(x)), reloaded(pixel_values=_nchw(x))
    # Identical weights in identical torch code: bit-identical outputs.
    assert torch.equal(got.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(got.pooler_output, ref.pooler_output)
    _assert_same_params(load_pretrained(out).params, pt.params)


def test_save_pretrained_exports_modified_params(vit, tmp_path):
    """Changed Flax params (e.g. merged LoRA) reach transformers: HF forward = Flax forward."""
    _, _, _, _, pt = vit
    key = jax.random.key(3)
    leaves, treedef = jax.tree_util.tree_flatten(pt.params)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [
        np.asarray(x + 0.02 * jax.random.normal(k, x.shape), np.float32)
        for k, x in zip(keys, leaves)
    ])
    out = save_pretrained(pt, params, tmp_path / "export_modified")
    reloaded = transformers.ViTModel.from_pretrained(str(out)).eval()
    x = _images(2, 16, seed=2)
    with torch.no_grad():
        ref = reloaded(pixel_values=_nchw(x))
    modified = load_pretrained(out)
    _assert_same_params(modified.params, params)
    got = _vit_outputs(modified, x)
    before = _vit_outputs(pt, x)
    assert np.abs(got["pooler_output"] - before["pooler_output"]).max() > 1e-3
    np.testing.assert_allclose(got["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["pooler_output"], ref.pooler_output.numpy(), atol=1e-4)


def test_save_pretrained_after_resize_round_trip(vit, tmp_path):
    """Resized position embeddings are saved with a config that says so; HF and we reload them."""
    d, model, _, config, _ = vit
    pt = load_pretrained(d, image_size=24)
    out = save_pretrained(pt, pt.params, tmp_path / "export_resized")
    assert json.loads((out / "config.json").read_text())["image_size"] == 24
    assert pt.hf_config.image_size == config["image_size"] == 16  # the loaded config is untouched
    again = load_pretrained(out)
    assert again.spec.image_size == 24
    _assert_same_params(again.params, pt.params)

    reloaded = transformers.ViTModel.from_pretrained(str(out)).eval()
    x = _images(2, 24, seed=3)
    with torch.no_grad():
        ref = reloaded(pixel_values=_nchw(x))
        interpolated = model(pixel_values=_nchw(x), interpolate_pos_encoding=True)
    got = _vit_outputs(again, x)
    np.testing.assert_allclose(got["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["pooler_output"], ref.pooler_output.numpy(), atol=1e-4)
    # ... and both equal the original model run with HF's own interpolation at 24x24.
    np.testing.assert_allclose(ref.last_hidden_state.numpy(),
                               interpolated.last_hidden_state.numpy(), atol=1e-4)


def test_save_pretrained_after_resize_round_trip_clip(clip, tmp_path):
    d, _, _, _ = clip
    pt = load_pretrained(d, image_size=24)
    out = save_pretrained(pt, pt.params, tmp_path / "export_clip_resized")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 24
    again = load_pretrained(out)
    assert again.spec.vision.image_size == 24
    _assert_same_params(again.params, pt.params)
