"""Numerical parity of the Flax ViT / CLIP with transformers' PyTorch models.

Every model here has random weights (fixed seeds), is written with transformers'
``save_pretrained`` and read back with ``fedms_jax.models.hf.load_pretrained``; the Flax forward is
then compared with the PyTorch forward of the very same model object. Biases, LayerNorm
parameters and the logit scale are perturbed away from their (zero / one / default) initial
values, so a swapped or mistransposed small tensor cannot hide.

The maximum absolute differences are printed (``pytest -s``) and collected in ``MAX_ABS_DIFF``.
No test touches the network: the module runs with the hub client in offline mode and with
socket connections refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import torch  # the README test command installs it; a missing torch must fail, not skip
import transformers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedms_jax.models import heads  # noqa: E402
from fedms_jax.models.clip import CLIP, CLIPSpec  # noqa: E402
from fedms_jax.models.hf import load_pretrained, resize_pos_embed  # noqa: E402
from fedms_jax.models.vision import VisionSpec  # noqa: E402

ATOL = 1e-4

#: name -> max |flax - torch| of every parity comparison made in this module.
MAX_ABS_DIFF: dict[str, float] = {}


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("no_network")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _close(name: str, got, want, atol: float = ATOL) -> float:
    """Asserts |got - want| <= atol elementwise; records and prints the max abs difference."""
    got, want = _np(got), _np(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all() and np.isfinite(want).all(), name
    # The reference must be non-trivial, or agreeing with it proves nothing.
    assert np.abs(want).max() > 1e-2, (name, np.abs(want).max())
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    MAX_ABS_DIFF[name] = diff
    print(f"\n[hf-parity] max|flax - torch| {name}: {diff:.3e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
    return diff


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """NHWC float32 'normalised pixels'."""
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _perturb_small_tensors(model: "torch.nn.Module", seed: int) -> None:
    """Moves biases, LayerNorm weights, class embeddings and the logit scale off their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _pooled(out) -> "torch.Tensor":
    """transformers 5 ``get_*_features`` return an output object; older ones a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _vit_forward(pt, images: np.ndarray) -> dict[str, np.ndarray]:
    spec = pt.spec

    def f(m, x):
        h = m.hidden_states(x)
        out = {"hidden": h, "last_hidden_state": m.final_ln(h), "features": m.pool(h)}
        if spec.pooler:
            out["pooler_output"] = m.pooler_output(h)
        return out

    out = pt.module().apply({"params": pt.params}, jnp.asarray(images), method=f)
    return {k: np.asarray(v) for k, v in out.items()}


def _clip_forward(pt, images: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    mod, variables = pt.module(), {"params": pt.params}
    x, t = jnp.asarray(images), jnp.asarray(ids)
    return {
        "image_embeds": np.asarray(mod.apply(variables, x, method=CLIP.image_features)),
        "text_embeds": np.asarray(mod.apply(variables, t, method=CLIP.text_features)),
        "logits_per_image": np.asarray(mod.apply(variables, x, t)),
    }


def _clip_reference(model, images: np.ndarray, ids: np.ndarray, mask: np.ndarray, **kw):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            pixel_values=_nchw(images),
            **kw,
        )
    return {
        # transformers 5: the towers' pooler_output is the projected, unnormalised embedding.
        "image_embeds": _pooled(out.vision_model_output),
        "text_embeds": _pooled(out.text_model_output),
        "logits_per_image": out.logits_per_image,
    }


def _mask_through_eos(ids: np.ndarray, eos: int) -> np.ndarray:
    """Attention mask: 1 up to and including each row's first eos, 0 on the padding after it."""
    first = (ids == eos).argmax(-1)
    return (np.arange(ids.shape[1])[None] <= first[:, None]).astype(np.int64)


def _tiny_clip_config(**text_overrides):
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=100, max_position_embeddings=16, eos_token_id=99, bos_token_id=98,
                pad_token_id=0)
    text.update(text_overrides)
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                  image_size=16, patch_size=4)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def _save(model, directory: Path) -> Path:
    model.save_pretrained(str(directory))
    assert (directory / "config.json").exists()
    return directory


