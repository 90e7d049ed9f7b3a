"""``model.frozen_blocks``: the bottom F blocks run once per image (the frozen stem), the
federated model is the top L - F blocks on the stem's tokens, and ``data.feature_cache`` keeps
the tokens on disk.

(a) stem + top = the full model's SAL forward at every level k <= L - F; (b) the cache: read on
a second use, keyed by images and backbone, never half-written, recomputed when damaged;
(c) config errors, before anything compiles and, for a checkpoint, once its depth is known;
(d) a short run on a tiny pretrained DINOv2 with frozen blocks trains and writes metrics.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize_lora, tiny_vision_spec
from fed_helpers import tiny_config
from fedms_jax.federated import protocol
from fedms_jax.builders import Built, split_frozen
from fedms_jax.config import ConfigError, apply_overrides, load_config, validate
from fedms_jax.data import features
from fedms_jax.data.features import FrozenStem, cache_key, stem_tokens
from fedms_jax.data.preprocess import IMAGENET_STATS, preprocess
from fedms_jax.models.expert import Expert
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.vision import split_params

LORA = LoRASpec(rank=4, alpha=8.0, targets=("q", "v", "fc1"))
STATS = IMAGENET_STATS
L = 4  # conftest.TINY_LAYERS


def _spec(flavor: str):
    spec = tiny_vision_spec("vit" if flavor == "dinov2" else flavor)
    if flavor == "dinov2":
        spec = dataclasses.replace(spec, flavor="dinov2", encoder=dataclasses.replace(spec.encoder, layer_scale=True))
    return spec


def _images(n: int, seed: int = 0, size: int = 16, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _renumber(tree: dict, frozen: int, num_layers: int) -> dict:
    """A full-depth LoRA tree's blocks F .. L-1 as the top model's blocks 0 .. L-F-1."""
    return {"encoder": {f"blocks_{i - frozen}": tree["encoder"][f"blocks_{i}"] for i in range(frozen, num_layers)}}


# --- (a) stem tokens + the (L - F)-block expert = the full model -----------------------------
@pytest.mark.parametrize("flavor, frozen", [("vit", 1), ("vit", 3), ("clip", 2), ("dinov2", 2)])
def test_stem_then_top_equals_the_full_model_at_every_level(flavor, frozen):
    spec = _spec(flavor)
    full = Expert(spec, LORA, 5)
    backbone = full.init_backbone(jax.random.key(0))
    trainable = full.init_trainable(jax.random.key(1))
    trainable = {"lora": randomize_lora(trainable["lora"], jax.random.key(2), 0.3),
                 "head": randomize_lora(trainable["head"], jax.random.key(3), 0.3)}  # the head starts at 0
    top_built, stem = split_frozen(Built(full, backbone, STATS), frozen)
    top = top_built.expert
    assert top.num_layers == L - frozen and top.spec.input == "tokens" and stem.frozen_blocks == frozen
    # The split trees are exactly what the two smaller modules initialise (names, shapes).
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
    assert shapes(top_built.backbone) == shapes(jax.eval_shape(top.init_backbone, jax.random.key(0)))
    assert shapes(_renumber(trainable["lora"], frozen, L)) == shapes(top.init_lora(jax.random.key(0)))
    stem_tree = jax.eval_shape(lambda r: Expert(stem.spec, LORA, 5).init_backbone(r), jax.random.key(0))
    assert set(stem_tree) - {"final_ln", "projection"} == set(stem.params)

    raw = _images(3, seed=1)
    tokens = jax.jit(stem.apply)(stem.params, raw)
    assert tokens.shape == (3, spec.num_tokens, spec.encoder.hidden_size) and tokens.dtype == jnp.float32
    x = preprocess(jnp.asarray(raw), spec.image_size, *STATS, spec.num_channels)
    top_trainable = {"lora": _renumber(trainable["lora"], frozen, L), "head": trainable["head"]}
    for k in range(1, L - frozen + 1):
        want = jax.jit(lambda b, t, x: full.logits(b, t, x, k))(backbone, trainable, x)
        got = jax.jit(lambda b, t, x: top.logits(b, t, x, k))(top_built.backbone, top_trainable, tokens)
        assert float(jnp.abs(want).max()) > 1e-2
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=f"k={k}")


def test_split_params_shares_leaves_and_refuses_bad_depths(tiny_expert, tiny_backbone):
    stem, top = split_params(tiny_backbone, 1)
    assert stem["encoder"]["blocks_0"] is tiny_backbone["encoder"]["blocks_0"]
    assert top["encoder"]["blocks_0"] is tiny_backbone["encoder"]["blocks_1"]
    assert "final_ln" in top and "patch_embed" in stem and "patch_embed" not in top
    for bad in (0, L):
        with pytest.raises(ValueError, match="frozen_blocks"):
            split_params(tiny_backbone, bad)
        with pytest.raises(ValueError, match="frozen_blocks"):
            tiny_expert.spec.split(bad)


def test_prep_passes_tokens_through(tiny_expert, tiny_backbone):
    top_built, _ = split_frozen(Built(tiny_expert, tiny_backbone, STATS), 2)
    settings = protocol.Settings(expert=top_built.expert, stats=STATS, schedule=None, client_optimizer=None,
                               server_optimizer=None, local_steps=1, batch_size=1)
    tokens = jnp.ones((2, 17, 32), jnp.float32)
    assert settings.prep(tokens) is tokens
    with pytest.raises(ValueError, match=r"tokens must have shape \[batch, 17, 32\]"):
        top_built.expert.logits(top_built.backbone, top_built.expert.init_trainable(jax.random.key(0)),
                                jnp.ones((2, 9, 32)), 1)


# --- (b) the on-disk cache ------------------------------------------------------------------
@pytest.fixture(scope="module")
def stem(tiny_expert, tiny_backbone) -> FrozenStem:
    return split_frozen(Built(tiny_expert, tiny_backbone, STATS), 2)[1]


class _Counting:
    """Counts ``FrozenStem.tokens`` calls (the only place tokens are computed)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = FrozenStem.tokens

        def counted(stem, images, batch_size=256):
            self.calls += 1
            return real(stem, images, batch_size)

        monkeypatch.setattr(FrozenStem, "tokens", counted)


