"""Budget-aware SAL (fedms_jax/budgets.py): the resource model, the tiered round program (each
block averaged over the clients that trained it), bounded compiles, accounting, config checks."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fed_helpers import tiny_config
from fedms_jax.budgets import ResourceModel, Tiers, apportion, uniform_cohort
from fedms_jax.config import ConfigError, apply_overrides, load_config, validate

BUDGETS = ("model.layers=3", "sal.budgets=1,2,3", "sal.budget_shares=0.25,0.25,0.5", "rounds=3")


def _raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


# --- the resource model (numpy only) ----------------------------------------------------------
def test_apportion_sums_and_stays_within_one():
    assert apportion(8, (0.25, 0.25, 0.5)) == (2, 2, 4)
    assert apportion(8, (1 / 3,) * 3) == (3, 3, 2)  # ties go to the earlier tier
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = rng.dirichlet(np.ones(4))
        total = int(rng.integers(1, 500))
        got = np.asarray(apportion(total, shares))
        assert got.sum() == total and np.all(np.abs(got - total * shares) < 1)


def test_static_tiers_follow_the_shares_and_are_reproducible():
    shares = (0.2, 0.3, 0.5)
    model = ResourceModel(seed=3, num_clients=3000, cohort_size=100, budgets=(2, 6, 12), shares=shares)
    tiers = model.client_tiers()
    assert tuple(np.bincount(tiers, minlength=3)) == apportion(3000, shares) == (600, 900, 1500)
    np.testing.assert_array_equal(tiers, ResourceModel(3, 3000, 100, (2, 6, 12), shares).client_tiers())
    assert not np.array_equal(tiers, ResourceModel(4, 3000, 100, (2, 6, 12), shares).client_tiers())
    # A client's tier, over seeds, is distributed as the shares (a stratified random draw).
    first = np.array([ResourceModel(s, 50, 10, (2, 6, 12), shares).client_tiers()[7] for s in range(600)])
    np.testing.assert_allclose(np.bincount(first, minlength=3) / 600, shares, atol=0.06)
    # Each round: the fixed count of each tier, drawn from that tier, reproducible, changing by round.
    counts = model.tiers.counts
    assert counts == (20, 30, 50)
    seen = np.zeros(3000)
    for t in range(300):
        ids = model.cohort(t)
        assert len(set(ids.tolist())) == 100 and ids.dtype == np.int32
        np.testing.assert_array_equal(tiers[ids], model.tiers.slot_tiers())  # tier-major
        seen[ids] += 1
    np.testing.assert_array_equal(model.cohort(5), ResourceModel(3, 3000, 100, (2, 6, 12), shares).cohort(5))
    assert not np.array_equal(model.cohort(5), model.cohort(6))
    # Inclusion rate per tier = count / population = 1/30 for all (proportional allocation).
    for g in range(3):
        assert abs(seen[tiers == g].mean() / 300 - 1 / 30) < 0.004


def test_dynamic_tiers_change_by_round_over_the_uniform_cohort():
    model = ResourceModel(seed=1, num_clients=40, cohort_size=10, budgets=(1, 4), shares=(0.4, 0.6), mode="dynamic")
    assert model.tiers.counts == (4, 6)
    with pytest.raises(ValueError, match="dynamic"):
        model.client_tiers()
    budgets_of = []
    for t in range(400):
        ids = model.cohort(t)
        # the same clients as without budgets, only grouped by tier
        np.testing.assert_array_equal(np.sort(ids), uniform_cohort(1, t, 40, 10))
        budgets_of.append(model.budget_of(t))
    np.testing.assert_array_equal(model.cohort(7), ResourceModel(1, 40, 10, (1, 4), (0.4, 0.6), "dynamic").cohort(7))
    # a client's budget changes from round to round, with the shares as its frequencies
    b = [d[c] for d in budgets_of for c in d]
    assert abs(np.mean(np.asarray(b) == 1) - 0.4) < 0.03
    client = max(range(40), key=lambda c: sum(c in d for d in budgets_of))
    assert len({d[client] for d in budgets_of if client in d}) == 2


def test_tier_groups_and_the_programs_a_12_block_schedule_needs():
    """Progressive k = 1..12 with budgets (4, 8, 12) x 3 tiers: 12 round programs (one per k),
    1 / 2 / 3 client bodies in each, 12 distinct client programs (levels 1..12)."""
    tiers = Tiers((4, 8, 12), (3, 3, 2))
    groups = {k: tiers.groups(k) for k in range(1, 13)}
    assert [len(groups[k]) for k in range(1, 13)] == [1] * 4 + [2] * 4 + [3] * 4
    assert sum(len(g) for g in groups.values()) == 24
    assert {g.level for gs in groups.values() for g in gs} == set(range(1, 13))
    assert groups[6] == ((4, 0, 3, (0,)), (6, 3, 5, (1, 2)))  # tiers 8 and 12 merge at k = 6
    assert groups[12] == ((4, 0, 3, (0,)), (8, 3, 3, (1,)), (12, 6, 2, (2,)))


# --- config ------------------------------------------------------------------------------------
def _config(*overrides):
    return validate(apply_overrides(load_config("embedded"), list(overrides)))


def test_config_parses_and_checks_budgets():
    c = _config("sal.budgets=1,2,4", "sal.budget_shares=0.25,0.25,0.5", "sal.budget_mode=dynamic")
    assert c.sal.budgets == (1, 2, 4) and c.sal.budget_shares == (0.25, 0.25, 0.5)
    assert type(c.sal.budgets[0]) is int and type(c.sal.budget_shares[0]) is float
    assert _config("sal.budgets=2,4").sal.budget_shares == ()  # equal shares
    with _raises("config.sal.budgets = (1, 2, 5): each must be <= the 4 trainable blocks"):
        _config("sal.budgets=1,2,5")
    with _raises("config.sal.budgets = (2, 1): must be distinct block counts >= 1 in increasing order"):
        _config("sal.budgets=2,1")
    with _raises("config.sal.budgets = (0, 2): must be distinct"):
        _config("sal.budgets=0,2")
    with _raises("config.sal.budget_shares = (0.5,): must have one share per budget (2)"):
        _config("sal.budgets=1,2", "sal.budget_shares=0.5")
    with _raises("config.sal.budget_shares = (0.5, 0.6): must be positive and sum to 1"):
        _config("sal.budgets=1,2", "sal.budget_shares=0.5,0.6")
    with _raises("config.sal.budget_shares = (0.5, 0.5): is set but sal.budgets is empty"):
        _config("sal.budget_shares=0.5,0.5")
    with _raises("config.sal.budget_mode = 'sometimes': must be one of ['static', 'dynamic', 'deadline']"):
        _config("sal.budget_mode=sometimes")
    with _raises("gives the tiers (0, 0, 8) of the cohort_size=8 clients per round: every tier needs at least one"):
        _config("sal.budgets=1,2,4", "sal.budget_shares=0.02,0.02,0.96")
    with _raises("config.sal.budgets = (1, 2): budgets limit the SAL level; algorithm='fedavg' trains every block"):
        _config("sal.budgets=1,2", "algorithm=fedavg")
    with _raises("config.sal.budgets = ('a',)"):
        validate({"sal": {"budgets": ("a",)}})
    with _raises("--config.sal.budgets='1,x' is not a valid tuple"):
        _config("sal.budgets=1,x")


def test_a_resume_with_other_budgets_is_refused():
    from fedms_jax.checkpoint import config_changes, config_fingerprint

    saved = config_fingerprint(_config("sal.budgets=1,2,4"))
    assert config_changes(saved, _config("sal.budgets=1,2,4")) == []
    assert config_changes(saved, _config()) == [("sal.budgets", [1, 2, 4], [])]
    assert config_changes(saved, _config("sal.budgets=1,2,4", "sal.budget_mode=dynamic"))[0][0] == "sal.budget_mode"
    # a checkpoint written before budgets existed resumes a run without them
    old = {k: v for k, v in config_fingerprint(_config()).items() if "budget" not in k}
    assert config_changes(old, _config()) == []


# --- the round program ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiered():
    """Three rounds k = 1, 2, 3 of a 3-block FedAvg+SAL with budgets (1, 2, 3) of 2, 2, 4 clients;
    round 2 (k = 3: three groups) checked against each client run alone."""
    from fedms_jax.run import build

    config = tiny_config(*BUDGETS)
    exp = build(config)
    engine, algo = exp.engine, exp.algorithm
    server, clients = exp.init_states()
    metrics = []
    for t in range(2):
        server, clients, m = engine.run_round(server, clients, t, algo.phase(t), exp.cohort(t))
        metrics.append(m)
    ids = exp.cohort(2)
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), server)
    singles = _each_client_alone(engine, server, clients, 2, ids)
    server, clients, m = engine.run_round(server, clients, 2, algo.phase(2), ids)
    metrics.append({k: float(v) for k, v in m.items()})
    after = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), server)
    # server/clients: live states (the next round donates them); after: a copy of the server.
    return dict(exp=exp, before=before, singles=singles, after=after, server=server, clients=clients,
                metrics=metrics, ids=ids)


def _each_client_alone(engine, server, clients, t, ids):
    """Every cohort client's (level, upload, weight), from the engine's client function at the
    client's level run on that client alone (not through the round program)."""
    from fedms_jax.federated.types import Phase

    cohort = engine.gather(engine.data, clients, jnp.asarray(ids), jnp.int32(t))
    out = []
    for slot, level in enumerate(np.repeat(engine.tiers.levels(3), engine.tiers.counts)):
        phase = Phase(1, int(level))
        down = engine.algorithm.stage(phase).broadcast(server, phase)
        one = jax.tree_util.tree_map(lambda x: x[slot], cohort)
        o = jax.jit(engine.client_fn(phase))((engine.backbone, down), one)
        out.append((int(level), jax.tree_util.tree_map(np.asarray, o.upload), {u: float(w) for u, w in o.weight.items()}))
    return out