# ----------------------------------------------------------------------------- ViT


VIT_KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VIT_KW)).eval()
    _perturb_small_tensors(model, seed=100)
    return _save(model, tmp_path_factory.mktemp("vit")), model


def test_vit_model_matches_hf(vit):
    d, model = vit
    pt = load_pretrained(d)
    assert pt.kind == "vit" and isinstance(pt.spec, VisionSpec)
    assert pt.spec.pooler and pt.spec.num_layers == 3 and pt.spec.image_size == 16
    assert pt.path == Path(d)

    x = _images(2, 16, seed=0)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(x), output_hidden_states=True)
    got = _vit_forward(pt, x)

    # Encoder output before the final LayerNorm = HF's last entry of hidden_states.
    _close("vit/hidden_states[-1]", got["hidden"], ref.hidden_states[-1])
    _close("vit/last_hidden_state", got["last_hidden_state"], ref.last_hidden_state)
    _close("vit/pooler_output", got["pooler_output"], ref.pooler_output)
    _close("vit/features(cls)", got["features"], ref.last_hidden_state[:, 0])

    # The plain (LoRA-less) module's __call__ gives the same features.
    out = pt.module().apply({"params": pt.params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out.features), got["features"], rtol=0, atol=1e-6)
    assert out.features.shape == (2, 32)


def test_vit_for_image_classification_checkpoint(tmp_path_factory):
    """'vit.'-prefixed keys, no pooler, an extra classifier: loads, features = HF's CLS state."""
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(**VIT_KW, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    _perturb_small_tensors(model, seed=101)
    d = _save(model, tmp_path_factory.mktemp("vit_cls"))

    pt = load_pretrained(d)
    assert pt.kind == "vit" and not pt.spec.pooler
    assert "pooler" not in pt.params

    x = _images(3, 16, seed=1)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(x), output_hidden_states=True)
        cls_state = model.vit(pixel_values=_nchw(x)).last_hidden_state[:, 0]
    got = _vit_forward(pt, x)
    assert "pooler_output" not in got
    _close("vit_cls/features(cls)", got["features"], cls_state)
    # HF's logits are exactly a linear layer on those features.
    w = _np(model.classifier.weight)
    b = _np(model.classifier.bias)
    _close("vit_cls/logits", got["features"] @ w.T + b, ref.logits)


def test_vit_resized_position_embeddings_match_hf_interpolation(vit):
    d, model = vit
    pt = load_pretrained(d, image_size=24)
    assert pt.spec.image_size == 24 and pt.spec.num_patches == 36
    assert pt.params["pos_embed"].shape == (37, 32)
    native = load_pretrained(d)
    # The class token's position is carried over unchanged.
    np.testing.assert_array_equal(pt.params["pos_embed"][0], native.params["pos_embed"][0])

    x = _images(2, 24, seed=2)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(x), interpolate_pos_encoding=True)
    got = _vit_forward(pt, x)
    _close("vit@24/last_hidden_state", got["last_hidden_state"], ref.last_hidden_state)
    _close("vit@24/pooler_output", got["pooler_output"], ref.pooler_output)


