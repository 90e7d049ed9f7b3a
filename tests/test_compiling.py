"""Compilation: scanned layers equal unrolled ones, every phase compiled ahead (nothing left to
compile when a round or an evaluation needs it), a persistent cache that makes a repeated run
compile nothing, and bf16 compute against fp32."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fed_helpers import tiny_config
from fedms_jax import compiling
from fedms_jax.models.lora import LORA_COLLECTION, LoRASpec
from fedms_jax.models.transformer import EncoderSpec, unrolled_layers
from fedms_jax.models.vision import VisionSpec, VisionTransformer


def _spec(flavor: str) -> VisionSpec:
    enc = EncoderSpec(32, 3, 4, 64, "gelu", 1e-6, layer_scale=flavor == "dinov2")
    return VisionSpec(enc, 16, 4, flavor=flavor, projection_dim=24 if flavor == "clip" else None)


@pytest.mark.parametrize("flavor", ["vit", "clip", "dinov2"])
def test_scanned_and_unrolled_encoders_agree(flavor):
    """Same parameter tree; features and LoRA gradients equal to 1e-6 (float32; the programs may
    only reassociate sums) at k = 1 (a scanned trunk of 2 blocks) and k = L = 3 (a scanned
    top, the trunk empty)."""
    spec, lora = _spec(flavor), LoRASpec(4, 8.0, 0.0, ("q", "v", "fc1"))
    scanned, unrolled = VisionTransformer(spec, lora, scan=True), VisionTransformer(spec, lora, scan=False)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    v = unrolled.init(jax.random.key(1), x, method=VisionTransformer.init_all)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
        scanned.init(jax.random.key(1), x, method=VisionTransformer.init_all))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora_tree = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), v[LORA_COLLECTION])
    w = jax.random.normal(jax.random.key(3), (spec.feature_dim,)) / spec.feature_dim
    for k in (1, spec.num_layers):
        def loss(module, l):
            return jnp.tanh(module.apply({"params": v["params"], LORA_COLLECTION: l}, x, k).features @ w).sum()

        (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(lambda l, m=m: loss(m, l)))(lora_tree) for m in (unrolled, scanned))
        np.testing.assert_allclose(float(b), float(a), atol=1e-6)
        for p, q in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
            np.testing.assert_allclose(np.asarray(q), np.asarray(p), atol=1e-6)
        # The scan is real: the scanned program loops over one block body, the unrolled has none.
        if flavor == "vit" and k == spec.num_layers:
            text = jax.jit(lambda l: loss(scanned, l)).lower(lora_tree).as_text()
            assert "stablehlo.while" in text
            with unrolled_layers():
                assert "stablehlo.while" not in jax.jit(lambda l: loss(scanned, l)).lower(lora_tree).as_text()


@pytest.mark.parametrize("scan", [True, False])
def test_rematerialised_blocks_give_the_same_gradients_and_recompute_the_forward(scan):
    """``remat``: same loss and LoRA gradients (float32 reassociation: 1e-5) as without, at k = L (every block trained);
    the backward pass recomputes each block's forward, so the gradient program does more
    matmul work (loops counted, ``hlo.count``) -- and, scanned, keeps less: its temporaries
    are less than half."""
    from fedms_jax import hlo

    enc = EncoderSpec(32, 4, 4, 64, "gelu", 1e-6)
    spec, lora = VisionSpec(enc, 16, 4, flavor="vit"), LoRASpec(4, 8.0, 0.0, ("q", "v", "fc1"))
    plain, remat = (VisionTransformer(spec, lora, scan=scan, remat=r) for r in (False, True))
    x = jax.random.normal(jax.random.key(0), (64, 16, 16, 3))
    v = plain.init(jax.random.key(1), x, method=VisionTransformer.init_all)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora_tree = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), v[LORA_COLLECTION])
    w = jax.random.normal(jax.random.key(3), (spec.feature_dim,)) / spec.feature_dim
    grads = {}
    for name, module in (("plain", plain), ("remat", remat)):
        fn = jax.jit(jax.value_and_grad(
            lambda l, m=module: jnp.tanh(m.apply({"params": v["params"], LORA_COLLECTION: l}, x, enc.num_layers).features @ w).sum()))
        compiled = fn.lower(lora_tree).compile()
        grads[name] = (fn(lora_tree), hlo.count(compiled.as_text()).matmul_flops, compiled.memory_analysis().temp_size_in_bytes)
    (a, ga), flops_plain, temp_plain = grads["plain"]
    (b, gb), flops_remat, temp_remat = grads["remat"]
    np.testing.assert_allclose(float(b), float(a), atol=1e-6)
    for p, q in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(q), np.asarray(p), rtol=1e-5, atol=1e-5)
    assert flops_remat > 1.2 * flops_plain  # the forward again: about a third more
    if scan:  # XLA:CPU's scheduler runs an unrolled stack's recomputations early, keeping as much
        assert temp_remat < 0.5 * temp_plain


def _compile_counter():
    """A callback counting the XLA compiles (and cache hits) each thread made during the loop."""
    from fedms_jax.run import Callback

    class Counter(Callback):
        def on_start(self, exp, start):
            self.log = compiling.CompileLog().__enter__()

        def on_end(self):
            self.log.__exit__()

    return Counter()


@pytest.fixture
def own_cache(tmp_path):
    """A fresh persistent cache for one test; the session's afterwards."""
    before = jax.config.jax_compilation_cache_dir
    yield tmp_path / "cache"
    compiling.configure_cache(before is not None, before or "")


