"""LoRA and SAL properties of the Flax backbone, checked against independent computations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY_LAYERS, randomize_lora
from fedms_jax import sal
from fedms_jax.models.lora import LoRASpec, merge_lora
from fedms_jax.federated import types

L = TINY_LAYERS


def _features(expert, backbone, lora, images, k):
    return expert.backbone.apply({"params": backbone, "lora": lora}, images, k).features


def test_fresh_lora_is_exactly_the_backbone(tiny_expert, tiny_backbone, tiny_images):
    lora = tiny_expert.init_lora(jax.random.key(1))
    # A is random, B is zero.
    for path, leaf in jax.tree_util.tree_flatten_with_path(lora)[0]:
        name = path[-1].key
        assert (np.asarray(leaf) == 0).all() == (name == "b"), path
    plain = tiny_expert.backbone.apply(
        {"params": tiny_backbone}, tiny_images,
        method=lambda m, x: m.pool(m.hidden_states(x)),
    )
    with_lora = _features(tiny_expert, tiny_backbone, lora, tiny_images, L)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(plain))


def test_merged_weights_equal_lora_forward(tiny_expert, tiny_backbone, tiny_images):
    lora = randomize_lora(tiny_expert.init_lora(jax.random.key(1)), jax.random.key(2))
    with_lora = _features(tiny_expert, tiny_backbone, lora, tiny_images, L)
    merged = merge_lora(tiny_backbone, lora, tiny_expert.lora)
    plain = tiny_expert.backbone.apply(
        {"params": merged}, tiny_images, method=lambda m, x: m.pool(m.hidden_states(x))
    )
    assert float(jnp.abs(with_lora - _features(tiny_expert, tiny_backbone, jax.tree_util.tree_map(jnp.zeros_like, lora), tiny_images, L)).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(plain), np.asarray(with_lora), atol=1e-5)


def test_lora_delta_matches_hand_computation():
    """One LoRA Dense against x W + b + (alpha/r) x A B computed with numpy."""
    from fedms_jax.models.lora import LoRADense

    spec = LoRASpec(rank=2, alpha=6.0, targets=("q",))
    layer = LoRADense(3, lora=spec)
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    v = layer.init(jax.random.key(0), x, use_lora=True)
    v = {"params": v["params"], "lora": {"a": np.ones((5, 2), np.float32), "b": np.full((2, 3), 0.5, np.float32)}}
    got = layer.apply(v, x, use_lora=True)
    p = v["params"]
    want = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"]) + 3.0 * x @ v["lora"]["a"] @ v["lora"]["b"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_inactive_blocks_get_no_gradient_and_trunk_is_cut(tiny_expert, tiny_backbone, tiny_images, k):
    lora = randomize_lora(tiny_expert.init_lora(jax.random.key(1)), jax.random.key(2))
    head = randomize_lora(tiny_expert.init_head(jax.random.key(3)), jax.random.key(4))
    labels = jnp.arange(3) % 5

    def loss(backbone, lora):
        logits = tiny_expert.logits(backbone, {"lora": lora, "head": head}, tiny_images, k)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g_backbone, g_lora = jax.grad(loss, argnums=(0, 1))(tiny_backbone, lora)
    active = set(sal.active_block_ids(k, L))
    blocks = g_lora["encoder"]
    for i in range(L):
        norms = [float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(blocks[f"blocks_{i}"])]
        if i in active:
            assert max(norms) > 0, f"active block {i} got no gradient"
        else:
            assert max(norms) == 0, f"inactive block {i} got a gradient"
    # Backprop stops at the branch point: nothing below the lowest active block (embeddings
    # included) receives gradient, even the frozen weights.
    for i in range(L - k):
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(g_backbone["encoder"][f"blocks_{i}"]))
    assert float(jnp.abs(g_backbone["pos_embed"]).max()) == 0
    top = g_backbone["encoder"][f"blocks_{L - 1}"]
    assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(top)) > 0


def test_active_subtree_runs_without_inactive_leaves(tiny_expert, tiny_backbone, tiny_images):
    """The forward at level k needs only the top-k blocks' LoRA: the rest is never read."""
    lora = randomize_lora(tiny_expert.init_lora(jax.random.key(1)), jax.random.key(2))
    k = 2
    active = types.select({"lora": lora}, types.active_units(k, L, head=False))["lora"]
    assert sorted(active["encoder"]) == [f"blocks_{i}" for i in range(L - k, L)]
    full = _features(tiny_expert, tiny_backbone, lora, tiny_images, k)
    part = _features(tiny_expert, tiny_backbone, active, tiny_images, k)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(part))
    merged = types.replace_units({"lora": lora}, {"lora": jax.tree_util.tree_map(jnp.zeros_like, active)})["lora"]
    assert float(jnp.abs(merged["encoder"]["blocks_0"]["attn"]["q"]["b"] - lora["encoder"]["blocks_0"]["attn"]["q"]["b"]).max()) == 0
    assert float(jnp.abs(merged["encoder"][f"blocks_{L - 1}"]["attn"]["q"]["b"]).max()) == 0


