"""FedMS stage 2 and the baselines: what is aggregated, what stays local, the MoFM's parts."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import randomize_lora
from fed_helpers import flat, tiny_config
from fedms_jax import mofm
from fedms_jax.data.clients import ClientData
from fedms_jax.algorithms import ALGORITHMS, fedms
from fedms_jax.config import FedMSConfig
from fedms_jax.algorithms.fedms import COUNTS, GATE, mixture
from fedms_jax.federated import types
from fedms_jax.federated.protocol import Batch
from fedms_jax.federated.types import Phase
from fedms_jax.run import build


def _two_clients(train, labels0, labels1, n=24, offset=0):
    """Client 0 gets ``n`` examples with labels in labels0, client 1 ``n`` with labels in labels1
    (starting ``offset`` examples into its pool, so another offset gives it other images)."""
    pick = lambda labels, off: np.flatnonzero(np.isin(train.labels, labels))[off : off + n]
    idx = [pick(labels0, 0), pick(labels1, offset)]
    return ClientData(
        images=jnp.asarray(np.stack([train.images[i] for i in idx])),
        labels=jnp.asarray(np.stack([train.labels[i] for i in idx])),
        counts=jnp.asarray([n, n], jnp.int32),
    )


def _stage2_round(data, cohort=(0, 1)):
    """One FedMS stage-2 round (no stage 1) over the given two-client data, from fixed states."""
    config = tiny_config("algorithm=fedms", "stage1_rounds=0", "data.num_clients=2", "cohort_size=2",
                         "data.min_examples=2", "sal.mode=all", "client.local_steps=3")
    b = build(config)
    engine = b.engine
    engine.data = jax.device_put(data)
    server, clients = b.init_states()
    before = jax.tree_util.tree_map(np.asarray, server.trainable)
    phase = b.algorithm.phase(0)
    assert phase.stage == 2
    server, clients, _ = engine.run_round(server, clients, 0, phase, np.asarray(cohort, np.int32))
    return before, server, clients, b


@pytest.fixture(scope="module")
def disjoint():
    from fedms_jax.data.sources import load_synthetic

    train, _ = load_synthetic(image_size=8, seed=0)
    a = _two_clients(train, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    other = _two_clients(train, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], offset=40)  # client 1: other images
    return train, _stage2_round(a), _stage2_round(other)


def test_stage2_aggregates_the_gate_adapter_and_the_global_expert(disjoint):
    """Stage 2 (``train_global``, the default) moves every server unit: the gate adapter and
    the global expert (all blocks active here, sal.mode=all)."""
    _, (before, server, _, _), _ = disjoint
    units0, units1 = types.split_units(before), types.split_units(server.trainable)
    assert set(units0) == set(units1) and GATE in units0
    for name in units0:
        assert np.abs(flat(units1[name]) - flat(units0[name])).max() > 0, name


def test_stage2_gate_adapter_is_weighted_mean_of_clients(disjoint):
    """Oracle: the server's gate adapter = the example-weighted mean of each client's adapter
    trained alone (cohort of one; equal counts here)."""
    train, (_, server, _, _), _ = disjoint
    data = _two_clients(train, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    alone = [flat(_stage2_round(data, cohort=(c,))[1].trainable[GATE]) for c in (0, 1)]
    np.testing.assert_allclose(flat(server.trainable[GATE]), (alone[0] + alone[1]) / 2, atol=1e-6)


def test_stage2_local_expert_and_gate_head_untouched_by_other_client(disjoint):
    _, (_, server_a, clients_a, _), (_, server_b, clients_b, _) = disjoint
    own = lambda cl, i: flat(jax.tree_util.tree_map(lambda x: x[i], {k: cl.local[k] for k in ("expert", "gate_head")}))
    # Client 1's data changed between the two runs; client 0's local expert and gate head did not.
    np.testing.assert_array_equal(own(clients_a, 0), own(clients_b, 0))
    assert np.abs(own(clients_a, 1) - own(clients_b, 1)).max() > 0
    # ...while the aggregated gate adapter did see client 1's data.
    assert np.abs(flat(server_a.trainable[GATE]) - flat(server_b.trainable[GATE])).max() > 0
    assert bool(clients_a.local["ready"].all())


@pytest.fixture(scope="module")
def mofm_setup(tiny_expert, tiny_backbone, tiny_images):
    """A FedMS algorithm over the tiny expert, with different global and local experts."""
    config = tiny_config("algorithm=fedms", "stage1_rounds=0")
    settings = dataclasses.replace(build(config).settings, expert=tiny_expert)
    algo = fedms(settings, 0, FedMSConfig(gate_rank=4, train_global=False, prior="none"))
    server, clients = algo.init(jax.random.key(1), 1)
    glob = {**server.trainable, "lora": randomize_lora(server.trainable["lora"], jax.random.key(2)),
            "head": jax.tree_util.tree_map(lambda x: x + 0.1, server.trainable["head"])}
    local = {"lora": randomize_lora(server.trainable["lora"], jax.random.key(3)), "head": glob["head"]}
    server = server.replace(trainable={**glob, GATE: jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), server.trainable[GATE])})
    head = jax.tree_util.tree_map(lambda x: 0.3 * jax.random.normal(jax.random.key(5), x.shape), clients.local["gate_head"])
    state = {"ready": jnp.ones((), bool), "expert": jax.tree_util.tree_map(lambda x: x[0], clients.local["expert"]) | local,
             "gate_head": jax.tree_util.tree_map(lambda x: x[0], head), COUNTS: clients.local[COUNTS][0]}
    return algo, server, state, tiny_backbone, tiny_images


def _client_view(algo, server, state, backbone, images, phase):
    """A stage-2 client's (params, ctx, features), as evaluation builds them."""
    stage = algo.stage(phase)
    params, ctx = stage.client_init(stage.broadcast(server, phase), state, phase)
    return stage, params, ctx, stage.featurize(backbone, ctx, images, phase)