@pytest.mark.parametrize("grid,new_grid", [(4, 6), (4, 2), (7, 3), (5, 5), (3, 8)])
def test_resize_pos_embed_is_torch_bicubic(grid, new_grid):
    """Up- and down-sampling equal torch's bicubic, align_corners=False, no antialias."""
    d = 5
    pos = np.random.default_rng(grid * 10 + new_grid).standard_normal((grid * grid + 1, d))
    pos = pos.astype(np.float32)
    got = resize_pos_embed(pos, new_grid)
    patches = torch.from_numpy(pos[1:]).reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(
        patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).reshape(new_grid * new_grid, d)
    assert got.shape == (new_grid * new_grid + 1, d) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], pos[0])
    np.testing.assert_allclose(got[1:], want.numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- CLIP (tiny)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(2)
    model = transformers.CLIPModel(_tiny_clip_config()).eval()
    _perturb_small_tensors(model, seed=102)
    return _save(model, tmp_path_factory.mktemp("clip")), model


def test_clip_matches_hf(tiny_clip):
    d, model = tiny_clip
    pt = load_pretrained(d)
    assert pt.kind == "clip" and isinstance(pt.spec, CLIPSpec)
    assert pt.spec.text.eos_token_id == 99 and pt.spec.vision.projection_dim == 24
    assert pt.vision_params is pt.params["vision"]
    # The perturbed logit scale was read, not the module's default.
    np.testing.assert_array_equal(pt.params["logit_scale"], _np(model.logit_scale))
    assert abs(float(pt.params["logit_scale"]) - 2.6592) > 1e-3

    x = _images(2, 16, seed=3)
    ids = np.array(
        [
            [98, 5, 7, 99, 0, 0, 0, 0],  # padded with pad_token_id 0
            [98, 3, 4, 8, 9, 10, 11, 99],  # no padding
            [98, 42, 99, 99, 99, 99, 99, 99],  # padded with eos: pool at the first one
        ],
        np.int32,
    )
    mask = _mask_through_eos(ids, 99)
    ref = _clip_reference(model, x, ids, mask)
    got = _clip_forward(pt, x, ids)
    _close("clip/image_embeds", got["image_embeds"], ref["image_embeds"])
    _close("clip/text_embeds", got["text_embeds"], ref["text_embeds"])
    _close("clip/logits_per_image", got["logits_per_image"], ref["logits_per_image"])
    assert got["logits_per_image"].shape == (2, 3)

    # Consistency with the standalone HF feature getters.
    with torch.no_grad():
        img = _pooled(model.get_image_features(pixel_values=_nchw(x)))
        txt = _pooled(model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                              attention_mask=torch.from_numpy(mask)))
    _close("clip/get_image_features", got["image_embeds"], img)
    _close("clip/get_text_features", got["text_embeds"], txt)

    # The vision tower alone (Pretrained.vision_module) gives the same image embeddings.
    vis = pt.vision_module().apply({"params": pt.vision_params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(vis.features), got["image_embeds"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "eos,bos,ids",
    [
        # Legacy configs carry eos_token_id=2: HF pools at each row's largest id (the end-of-text
        # token, 99 here), not at token 2, which occurs earlier in row 0.
        (2, 1, [[1, 5, 2, 7, 99, 0, 0, 0], [1, 3, 4, 8, 9, 10, 11, 99]]),
        # A modern eos that is not the largest id: pool at its first occurrence, not at the max.
        (50, 49, [[49, 97, 50, 60, 0, 0, 0, 0], [49, 3, 88, 8, 9, 50, 50, 50]]),
    ],
    ids=["legacy_eos_2", "eos_not_max_id"],
)
def test_clip_text_pooling_rule(tmp_path_factory, eos, bos, ids):
    torch.manual_seed(3)
    cfg = _tiny_clip_config(eos_token_id=eos, bos_token_id=bos, pad_token_id=0)
    model = transformers.CLIPModel(cfg).eval()
    _perturb_small_tensors(model, seed=103)
    d = _save(model, tmp_path_factory.mktemp(f"clip_eos{eos}"))
    pt = load_pretrained(d)
    assert pt.spec.text.eos_token_id == eos

    x = _images(2, 16, seed=4)
    ids = np.array(ids, np.int32)
    mask = _mask_through_eos(ids, 99 if eos == 2 else eos)
    ref = _clip_reference(model, x, ids, mask)
    got = _clip_forward(pt, x, ids)
    _close(f"clip_eos{eos}/text_embeds", got["text_embeds"], ref["text_embeds"])
    _close(f"clip_eos{eos}/logits_per_image", got["logits_per_image"], ref["logits_per_image"])


def test_clip_resized_vision_matches_hf_interpolation(tiny_clip):
    d, model = tiny_clip
    pt = load_pretrained(d, image_size=24)
    assert pt.spec.vision.image_size == 24
    assert pt.params["vision"]["pos_embed"].shape == (37, 48)
    # The text tower's positions are never resized.
    assert pt.params["text"]["pos_embed"].shape == (16, 32)
    x = _images(2, 24, seed=5)
    with torch.no_grad():
        ref = _pooled(model.get_image_features(pixel_values=_nchw(x), interpolate_pos_encoding=True))
    got = pt.module().apply({"params": pt.params}, jnp.asarray(x), method=CLIP.image_features)
    _close("clip@24/image_embeds", got, ref)


# ----------------------------------------------------------------------------- CLIP ViT-B/32 shape


#: the openai/clip-vit-base-patch32 comparisons, also readable after the run.
CLIP_B32_MAX_ABS_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module")
def clip_b32(tmp_path_factory):
    """transformers.CLIPConfig() defaults = openai/clip-vit-base-patch32's shape; random weights."""
    cfg = transformers.CLIPConfig()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size) == (768, 12, 12, 3072, 224, 32)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size,
            t.vocab_size, t.max_position_embeddings) == (512, 12, 8, 2048, 49408, 77)
    assert cfg.projection_dim == 512 and t.eos_token_id == 49407
    torch.manual_seed(4)
    model = transformers.CLIPModel(cfg).eval()
    _perturb_small_tensors(model, seed=104)
    return _save(model, tmp_path_factory.mktemp("clip_b32")), model