def test_programs_compiled_ahead_leave_nothing_to_compile_in_the_loop(tmp_path, own_cache):
    """Two stages, SAL levels 1 and 2, an evaluation every round: every round and evaluation
    program is compiled ahead by the compile threads, none in the loop's thread; the programs
    are exactly the phases the schedule reaches; and a second run of the same job with the same
    cache compiles nothing at all (every executable comes from the cache); with
    ``compile.ahead=false`` each program is made in the loop's thread, with the same results."""
    from fedms_jax.run import run

    config = tiny_config("algorithm=fedms", "rounds=4", "stage1_rounds=2", "sal.mode=progressive", "sal.k0=1", "sal.step=1",
                         "sal.every=1", "compile.threads=2", f"compile.cache_dir={own_cache}", "checkpoint.every=0")
    counter = _compile_counter()
    result = run(config, tmp_path / "first", progress=False, callbacks=[counter])
    engine = result.experiment.engine
    timing = json.loads((tmp_path / "first" / "timing.json").read_text())
    programs = {p["program"]: p for p in timing["programs"]}
    phases = sorted({(p.stage, p.num_active) for p in map(result.experiment.algorithm.phase, range(4))})
    assert sorted((p.stage, p.num_active) for p in engine.compiled_phases) == phases == [(1, 1), (1, 2), (2, 2)]
    assert len(programs) == 3 * len(phases) and all(p["ahead"] for p in programs.values())
    loop_thread = {name: n for name, n in counter.log.by_thread.items() if not name.startswith("fedms-compile")}
    assert loop_thread == {}, loop_thread
    assert timing["compiles"] > 0 and timing["first_round_done_s"] <= timing["total_s"]

    again = run(config, tmp_path / "second", progress=False)
    timing2 = json.loads((tmp_path / "second" / "timing.json").read_text())
    assert timing2["compiles"] == 0 and timing2["cache_hits"] >= len(programs), timing2
    first = [json.loads(l) for l in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(l) for l in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert again.metrics["personalized_accuracy"] == result.metrics["personalized_accuracy"]

    # compile.ahead=false: each program is made in the loop's thread when first used (read
    # from the cache here), with the same results.
    counter = _compile_counter()
    lazy = run(dataclasses.replace(config, compile=dataclasses.replace(config.compile, ahead=False)),
               tmp_path / "lazy", progress=False, callbacks=[counter])
    assert counter.log.by_thread and not any(name.startswith("fedms-compile") for name in counter.log.by_thread)
    assert lazy.metrics["loss"] == result.metrics["loss"]


def test_bf16_compute_trains_like_fp32():
    """bf16 compute keeps float32 params, optimizer states and loss; two rounds of FedAvg + SAL
    (SGD, so an update is linear in its gradient) land within a stated tolerance of float32:
    each round's loss within 1%, and the trained params' total movement within 10% in norm."""
    from fed_helpers import run_rounds
    from fedms_jax.run import build

    common = ("algorithm=fedavg_sal", "sal.mode=fixed", "sal.k0=2")
    outs = {}
    for dtype in ("float32", "bfloat16"):
        server, clients, _, metrics = run_rounds(tiny_config(*common, f"model.dtype={dtype}"), 2)
        outs[dtype] = server, metrics
        floats = [x for x in jax.tree_util.tree_leaves((server, clients)) if jnp.issubdtype(x.dtype, jnp.inexact)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    (s32, m32), (s16, m16) = outs["float32"], outs["bfloat16"]
    for a, b in zip(m32, m16):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=0.01)
    s0, _ = build(tiny_config(*common)).init_states()
    flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(s.trainable)])
    moved32, moved16 = flat(s32) - flat(s0), flat(s16) - flat(s0)
    assert np.linalg.norm(moved32) > 0
    assert np.linalg.norm(moved16 - moved32) <= 0.1 * np.linalg.norm(moved32)


def test_configure_cache_switches_and_turns_off(tmp_path, own_cache):
    assert compiling.configure_cache(True, str(tmp_path / "a")) == tmp_path / "a"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a") and (tmp_path / "a").is_dir()
    assert compiling.configure_cache(False) is None and jax.config.jax_compilation_cache_dir is None
    assert compiling.cache_directory("~/x").is_absolute()
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.warns(UserWarning, match="running without a persistent compilation cache"):
        assert compiling.configure_cache(True, str(blocked / "cache")) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_programs_compile_once_and_report_errors_at_use():
    """A program asked for twice is compiled once; a failure to lower surfaces when it is used,
    not in the background."""
    programs = compiling.Programs(threads=1)
    calls = []

    def lower():
        calls.append(1)
        return jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((2,), jnp.float32))

    programs.submit("a", lower)
    programs.submit("a", lower)
    assert float(programs.get("a", lower)(jnp.ones(2))[0]) == 2.0 and len(calls) == 1

    def broken():
        raise ValueError("cannot lower")

    programs.submit("b", broken)
    with pytest.raises(ValueError, match="cannot lower"):
        programs.get("b", broken)
    programs.close()
    assert [r["program"] for r in programs.report()] == ["'a'", "'b'"]