@pytest.mark.parametrize("local_weight", [0.0, 1.0])
def test_forced_gate_gives_one_expert(mofm_setup, local_weight):
    algo, server, state, backbone, images = mofm_setup
    forced = fedms(algo.settings, 0, FedMSConfig(gate="fixed", local_weight=local_weight, gate_rank=4, prior="none"))
    expert = algo.settings.expert
    k = expert.num_layers
    phase = Phase(2, k)
    stage, params, ctx, feats = _client_view(forced, server, state, backbone, images, phase)
    log_p, extras = stage.predict(params, ctx, backbone, feats, phase)
    which = state["expert"] if local_weight == 1.0 else server.trainable
    expected = jax.nn.log_softmax(expert.logits(backbone, which, images, k))
    np.testing.assert_allclose(np.asarray(log_p), np.asarray(expected), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(extras["gate_local"]), local_weight)


@pytest.mark.parametrize("k, gate_input, train_global", [
    (1, "mean", False), (2, "mean", False), (1, "cls", False), (2, "global_feature", False), (2, "global_feature", True)])
def test_shared_trunk_equals_full_experts(mofm_setup, k, gate_input, train_global):
    """The MoFM forward runs the trunk once; each expert run on its own in full (and the gate on
    the full model's hidden states at the branch point, or the global expert's pooled feature)
    gives the same, with the global expert frozen (part of the features) or training."""
    algo, server, state, backbone, images = mofm_setup
    options = FedMSConfig(gate_rank=4, gate_input=gate_input, train_global=train_global, prior="none")
    algo = fedms(algo.settings, 0, options)
    phase = Phase(2, k)
    stage, params, ctx, feats = _client_view(algo, server, state, backbone, images, phase)
    # A frozen global expert runs once, in featurize; a training one is a parameter.
    assert set(feats.frozen) == (set() if train_global else {"z_global", "g_feature"})
    assert ("global" in params) == train_global
    log_p, z_g, z_l, w = mixture(algo.settings, options, params, ctx, backbone, feats, phase)
    down = stage.broadcast(server, phase)
    expert, L = algo.settings.expert, algo.settings.expert.num_layers
    # Each expert in full: all L blocks, LoRA zeroed below the top k (so those blocks are frozen).
    full = lambda t: expert.logits(backbone, {"lora": sal_zero_below(t["lora"], k, L), "head": t["head"]}, images, L)
    np.testing.assert_allclose(np.asarray(z_g), np.asarray(full(server.trainable)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(z_l), np.asarray(full(state["expert"])), atol=1e-5)
    # The gate reads the [CLS] entering block L - k of the plain (LoRA-free) backbone.
    branch = expert.backbone.apply(
        {"params": backbone}, images, method=lambda m, x: m.encoder(m.embed(x), 0, L - k, use_lora=False)
    )
    if gate_input == "global_feature":  # the global expert's pooled feature, run in full
        feature = expert.backbone.apply(
            {"params": backbone, "lora": sal_zero_below(server.trainable["lora"], k, L)}, images, L).features
    else:
        feature = branch[:, 0] if gate_input == "cls" else branch.mean(axis=1)
    w_ref = mofm.gate_weights(down[GATE], state["gate_head"], feature, options.gate_rank)
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), atol=1e-6)
    mixed = jnp.log(w_ref[:, :1] * jax.nn.softmax(z_g) + w_ref[:, 1:] * jax.nn.softmax(z_l))
    np.testing.assert_allclose(np.asarray(log_p), np.asarray(mixed), atol=1e-5)


def sal_zero_below(lora, k, L):
    """The LoRA tree with every block below the top k set to zero (so it is the identity)."""
    top = types.select({"lora": lora}, types.active_units(k, L, head=False))["lora"]
    return types.replace_units({"lora": jax.tree_util.tree_map(jnp.zeros_like, lora)}, {"lora": top})["lora"]