def test_clip_vit_b32_shape_matches_hf(clip_b32):
    d, model = clip_b32
    pt = load_pretrained(d)
    assert pt.kind == "clip"
    assert pt.spec.vision.num_patches == 49 and pt.spec.vision.feature_dim == 512
    assert pt.params["text"]["token_embed"]["embedding"].shape == (49408, 512)

    x = _images(2, 224, seed=6)
    ids = np.array(
        [
            [49406, 320, 1125, 539, 320, 2368, 269, 49407, 49407, 49407],  # pad = eos (tokenizer)
            [49406, 320, 1125, 539, 320, 1929, 49407, 1, 1, 1],  # pad = pad_token_id 1
            [49406, 3306, 49407, 0, 0, 0, 0, 0, 0, 0],
        ],
        np.int32,
    )
    mask = _mask_through_eos(ids, 49407)
    ref = _clip_reference(model, x, ids, mask)
    got = _clip_forward(pt, x, ids)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        try:
            _close("clip_b32/" + name, got[name], ref[name])
        finally:
            if "clip_b32/" + name in MAX_ABS_DIFF:
                CLIP_B32_MAX_ABS_DIFF[name] = MAX_ABS_DIFF["clip_b32/" + name]
    assert set(CLIP_B32_MAX_ABS_DIFF) == {"image_embeds", "text_embeds", "logits_per_image"}


# ----------------------------------------------------------------------------- zero-shot head


def _bytes_to_unicode():
    try:
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:  # transformers >= 5 moved it
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "o f</w>", "t a"]


@pytest.fixture(scope="module")
def zero_shot_dir(tmp_path_factory):
    """A tiny byte-level BPE CLIP tokenizer (vocab.json + merges.txt) and a CLIP, one directory."""
    d = tmp_path_factory.mktemp("clip_zero_shot")
    vocab: dict[str, int] = {}
    chars = list(_bytes_to_unicode().values())
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for merge in MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")

    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert eos == len(vocab) - 1
    torch.manual_seed(5)
    cfg = _tiny_clip_config(vocab_size=len(vocab), eos_token_id=eos, bos_token_id=bos,
                            pad_token_id=eos)
    model = transformers.CLIPModel(cfg).eval()
    _perturb_small_tensors(model, seed=105)
    model.save_pretrained(str(d))
    assert (d / "vocab.json").exists() and (d / "merges.txt").exists()
    return d, model, vocab