def test_a_block_is_averaged_over_the_clients_that_trained_it(tiered):
    from fedms_jax.federated.types import split_units

    old, new = split_units(tiered["before"].trainable), split_units(tiered["after"].trainable)
    singles = tiered["singles"]
    assert set(old) == {"head", "blocks_0", "blocks_1", "blocks_2"}
    for unit in old:
        trained = [(up[unit], w[unit]) for _, up, w in singles if unit in up]
        total = sum(w for _, w in trained)
        mean = jax.tree_util.tree_map(lambda *xs: sum(w * x for x, (_, w) in zip(xs, trained)) / total,
                                      *[u for u, _ in trained])
        expected = jax.tree_util.tree_map(lambda o, d: o + d, old[unit], mean)  # FedAvg: server lr 1
        for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(new[unit])):
            np.testing.assert_allclose(np.asarray(g), e, atol=2e-6, rtol=1e-5)
    # blocks_0 (lowest) only from the budget-3 tier; diluting it over the cohort would differ.
    assert sum(1 for _, up, _ in singles if "blocks_0" in up) == 4


def test_a_client_trains_exactly_its_top_blocks(tiered):
    singles = tiered["singles"]
    for level, upload, weight in singles:
        top = {f"blocks_{i}" for i in range(3 - level, 3)}
        assert set(upload) == set(weight) == top | {"head"}
        for unit in upload:
            assert weight[unit] > 0
            assert max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(upload[unit])) > 0
    assert [lv for lv, _, _ in singles] == [1, 1, 2, 2, 3, 3, 3, 3]