def test_compiled_flops_fall_with_fewer_active_blocks():
    """A client's compiled local training (XLA cost analysis) costs less at k = 1 than at k = L."""
    from fed_helpers import tiny_config
    from fedms_jax.federated.accounting import client_flops
    from fedms_jax.run import build

    exp = build(tiny_config("model.layers=3", "client.cache_frozen=false"))
    flops = {k: client_flops(exp.engine, *exp.init_states(), types.Phase(1, k)) for k in (3, 1)}
    assert flops[1] < 0.8 * flops[3], flops


def test_sal_schedule_values():
    s = sal.SALSchedule(num_layers=12, mode="progressive", k0=2, step=3, every=4)
    assert [s.num_active(t) for t in (0, 3, 4, 8, 12, 100)] == [2, 2, 5, 8, 11, 12]
    assert s.levels(13) == [2, 5, 8, 11]
    assert sal.SALSchedule(6, "all").num_active(0) == 6
    assert sal.SALSchedule(6, "fixed", k0=3).levels(50) == [3]


def test_bf16_compute_keeps_fp32_params(tiny_expert, tiny_backbone, tiny_images):
    import dataclasses

    bf16 = dataclasses.replace(tiny_expert, dtype=jnp.bfloat16)
    lora = randomize_lora(tiny_expert.init_lora(jax.random.key(1)), jax.random.key(2), 0.05)
    ref = _features(tiny_expert, tiny_backbone, lora, tiny_images, L)
    got = _features(bf16, tiny_backbone, lora, tiny_images, L)
    assert got.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf16.init_backbone(jax.random.key(0))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=0.1, rtol=0.05)


# ------------------------------------------------------------------ bad input


def test_bad_images_raise(tiny_expert, tiny_backbone):
    lora = tiny_expert.init_lora(jax.random.key(1))
    with pytest.raises(ValueError, match=r"shape \[batch, 16, 16, 3\].*\(2, 8, 8, 3\)"):
        _features(tiny_expert, tiny_backbone, lora, jnp.zeros((2, 8, 8, 3)), L)
    with pytest.raises(ValueError, match="floating point.*uint8"):
        _features(tiny_expert, tiny_backbone, lora, jnp.zeros((2, 16, 16, 3), jnp.uint8), L)
    with pytest.raises(ValueError, match=r"shape .*\(16, 16, 3\)"):
        _features(tiny_expert, tiny_backbone, lora, jnp.zeros((16, 16, 3)), L)


@pytest.mark.parametrize("k", [-1, L + 1, 2.0])
def test_num_active_out_of_range_raises(tiny_expert, tiny_backbone, tiny_images, k):
    lora = tiny_expert.init_lora(jax.random.key(1))
    with pytest.raises(ValueError, match="num_active"):
        _features(tiny_expert, tiny_backbone, lora, tiny_images, k)


def test_bad_lora_spec_raises():
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['query'\]"):
        LoRASpec(targets=("q", "query"))
    with pytest.raises(ValueError, match="lora.rank.*0"):
        LoRASpec(rank=0)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoRASpec(dropout=1.5)


def test_bad_schedule_raises():
    with pytest.raises(ValueError, match="sal.k0.*13"):
        sal.SALSchedule(12, "progressive", k0=13)
    with pytest.raises(ValueError, match="sal.mode.*'sometimes'"):
        sal.SALSchedule(12, "sometimes")