def test_tokenize_prompts_matches_clip_tokenizer(zero_shot_dir):
    d, _, vocab = zero_shot_dir
    prompts = heads.class_prompts(["cat", "dog", "tabby_cat"])
    assert prompts == ["a photo of a cat.", "a photo of a dog.", "a photo of a tabby cat."]
    ids = heads.tokenize_prompts(d, prompts, max_length=16)
    assert ids.dtype == np.int32 and ids.shape == (3, 16)

    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    want = tok(prompts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(want))

    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (ids[:, 0] == bos).all()
    assert ((ids == eos).any(axis=1)).all()
    # The merges were applied: 'cat' and 'dog' are single tokens, 'photo' starts with 'pho'.
    assert vocab["cat</w>"] in ids[0] and vocab["dog</w>"] in ids[1]
    assert vocab["cat</w>"] in ids[2] and vocab["pho"] in ids[0]
    # Rows differ only where the class names differ.
    assert not np.array_equal(ids[0], ids[1])


def test_zero_shot_head_matches_hf_logits(zero_shot_dir):
    d, model, vocab = zero_shot_dir
    labels = ["cat", "dog", "tabby_cat"]
    ids = heads.tokenize_prompts(d, heads.class_prompts(labels), max_length=16)
    pt = load_pretrained(d)
    assert pt.spec.text.vocab_size == len(vocab)
    assert pt.spec.text.eos_token_id == vocab["<|endoftext|>"]

    zs = heads.zero_shot_params(pt.module(), pt.params, ids)
    emb = zs["class_embeddings"]
    assert emb.shape == (3, 24) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(zs["logit_scale"], pt.params["logit_scale"])

    head = heads.ZeroShotHead(num_classes=3, projection_dim=24)
    x = _images(4, 16, seed=7)
    features = pt.module().apply({"params": pt.params}, jnp.asarray(x), method=CLIP.image_features)
    # zero_shot_params is a drop-in for the head's own parameter tree.
    init = head.init(jax.random.key(0), features)["params"]
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, zs)
    logits = head.apply({"params": zs}, features)

    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    enc = tok(heads.class_prompts(labels), padding="max_length", max_length=16, truncation=True,
              return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=_nchw(x)).logits_per_image
    _close("zero_shot/logits", logits, ref)
    assert logits.shape == (4, 3)


def test_zero_shot_expert_from_config_matches_hf_and_trains(zero_shot_dir, tmp_path):
    """The run's builder (model.head=zero_shot): the CLIP expert at init equals HF's
    logits_per_image; then two FedMS rounds (one per stage) on top of it run end to end."""
    from fed_helpers import tiny_config
    from fedms_jax.builders import build_expert
    from fedms_jax.run import run

    d, model, _ = zero_shot_dir
    labels = ["cat", "dog", "tabby_cat"]
    config = tiny_config(f"model.pretrained={d}", "model.image_size=16", "model.head=zero_shot")
    built = build_expert(config, labels, jax.random.key(0))
    assert not built.expert.tune_head and built.stats[0][0] == pytest.approx(0.48145466)
    trainable = built.expert.init_trainable(jax.random.key(1))
    x = _images(4, 16, seed=8)
    logits = built.expert.logits(built.backbone, trainable, jnp.asarray(x), 2, frozen_head=built.head)
    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    enc = tok(heads.class_prompts(labels), padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=_nchw(x)).logits_per_image
    _close("zero_shot/expert", logits, ref)

    out = run(tiny_config(f"model.pretrained={d}", "model.image_size=16", "model.head=zero_shot",
                          "algorithm=fedms", "stage1_rounds=1"), tmp_path, progress=False)
    assert out.metrics["stage"] == 2 and 0.0 <= out.metrics["personalized_accuracy"] <= 1.0
    assert out.server.trainable["head"] == {}  # the text classifier is frozen, never sent