def test_second_use_reads_the_cache(stem, tmp_path, monkeypatch):
    count, lines = _Counting(monkeypatch), []
    images = _images(5, seed=3)
    first = stem_tokens(stem, images, tmp_path, name="train images", batch_size=2, log=lines.append)
    assert count.calls == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    second = stem_tokens(stem, images, tmp_path, name="train images", log=lines.append)
    assert count.calls == 1, "the second use recomputed the tokens"
    np.testing.assert_array_equal(second, first)
    assert re.match(r"feature cache: computed the train images' tokens \[5, 17, 32\] .* wrote ", lines[0])
    assert lines[1].startswith("feature cache: read the train images' tokens [5, 17, 32]")
    # The batched, padded computation is the plain forward.
    np.testing.assert_allclose(first, np.asarray(stem.apply(stem.params, images)), rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".npy", ".sha256")]  # no temporary files left


def test_key_changes_with_images_backbone_and_preprocessing(stem):
    images = _images(4, seed=4)
    key = cache_key(stem, images)
    assert cache_key(stem, images.copy()) == key
    other = images.copy()
    other[2, 5, 5, 1] ^= 1
    assert cache_key(stem, other) != key
    assert cache_key(stem, images[:3]) != key
    params = jax.tree_util.tree_map(lambda x: x, stem.params)
    params["encoder"]["blocks_1"]["mlp"]["fc2"]["bias"] = params["encoder"]["blocks_1"]["mlp"]["fc2"]["bias"] + 1e-6
    assert cache_key(dataclasses.replace(stem, params=params), images) != key
    assert cache_key(dataclasses.replace(stem, stats=((0.5,) * 3, (0.5,) * 3)), images) != key
    assert cache_key(dataclasses.replace(stem, dtype=jnp.bfloat16), images) != key
    one_block = dataclasses.replace(stem.spec, encoder=dataclasses.replace(stem.spec.encoder, num_layers=1))
    assert cache_key(dataclasses.replace(stem, spec=one_block), images) != key


def test_an_interrupted_write_leaves_no_file(stem, tmp_path, monkeypatch):
    images = _images(3, seed=5)
    final = tmp_path / f"{cache_key(stem, images)}.npy"

    def dies_halfway(f, array, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill in the middle of the write

    monkeypatch.setattr(features.np, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        stem_tokens(stem, images, tmp_path)
    assert not final.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    stem_tokens(stem, images, tmp_path)
    assert final.exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "nan", "tampered"])
def test_a_damaged_file_is_recomputed(stem, tmp_path, monkeypatch, damage):
    images = _images(3, seed=6)
    good = stem_tokens(stem, images, tmp_path)
    path = tmp_path / f"{cache_key(stem, images)}.npy"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "wrong_shape":
        np.save(path, good[:2])
    elif damage == "nan":
        bad = good.copy()
        bad[0, 0, 0] = np.nan
        np.save(path, bad)
    else:  # finite, the right shape and dtype: only the content hash beside it can tell
        bad = good.copy()
        bad[1, 2, 3] += 1.0
        np.save(path, bad)
    count, lines = _Counting(monkeypatch), []
    again = stem_tokens(stem, images, tmp_path, log=lines.append)
    assert count.calls == 1 and "the file there" in lines[0]
    np.testing.assert_array_equal(again, good)
    np.testing.assert_array_equal(np.load(path), good)