def test_fedms_beats_fedavg_personalized_under_label_skew(tmp_path):
    from fedms_jax.run import run

    common = ["data.partition=shards", "data.shards_per_client=2", "rounds=8", "client.local_steps=8",
              "client.optimizer=adamw", "client.lr=0.01", "sal.mode=all"]
    fedms = run(tiny_config("algorithm=fedms", "stage1_rounds=4", *common), tmp_path / "ms", progress=False)
    fedavg = run(tiny_config("algorithm=fedavg", *common), tmp_path / "avg", progress=False)
    ms, avg = fedms.metrics["personalized_accuracy"], fedavg.metrics["personalized_accuracy"]
    assert ms > avg + 0.1, (ms, avg)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_from_the_command_line(tmp_path, algorithm, capsys):
    """Every algorithm runs (with DP-FedAvg where something is aggregated: what is uploaded is
    clipped and noised, whatever the algorithm)."""
    from fedms_jax.cli import main

    from fed_helpers import DP, TINY

    dp = [f"--config.{o}" for o in (*DP, "dp.raw_metrics=true")] if algorithm != "local" else []
    args = [f"--config.{o}" for o in TINY] + [f"--config.algorithm={algorithm}", "--config.stage1_rounds=1", *dp]
    assert main(["run", "--workdir", str(tmp_path), "--no-progress", *args]) == 0
    import json

    read = lambda name: [json.loads(l) for l in (tmp_path / name).read_text().splitlines()]
    lines = read("metrics.jsonl")
    # Under DP the metrics from raw client data are apart (what sits next to epsilon is what it covers).
    raw = read("metrics_not_private.jsonl") if dp else lines
    assert [l["round"] for l in lines] == [0, 1] == [l["round"] for l in raw]
    assert all(0.0 <= l["personalized_accuracy"] <= 1.0 and np.isfinite(l["loss"]) for l in raw)
    assert not dp or all("loss" not in l and "personalized_accuracy" not in l for l in lines)
    assert ("accuracy" in lines[-1]) == (algorithm not in ("local", "fedper", "fedrep"))
    if algorithm == "local":
        assert all(l["bytes_up"] == 0 == l["bytes_down"] for l in lines)
    else:  # one noisy aggregate per round that uploads something; epsilon grows with them
        assert [l["dp_rounds"] for l in lines] == list(np.cumsum([l["bytes_up"] > 0 for l in lines]))
        assert lines[-1]["dp_rounds"] >= 1 and lines[-1]["epsilon"] >= lines[0]["epsilon"] > 0
    assert "done:" in capsys.readouterr().out


def test_fedper_keeps_heads_local_and_fedprox_pulls_toward_server():
    from fed_helpers import run_rounds

    server, clients, _, _ = run_rounds(tiny_config("algorithm=fedper"), 1)
    assert "head" not in server.trainable
    heads = flat(jax.tree_util.tree_map(lambda x: x[0], clients.local["head"])), flat(
        jax.tree_util.tree_map(lambda x: x[1], clients.local["head"]))
    assert np.abs(heads[0] - heads[1]).max() > 0

    def moved(*extra):
        b = build(tiny_config(*extra))
        server, clients = b.init_states()
        start = flat(jax.tree_util.tree_map(np.asarray, server.trainable))
        s, _, _ = b.engine.run_round(server, clients, 0, b.algorithm.phase(0), np.arange(8, dtype=np.int32))
        return flat(s.trainable) - start

    avg, prox0 = moved("algorithm=fedavg"), moved("algorithm=fedprox", "fedprox.mu=0")
    np.testing.assert_allclose(prox0, avg, atol=1e-7)  # mu = 0 is FedAvg
    # The FedProx loss is the FedAvg loss plus mu/2 ||theta - theta_server||^2 (numpy oracle).
    b = build(tiny_config("algorithm=fedprox", "fedprox.mu=0.3"))
    phase = b.algorithm.phase(0)
    stage, backbone = b.algorithm.stage(phase), b.engine.backbone
    anchor = stage.broadcast(b.init_states()[0], phase)
    params = jax.tree_util.tree_map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), anchor)
    x = b.settings.prep(b.engine.data.images[0, :4])
    y = b.engine.data.labels[0, :4]
    _, ctx = stage.client_init(anchor, {}, phase)
    batch = Batch(stage.featurize(backbone, ctx, x, phase), y, jnp.ones(y.shape, jnp.float32))
    prox, _ = stage.loss(params, ctx, backbone, batch, None, phase)
    logits = b.settings.expert.logits(backbone, params, x, phase.num_active)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    expected = 0.3 * 0.5 * np.sum((flat(params) - flat(anchor)) ** 2)
    np.testing.assert_allclose(float(prox) - float(plain), expected, rtol=1e-4)


def test_compare_script_writes_table_and_plots(tmp_path):
    """experiments/compare.py end to end on two methods of the tiny setting."""
    import importlib.util
    from pathlib import Path

    from fed_helpers import TINY

    path = Path(__file__).parents[1] / "experiments" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    compare.main(["--out", str(tmp_path), "--methods", "fedms,local", *[f"--config.{o}" for o in TINY],
                  "--config.stage1_rounds=1"])
    md = (tmp_path / "table.md").read_text()
    assert "| fedms |" in md and "| local |" in md and "| 0.0 | 0.0 |" in md  # local sends nothing
    for png in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "global_accuracy_vs_round.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