def test_tiers_compile_one_round_program_per_phase(tiered):
    exp, server, clients, ids = tiered["exp"], tiered["server"], tiered["clients"], tiered["ids"]
    engine = exp.engine
    assert engine.num_traces == 3  # k = 1, 2, 3: one round program each
    assert sorted(p.num_active for p in engine.client_phases) == [1, 2, 3]
    assert [len(engine.groups(exp.algorithm.phase(t), 8)) for t in range(3)] == [1, 2, 3]
    server, clients, _ = engine.run_round(server, clients, 3, exp.algorithm.phase(3), exp.cohort(3))
    assert engine.num_traces == 3 and len(engine.client_phases) == 3  # k = 3 again: nothing new
    np.testing.assert_array_equal(np.asarray(clients.participation), np.full(8, 4))  # 8 clients, 4 rounds
    m = tiered["metrics"][-1]
    assert {"loss_b1", "loss_b2", "loss_b3"} <= set(m) and m["excluded_clients"] == 0
    # the round's loss is the example-weighted mean over the tiers
    counts = np.asarray(engine.data.counts)[ids].astype(float)
    parts = [m["loss_b1"] * counts[:2].sum(), m["loss_b2"] * counts[2:4].sum(), m["loss_b3"] * counts[4:].sum()]
    assert m["loss"] == pytest.approx(sum(parts) / counts.sum(), rel=1e-5)