# --- (c) config errors ----------------------------------------------------------------------
def _raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


def test_config_errors_before_anything_compiles():
    embedded = load_config("embedded")  # 4 layers
    with _raises("config.model.frozen_blocks = 4: must be < model.layers=4"):
        validate(apply_overrides(embedded, ["model.frozen_blocks=4"]))
    with _raises("config.sal.k0 = 4: must be <= model.layers - model.frozen_blocks = 4 - 1 = 3"):
        validate(apply_overrides(embedded, ["model.frozen_blocks=1", "sal.k0=4"]))
    with _raises("config.model.frozen_blocks = -1: must be an integer >= 0"):
        validate(apply_overrides(embedded, ["model.frozen_blocks=-1"]))
    config = validate(apply_overrides(embedded, ["model.frozen_blocks=3", "sal.k0=1"]))
    assert config.model.frozen_blocks == 3 and config.data.feature_cache == ""
    # A checkpoint's depth is known only when it is loaded: run.build checks then (below).
    validate(apply_overrides(embedded, ["model.frozen_blocks=40", "model.pretrained=some/hub-id"]))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 3-block DINOv2 checkpoint directory (random weights, written without torch)."""
    from safetensors.numpy import save_file
    from transformers import Dinov2Config

    from fedms_jax.models.hf import to_hf_state_dict
    from fedms_jax.models.vision import VisionSpec

    hf = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                      image_size=28, patch_size=14, layerscale_value=0.5)
    spec = VisionSpec.from_hf(hf)
    params = Expert(spec, LORA, 5).init_backbone(jax.random.key(7))
    out = tmp_path_factory.mktemp("dinov2_tiny")
    hf.save_pretrained(str(out))
    save_file({k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(spec, params).items()}, str(out / "model.safetensors"))
    return out


def _dino_config(path, *extra: str):
    return tiny_config(f"model.pretrained={path}", "model.image_size=28", "lora.targets=q,v", *extra)


@pytest.mark.parametrize("extra, message", [
    (["model.frozen_blocks=3"], "config.model.frozen_blocks = 3: must be < the 3 blocks of model.pretrained="),
    (["model.frozen_blocks=2", "sal.k0=2"],
     "config.sal.k0 = 2: must be <= the 3 - 2 = 1 blocks above model.frozen_blocks of model.pretrained="),
])
def test_checkpoint_depth_errors_at_build(tiny_dinov2, tmp_path, extra, message):
    from fedms_jax.run import run

    with _raises(message):
        run(_dino_config(tiny_dinov2, *extra), tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


# --- (d) a short run -------------------------------------------------------------------------
def test_run_with_frozen_blocks_trains_and_reuses_the_cache(tiny_dinov2, tmp_path, capsys):
    from fedms_jax.run import build, run

    cache = tmp_path / "cache"
    config = _dino_config(tiny_dinov2, "model.frozen_blocks=1", f"data.feature_cache={cache}",
                          "algorithm=fedms", "rounds=2", "stage1_rounds=1", "eval_every=2")
    out = run(config, tmp_path / "w", progress=False)
    exp = out.experiment
    assert exp.settings.expert.num_layers == 2 and exp.settings.schedule.num_layers == 2
    assert exp.engine.data.images.dtype == jnp.float32 and exp.engine.data.images.shape[2:] == (5, 32)
    assert exp.test_images.shape == (len(exp.test), 5, 32)
    full = sum(x.size for x in jax.tree_util.tree_leaves(
        Expert(dataclasses.replace(exp.stem.spec, encoder=dataclasses.replace(exp.stem.spec.encoder, num_layers=3)),
               LORA, 5).init_backbone(jax.random.key(0))))
    assert exp.backbone_params == full > sum(x.size for x in jax.tree_util.tree_leaves(exp.engine.backbone))
    lines = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [0, 1] and [l["stage"] for l in lines] == [1, 2]
    assert [l["active_blocks"] for l in lines] == [1, 2]  # SAL levels in [1, L - F]
    assert all(math.isfinite(l["loss"]) for l in lines)
    assert 0 <= lines[-1]["personalized_accuracy"] <= 1 and 0 <= lines[-1]["accuracy"] <= 1
    assert len(list(cache.glob("*.npy"))) == 2  # train and test tokens
    err = capsys.readouterr().err
    assert err.count("feature cache: computed") == 2

    # Another method on the same data and backbone: the tokens come from the cache.
    lines = []
    again = build(dataclasses.replace(config, algorithm="fedavg"), log=lines.append)
    assert [l.split(" tokens")[0] for l in lines] == [
        "feature cache: read the train images'", "feature cache: read the test images'"]
    np.testing.assert_array_equal(np.asarray(again.test_images), np.asarray(exp.test_images))
    assert again.settings.expert.num_layers == 2