def test_measured_tier_flops_match_the_per_level_prediction(tiered):
    from fedms_jax.federated import accounting
    from fedms_jax.federated.types import Phase

    exp = tiered["exp"]
    engine = exp.engine
    server, clients = exp.init_states()
    phase = Phase(1, 3)
    per_level: dict = {}
    predicted = accounting.tier_flops(engine, server, clients, phase, 8, per_level)
    measured = accounting.group_flops(engine, server, clients, phase, 8)
    assert [g.tiers for g, _ in measured] == [(0,), (1,), (2,)]
    # XLA counts a vmapped client a few % above the client alone (here 0.4-3.7%, the same with
    # jax.vmap of the bare client_update); the levels differ by far more (level 1 is ~0.55x level 3).
    for (g, got), want in zip(measured, predicted):
        assert got == pytest.approx(want, rel=0.05), (g, got, want)
    one = [per_level[Phase(1, lv)] for lv in (1, 2, 3)]
    assert one[0] < one[1] < one[2]  # a lower level is cheaper: the tiers really differ
    # Bytes: each tier at its level.
    down, up = accounting.round_bytes(engine, server, clients, phase, 8)
    per = [accounting.bytes_per_client(engine, server, clients, Phase(1, lv)) for lv in (1, 2, 3)]
    assert up == 2 * per[0][1] + 2 * per[1][1] + 4 * per[2][1]
    assert down == 2 * per[0][0] + 2 * per[1][0] + 4 * per[2][0]
    assert per[0][1] < per[1][1] < per[2][1]


def test_run_writes_per_tier_metrics_and_tiered_bytes(tmp_path, tiered):
    import json

    from fedms_jax.federated import accounting
    from fedms_jax.run import run

    exp = tiered["exp"]
    out = run(tiny_config(*BUDGETS, "rounds=2", "eval_every=2"), tmp_path, progress=False)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["active_blocks"] for l in lines] == [1, 2]
    server, clients = exp.init_states()
    for l in lines:
        phase = exp.algorithm.phase(l["round"])
        assert (l["bytes_down"], l["bytes_up"]) == accounting.round_bytes(exp.engine, server, clients, phase, 8)
        assert {"loss_b1", "loss_b2", "loss_b3"} <= set(l)
    assert "personalized_accuracy" in out.metrics


def test_sequential_backend_agrees(tiered):
    from fed_helpers import flat
    from fedms_jax.run import build

    exp = build(tiny_config(*BUDGETS, "placement.backend=sequential"))
    server, clients = exp.init_states()
    for t in range(3):
        server, clients, _ = exp.engine.run_round(server, clients, t, exp.algorithm.phase(t), exp.cohort(t))
    np.testing.assert_allclose(flat(server.trainable), flat(tiered["after"].trainable), atol=1e-5)


def test_fedms_stage_2_local_experts_train_only_their_top_blocks():
    """FedMS with static budgets (1, 2) on 2 blocks: in stage 2 (k = 2) a budget-1 client's local
    expert keeps its lowest block as initialised, a budget-2 client's trains both; the gate
    adapter, trained by every tier, is aggregated over all of them."""
    from fedms_jax.federated.types import split_units
    from fedms_jax.run import build

    config = tiny_config("algorithm=fedms", "rounds=3", "stage1_rounds=1", "sal.budgets=1,2")
    exp = build(config)
    server, clients = exp.init_states()
    init = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), clients.local["expert"])
    gate0 = np.array(jax.tree_util.tree_leaves(server.trainable["gate"])[0], copy=True)
    for t in range(3):
        server, clients, m = exp.engine.run_round(server, clients, t, exp.algorithm.phase(t), exp.cohort(t))
    assert [(p.stage, p.num_active) for p in map(exp.algorithm.phase, range(3))] == [(1, 1), (2, 2), (2, 2)]
    tiers = exp.resources.client_tiers()
    local = jax.tree_util.tree_map(np.asarray, clients.local["expert"])
    moved = lambda unit, c: max(float(np.abs(a[c] - b[c]).max()) for a, b in zip(
        jax.tree_util.tree_leaves(split_units(local)[unit]), jax.tree_util.tree_leaves(split_units(init)[unit])))
    for c in range(8):
        assert moved("blocks_1", c) > 0
        assert (moved("blocks_0", c) > 0) == (tiers[c] == 1), (c, tiers[c])
    assert np.abs(np.asarray(jax.tree_util.tree_leaves(server.trainable["gate"])[0]) - gate0).max() > 0
    assert {"loss_b1", "loss_b2"} <= set(m)
