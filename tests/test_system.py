"""Clients as devices in simulated time (fedms_jax/system.py): round times against hand-computed
values, availability, dropouts, deadlines and over-selection, deadline-aware SAL depths against
an oracle over levels, what the engine does with a depth (against budget tiers and a cohort
without the absent client), the FLOP model against the compiled client, a whole run, config checks."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fed_helpers import flat, tiny_config
from fedms_jax import rng, system
from fedms_jax.config import ConfigError, SystemConfig

NAN = float("nan")


def _model(num_clients: int, cohort: int, seed: int = 0, **kw) -> system.SystemModel:
    return system.SystemModel(SystemConfig(speed="lognormal", **kw), seed, num_clients, cohort)


def _costs(flops, down=None, up=None) -> system.Costs:
    n = len(flops)
    z = [NAN] + [0.0] * n
    return system.Costs(np.array([NAN, *flops]), np.array(z if down is None else [NAN, *down]),
                        np.array(z if up is None else [NAN, *up]))


# --- the system model (numpy only) ------------------------------------------------------------
def test_round_time_is_download_plus_flops_over_speed_plus_upload():
    # Every client the median: 1 GFLOP/s, 1 MB/s up, 10 MB/s down (sigma 0).
    m = _model(4, 4, speed_median=1e9, speed_sigma=0.0, bandwidth_up=1e6, bandwidth_down=1e7)
    costs = _costs([2e9, 4e9], down=[1e6, 2e6], up=[5e5, 1e6])
    down, comp, up = m.times(np.arange(4), np.array([1, 2, 2, 1]), costs)
    np.testing.assert_allclose(down + comp + up, [0.1 + 2 + 0.5, 0.2 + 4 + 1, 0.2 + 4 + 1, 0.1 + 2 + 0.5])
    plan = m.plan(0, 0.0, 2, costs)  # no deadline: the round lasts until the slowest reports
    assert plan.duration == pytest.approx(5.2)
    assert plan.record["sim_clock_s"] == pytest.approx(5.2) and plan.record["sim_contributed"] == 4
    np.testing.assert_array_equal(plan.depth, [2, 2, 2, 2])
    assert plan.record["sim_useful_gflop"] == pytest.approx(16.0) and plan.record["sim_wasted_gflop"] == 0


def test_lognormal_speeds_have_the_median_and_spread_asked():
    m = _model(20000, 10, seed=3, speed_median=5e9, speed_sigma=0.7, bandwidth_sigma=0.3)
    assert np.median(m.speed) == pytest.approx(5e9, rel=0.03)
    assert np.std(np.log(m.speed)) == pytest.approx(0.7, rel=0.03)
    assert np.std(np.log(m.up)) == pytest.approx(0.3, rel=0.03)
    np.testing.assert_array_equal(m.speed, _model(20000, 10, seed=3, speed_median=5e9, speed_sigma=0.7).speed)
    assert np.bincount(m.quintile).tolist() == [4000] * 5
    assert m.speed[m.quintile == 0].max() < m.speed[m.quintile == 1].min()


def test_speeds_from_a_file_are_drawn_from_its_values(tmp_path):
    path = tmp_path / "speeds.txt"
    path.write_text("1e9\n2e9\n4e9\n")
    m = system.SystemModel(SystemConfig(speed="file", speed_file=str(path)), 0, 3000, 8)
    assert set(np.unique(m.speed)) == {1e9, 2e9, 4e9}
    np.testing.assert_allclose(np.bincount(np.log2(m.speed / 1e9).astype(int)) / 3000, [1 / 3] * 3, atol=0.04)


def test_deadline_and_over_selection_by_hand():
    # Speeds 1, 2, 4, 8 GFLOP/s, 8 GFLOP each, no bytes: they finish at 8, 4, 2 and 1 s.
    m = _model(4, 4, deadline_s=5.0)
    m.speed = np.array([1e9, 2e9, 4e9, 8e9])
    costs = _costs([8e9])
    plan = m.plan(0, 10.0, 1, costs)
    np.testing.assert_array_equal(plan.depth, [0, 1, 1, 1])  # the slowest is late
    r = plan.record
    assert (r["sim_round_s"], r["sim_clock_s"], r["sim_late"], r["sim_contributed"]) == (5.0, 15.0, 1, 3)
    assert r["sim_wasted_gflop"] == pytest.approx(5.0)  # 5 s of the slow one's 1 GFLOP/s
    assert r["sim_useful_gflop"] == pytest.approx(24.0)
    # Over-selection 2: the round closes at the 2nd report (2 s); the two slow ones' work is lost.
    m = _model(4, 4, over_selection=2.0)
    m.speed = np.array([1e9, 2e9, 4e9, 8e9])
    plan = m.plan(0, 0.0, 1, costs)
    np.testing.assert_array_equal(plan.depth, [0, 0, 1, 1])
    assert plan.duration == 2.0 and plan.record["sim_wasted_gflop"] == pytest.approx(2.0 + 4.0)
    # Dropouts without a deadline: the server waits for everyone still training and notices each
    # dropout when it leaves (at a uniform point of its round, from the stream (seed, SYSTEM, 4, t)).
    m = _model(4, 4, dropout=0.5)
    m.speed = np.array([1e9, 2e9, 4e9, 8e9])
    r = rng.numpy(0, rng.Stream.SYSTEM, 4, 3)
    plan = m.plan(3, 0.0, 1, costs)
    finish = np.array([8.0, 4.0, 2.0, 1.0])
    drops, left = r.random(4) < 0.5, r.random(4) * finish
    assert 0 < drops.sum() < 4, "the hand case should have both kinds"
    np.testing.assert_array_equal(plan.depth, np.where(drops, 0, 1))
    assert plan.duration == pytest.approx(max(finish[~drops].max(), left[drops].max()))
    assert plan.record["sim_wasted_gflop"] == pytest.approx(np.sum(left[drops] * m.speed[drops]) / 1e9)


def test_ties_at_the_goal_keep_the_first_reports_and_a_round_ends_once_everyone_is_heard():
    # Goal 4 of 6: three clients finish at 1 s and three at 2 s; the 4th report is at 2 s, where
    # the first of the tied (in cohort order) counts; the three at 1 s all do.
    m = _model(6, 6, over_selection=1.5)
    m.speed = np.array([1e9, 2e9, 1e9, 2e9, 1e9, 2e9])
    plan = m.plan(0, 0.0, 1, _costs([2e9]))
    np.testing.assert_array_equal(plan.depth, [1, 1, 0, 1, 0, 1])
    assert plan.duration == 2.0 and plan.record["sim_late"] == 2
    # A deadline far away and a dropout: the round ends when the last report or dropout is heard.
    m = _model(4, 4, deadline_s=100.0, dropout=0.5)
    m.speed = np.array([1e9, 2e9, 4e9, 8e9])
    r = rng.numpy(0, rng.Stream.SYSTEM, 4, 3)
    finish = np.array([8.0, 4.0, 2.0, 1.0])
    drops, left = r.random(4) < 0.5, r.random(4) * finish
    plan = m.plan(3, 0.0, 1, _costs([8e9]))
    assert 0 < drops.sum() < 4, "the hand case should have both kinds"
    assert plan.duration == pytest.approx(max(finish[~drops].max(), left[drops].max()))
    assert plan.duration < 100.0 and plan.record["sim_late"] == 0


def test_fedbuff_of_one_client_at_a_time_is_sequential():
    """concurrency = cohort_size = 1: each step's client starts when the last step is made, from
    the version it made (staleness 0), and the step lasts that client's round."""
    from fedms_jax.federated.types import Phase

    m = _model(6, 1, seed=4, speed_median=1e9, speed_sigma=1.0, aggregation="fedbuff", concurrency=1)
    costs = _costs([1e9, 3e9], down=[1e8, 1e8], up=[1e5, 1e5])
    tl = system.BufferedTimeline(m, lambda t: Phase(1, 1 if t < 3 else 2), lambda p: costs, 1, "sqrt", 4)
    for t in range(8):
        plan = tl.plan(t)
        c, level = plan.ids[0], 1 if t < 3 else 2
        np.testing.assert_array_equal(plan.version, [t])
        np.testing.assert_allclose(plan.weight, [1.0])
        assert plan.duration == pytest.approx(1e8 / m.down[c] + costs.flops[level] / m.speed[c] + 1e5 / m.up[c])
        assert plan.record["sim_in_flight"] == 0


def test_fedbuff_counts_each_result_at_the_costs_it_started_with():
    """A client started in stage 1 at level 1 and consumed in stage 2 (whose costs have no level 1)
    is counted at its start's FLOPs."""
    from fedms_jax.federated.types import Phase

    m = _model(12, 2, seed=5, speed_median=1e9, speed_sigma=1.0, aggregation="fedbuff", concurrency=4)
    stage1, stage2 = _costs([1e9]), system.Costs(np.array([NAN, NAN, 5e9]), np.zeros(3), np.zeros(3))
    phase = lambda t: Phase(1, 1) if t < 3 else Phase(2, 2)
    tl = system.BufferedTimeline(m, phase, lambda p: stage1 if p.stage == 1 else stage2, 4, "sqrt", 8)
    useful = 0.0
    for t in range(8):
        plan = tl.plan(t)
        useful += sum(1e9 if v < 3 else 5e9 for v in plan.version)
        assert plan.record["sim_useful_gflop_total"] == pytest.approx(useful / 1e9)
    assert any(v < 3 for v in tl.plan(3).version)  # a stage-1 result consumed in stage 2


def test_deadline_depth_is_the_largest_level_that_fits():
    m = _model(200, 200, seed=1, speed_median=1e9, speed_sigma=1.0, bandwidth_sigma=0.5, deadline_s=6.0)
    L = 6
    costs = _costs([1e9 * (1 + d) for d in range(1, L + 1)], down=[1e5 * d for d in range(1, L + 1)],
                   up=[2e4 * d for d in range(1, L + 1)])
    ids = np.arange(200, dtype=np.int32)
    for k in (1, 3, 6):
        got = m.fitting_depth(ids, k, costs)
        for c in ids:  # the oracle: every level tried
            t = [costs.down[d] / m.down[c] + costs.flops[d] / m.speed[c] + costs.up[d] / m.up[c] for d in range(1, k + 1)]
            fits = [d for d, x in zip(range(1, k + 1), t) if x <= 6.0]
            assert got[c] == (max(fits) if fits else 1)
    plan = m.plan(0, 0.0, L, costs, deadline_depth=True)
    full = costs.flops[L] / m.speed + costs.down[L] / m.down + costs.up[L] / m.up
    fits_any = costs.flops[1] / m.speed + costs.down[1] / m.down + costs.up[1] / m.up <= 6.0
    np.testing.assert_array_equal(plan.depth > 0, fits_any)  # everyone who fits some level contributes
    assert (plan.depth[full <= 6.0] == L).all() and 0 < (full <= 6.0).sum() < 200


def test_availability_trace_is_honoured_exactly(tmp_path):
    # Traced client 0 is on in [0, 10) and [20, 30), traced client 1 in [5, 25), repeating every
    # 40 s; the 6 clients follow traced client c mod 2.
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start_s,end_s\n0,0,10\n1,5,25\n0,20,30\n")
    m = system.SystemModel(SystemConfig(speed="lognormal", speed_median=1e9, speed_sigma=0.0, availability="trace",
                                        trace_file=str(trace), trace_period_s=40.0), 0, 6, 2)
    on = lambda t: (np.array([(0 <= t < 10) or (20 <= t < 30), 5 <= t < 25] * 3))
    for clock in (0.0, 7.0, 12.0, 22.0, 27.0, 33.0, 47.0):
        np.testing.assert_array_equal(m.available(0, clock), on(clock % 40))
    timeline = system.Timeline(m, lambda t: _Phase(1), lambda p: _costs([3e9]))  # 3 s rounds
    for t in range(30):
        plan = timeline.plan(t)
        start = timeline.clock(t)
        avail = on(start % 40)
        assert avail[plan.ids[plan.depth > 0]].all()  # nobody off at the round's start takes part
        assert (plan.depth > 0).sum() == min(2, avail.sum())
        assert len(set(plan.ids.tolist())) == 2
    with pytest.raises(ValueError, match="line 2"):
        bad = tmp_path / "bad.csv"
        bad.write_text("0,1,2\n0,5\n")
        system.read_trace(bad)


class _Phase:
    def __init__(self, k: int) -> None:
        self.stage, self.num_active = 1, k


def test_bernoulli_availability_and_dropouts_follow_their_rates():
    m = _model(1000, 50, seed=2, availability="bernoulli", available_p=0.3, dropout=0.25, speed_sigma=0.0)
    costs = _costs([1e9])
    dropped = []
    for t in range(200):
        avail = m.available(t, 0.0)
        plan = m.plan(t, 0.0, 1, costs)
        assert avail[plan.ids[plan.depth > 0]].all()
        dropped.append(plan.record["sim_dropped"] / plan.record["sim_selected"])
        assert plan.record["sim_dropped"] + plan.record["sim_contributed"] == plan.record["sim_selected"] == 50
    assert np.mean([m.available(t, 0.0).mean() for t in range(200)]) == pytest.approx(0.3, abs=0.01)
    assert np.mean(dropped) == pytest.approx(0.25, abs=0.02)
    np.testing.assert_array_equal(m.plan(7, 0.0, 1, costs).depth, _model(
        1000, 50, seed=2, availability="bernoulli", available_p=0.3, dropout=0.25, speed_sigma=0.0).plan(7, 0.0, 1, costs).depth)


# --- the engine with depths ---------------------------------------------------------------------
TWO = ("model.layers=2", "sal.mode=fixed", "sal.k0=2", "client.local_steps=2")
SYSTEM = ("system.speed=lognormal", "system.deadline_s=1.0")


@pytest.fixture(scope="module")
def deadline_exp():
    from fedms_jax.run import build

    return build(tiny_config(*TWO, *SYSTEM, "sal.budget_mode=deadline"))


def test_depths_in_one_program_equal_budget_tiers_in_round_zero(deadline_exp):
    """A depth-1 client in the level-2 program trains the top block only, as a budget-1 tier's
    client does (in round 0 every lower block's LoRA is zero, so the two trunks agree too)."""
    from fedms_jax.run import build

    tiers = build(tiny_config(*TWO, "sal.budgets=1,2", "sal.budget_mode=static"))
    ids = tiers.cohort(0)  # tier-major: 4 clients of budget 1, then 4 of budget 2
    phase = tiers.algorithm.phase(0)
    s1, c1 = tiers.init_states()
    s1, c1, m1 = tiers.engine.run_round(s1, c1, 0, phase, ids)
    s2, c2 = deadline_exp.init_states()
    s2, c2, m2 = deadline_exp.engine.run_round(s2, c2, 0, phase, ids, depth=np.array([1] * 4 + [2] * 4, np.int32))
    np.testing.assert_allclose(flat(s2.trainable), flat(s1.trainable), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)


def test_per_unit_weights_follow_the_depths(deadline_exp):
    exp = deadline_exp
    server, clients = exp.init_states()
    phase = exp.algorithm.phase(0)
    ids = np.arange(8, dtype=np.int32)
    depth = np.array([2, 1, 0, 2, 1, 1, 2, 0], np.int32)
    _, totals, _, _, counts, present = exp.engine.train_group(server, clients, 0, ids, exp.engine.backbone,
                                                              exp.engine.data, phase, depth=depth)
    n = np.asarray(counts, np.float64)
    np.testing.assert_array_equal(np.asarray(present), depth > 0)
    assert float(totals["blocks_1"]) == pytest.approx(n[depth >= 1].sum())  # the top block: every present client
    assert float(totals["blocks_0"]) == pytest.approx(n[depth >= 2].sum())  # the lower one: depth 2 only
    assert float(totals["head"]) == pytest.approx(n[depth >= 1].sum())


def test_a_client_that_takes_no_part_contributes_nothing_and_keeps_its_state():
    from fedms_jax.run import build

    exp = build(tiny_config(*TWO, "algorithm=ditto"))  # ditto: a persistent personal model per client
    phase = exp.algorithm.phase(0)
    ids = np.arange(8, dtype=np.int32)
    s0, c0 = exp.init_states()
    s, c, m = exp.engine.run_round(s0, c0, 0, phase, ids, depth=np.array([0, 2, 2, 2, 2, 2, 2, 0], np.int32))
    s0, c0 = exp.init_states()
    before = flat(jax_rows(c0.local, [0, 7]))
    np.testing.assert_array_equal(flat(jax_rows(c.local, [0, 7])), before)
    np.testing.assert_array_equal(np.asarray(c.participation), [0, 1, 1, 1, 1, 1, 1, 0])
    assert float(m["excluded_clients"]) == 0
    # The oracle: the same round without the two, as a cohort of six.
    s6, c6, _ = exp.engine.run_round(s0, c0, 0, phase, ids[1:7])
    np.testing.assert_allclose(flat(s.trainable), flat(s6.trainable), rtol=1e-5, atol=1e-6)


def jax_rows(tree, rows):
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], tree)


def test_flops_are_linear_in_the_level_as_the_compiled_client_counts():
    from fedms_jax.federated import accounting
    from fedms_jax.federated.types import Phase
    from fedms_jax.run import build

    exp = build(tiny_config("model.layers=3", "sal.mode=all"))
    server, clients = exp.states_like()
    costs = accounting.level_costs(exp.engine, server, clients, 1, [1, 3])
    measured = accounting.client_flops(exp.engine, server, clients, Phase(1, 2))
    assert costs.flops[2] == pytest.approx(measured, rel=0.01)
    assert costs.flops[1] < costs.flops[2] < costs.flops[3]
    assert costs.up[1] < costs.up[2] < costs.up[3]  # one more block's LoRA each


# --- a whole run ---------------------------------------------------------------------------------
def test_a_fedms_run_in_simulated_time(tmp_path):
    from fedms_jax.run import run

    config = tiny_config("algorithm=fedms", "rounds=4", "stage1_rounds=2", "eval_every=4", "model.layers=2",
                         "system.speed=lognormal", "system.speed_median=3e6", "system.speed_sigma=1.0",
                         "system.dropout=0.2", "system.deadline_s=2.0", "sal.budget_mode=deadline")
    run(config, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    clock = np.cumsum([r["sim_round_s"] for r in lines])
    np.testing.assert_allclose([r["sim_clock_s"] for r in lines], clock)
    for r in lines:
        assert r["sim_contributed"] + r["sim_dropped"] + r["sim_late"] == r["sim_selected"] == 8
        assert sum(r["sim_contributed_by_speed"]) == r["sim_contributed"]
        assert r["sim_round_s"] <= 2.0
    assert sum(r["sim_contributed"] for r in lines) > 0
    # The plan is a function of the config: another build gives the same clock and cohorts.
    from fedms_jax.run import build

    exp = build(config)
    assert [exp.timeline.plan(t).record for t in range(4)] == [
        {k: v for k, v in r.items() if k.startswith("sim_")} for r in lines]


# --- config checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (("sal.budget_mode=deadline",), "config.sal.budget_mode = 'deadline': picks each client's SAL depth"),
    (("system.dropout=0.1",), "config.system.dropout = 0.1: needs a system model"),
    (("system.speed=lognormal", "system.dropout=1.5"), "config.system.dropout = 1.5: must be in [0, 1)"),
    (("system.speed=lognormal", "system.availability=trace"), "config.system.trace_file = '': must name a CSV"),
    (("system.speed=lognormal", "system.dropout=0.1", "dp.clip=0.1", "dp.noise_multiplier=1.0"),
     "config.dp.clip = 0.1: DP's accounting assumes every sampled client contributes"),
    (("system.speed=lognormal", "system.availability=bernoulli", "system.available_p=0.5", "sal.budgets=1,2"),
     "config.system.availability = 'bernoulli': budget tiers fix each round's clients per tier"),
    (("system.speed=lognormal", "system.deadline_s=1", "sal.budget_mode=deadline", "sal.budgets=1,2"),
     "config.sal.budget_mode = 'deadline': with sal.budgets must be one of ['static', 'dynamic'] ('deadline' has no tiers)"),
    (("system.speed=lognormal", "system.deadline_s=1", "sal.budget_mode=deadline", "algorithm=fedavg"),
     "config.sal.budget_mode = 'deadline': limits the SAL level"),
])
def test_bad_system_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(*overrides)


def test_a_missing_speed_file_names_the_key(tmp_path):
    from fedms_jax.run import build

    with pytest.raises(ConfigError, match=re.escape("config.system.speed_file = ")):
        build(tiny_config("system.speed=file", f"system.speed_file={tmp_path / 'none.npy'}"))


# --- FedBuff --------------------------------------------------------------------------------------
FEDBUFF = ("system.speed=lognormal", "system.speed_median=1e8", "system.aggregation=fedbuff", "cohort_size=2",
           "data.num_clients=8", "system.concurrency=4", "system.max_staleness=3", "system.dropout=0.2")


def _sequential_fedbuff(exp, steps: int):
    """The oracle: FedBuff as a plain event loop over Python lists, every past server state kept
    in a dict, each client trained alone (the engine's client function, jitted per client) from
    the version it downloaded, the server stepping on each ``cohort_size`` results.
    -> (the server after ``steps`` steps, [(ids, versions, weights)] per step)."""
    import jax

    from fedms_jax import rng as rngs
    from fedms_jax.federated.types import ServerState
    from fedms_jax.rng import Stream

    engine, model, k = exp.engine, exp.system, exp.config.cohort_size
    sy = exp.config.system
    server, clients = exp.init_states()
    server = server.server
    clients = jax.tree_util.tree_map(np.asarray, clients)
    versions = {0: server}
    flying, buffer, busy, starts, now, log = [], [], set(), 0, 0.0, []

    def start(now):
        nonlocal starts
        while len(flying) < sy.concurrency:
            free = [c for c in range(model.num_clients) if c not in busy]
            c = int(rngs.numpy(model.cohort_seed, Stream.SYSTEM, 6, starts).choice(np.array(free)))
            r = rngs.numpy(model.cohort_seed, Stream.SYSTEM, 7, starts)
            drop, frac = r.random() < sy.dropout, r.random()
            phase = exp.algorithm.phase(len(log))
            costs, lv = exp.level_costs(phase), phase.num_active
            took = costs.down[lv] / model.down[c] + costs.flops[lv] / model.speed[c] + costs.up[lv] / model.up[c]
            flying.append({"end": now + (frac * took if drop else took), "order": starts, "client": c,
                           "version": len(log), "dropped": drop})
            busy.add(c)
            starts += 1

    start(0.0)
    while len(log) < steps:
        event = min(flying, key=lambda e: (e["end"], e["order"]))
        flying.remove(event)
        now = event["end"]
        if event["dropped"] or len(log) - event["version"] >= sy.max_staleness:
            busy.discard(event["client"])
        else:
            buffer.append(event)
        if len(buffer) < k:
            start(now)
            continue
        t, phase = len(log), exp.algorithm.phase(len(log))
        stage = exp.algorithm.stage(phase)
        sums, totals, weights = {}, {}, []
        for e in buffer:
            w = float(sy.staleness == "sqrt" and 1 / np.sqrt(1 + t - e["version"]) or 1.0)
            weights.append(w)
            one = engine.gather(engine.data, clients, np.array([e["client"]], np.int32), t, stage.state_keys)
            one = jax.tree_util.tree_map(lambda x: x[0], one)
            down = stage.broadcast(ServerState(versions[e["version"]].trainable, server.opt_state), phase)
            out = jax.jit(engine.client_fn(phase))((engine.backbone, down), one)
            for unit, u in out.upload.items():
                n = float(out.weight[unit])
                scaled = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64) * n * w, u)
                sums[unit] = scaled if unit not in sums else jax.tree_util.tree_map(np.add, sums[unit], scaled)
                totals[unit] = totals.get(unit, 0.0) + n
        mean = {u: jax.tree_util.tree_map(lambda s: jax.numpy.asarray(s / totals[u], np.float32), v) for u, v in sums.items()}
        server = stage.server_update(server, mean, {u: jax.numpy.asarray(v) for u, v in totals.items()}, phase)
        log.append(([e["client"] for e in buffer], [e["version"] for e in buffer], weights))
        versions[t + 1] = server
        busy.difference_update(e["client"] for e in buffer)
        buffer = []
        start(now)  # the slot of the result that filled the buffer, from the new version
    return server, log


def test_fedbuff_equals_a_sequential_event_simulation():
    from fedms_jax.run import build

    exp = build(tiny_config(*FEDBUFF, "rounds=6", "algorithm=fedavg_sal", "sal.every=2"))
    server, clients = exp.init_states()
    for t in range(6):
        server, clients, _ = exp.engine.run_round(server, clients, t, exp.algorithm.phase(t), exp.cohort(t),
                                                  **exp.round_inputs(t))
    oracle, log = _sequential_fedbuff(exp, 6)
    for t, (ids, versions, weights) in enumerate(log):
        plan = exp.timeline.plan(t)
        assert plan.ids.tolist() == ids and plan.version.tolist() == versions
        np.testing.assert_allclose(plan.weight, weights, rtol=1e-6)
    assert max(max(t - v for v in p[1]) for t, p in enumerate(log)) >= 1  # some results were stale
    np.testing.assert_allclose(flat(server.server.trainable), flat(oracle.trainable), rtol=2e-5, atol=2e-6)
    # The ring holds the last versions: row v mod S is version v.
    np.testing.assert_allclose(flat(jax_rows(server.versions, 6 % 3)), flat(server.server.trainable), rtol=0, atol=0)


def test_fedbuff_resumes_mid_run_bitwise(tmp_path):
    """FedMS over both stages asynchronously, killed after step 3 with a checkpoint of step 2: the
    rerun restores the server, its ring of versions and the clients, replays the event timeline,
    and ends as the uninterrupted run does."""
    from fedms_jax.run import Callback, run

    class Crash(Callback):
        def on_round(self, end):
            if end.done == 3:
                raise RuntimeError("preempted")

    overrides = (*FEDBUFF, "algorithm=fedms", "rounds=4", "stage1_rounds=2", "checkpoint.every=2", "eval_every=4")
    whole = run(tiny_config(*overrides), tmp_path / "whole", progress=False)
    with pytest.raises(RuntimeError, match="preempted"):
        run(tiny_config(*overrides), tmp_path / "cut", progress=False, callbacks=[Crash()])
    resumed = run(tiny_config(*overrides), tmp_path / "cut", progress=False)
    lines = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                       for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path / "cut") == lines(tmp_path / "whole")
    assert lines(tmp_path / "whole")[-1]["sim_mean_staleness"] >= 0
    np.testing.assert_array_equal(flat((resumed.server, resumed.clients)), flat((whole.server, whole.clients)))


@pytest.mark.parametrize("overrides", [
    FEDBUFF,
    ("system.speed=lognormal", "system.speed_median=3e6", "system.deadline_s=2.0", "sal.budget_mode=deadline",
     "system.dropout=0.2", "data.num_clients=8", "cohort_size=4"),
], ids=["fedbuff", "deadline_sal"])
def test_a_streamed_population_in_simulated_time_equals_device_mode(tmp_path, overrides):
    """The same FedMS run in simulated time with every client on the device and streamed from the
    host (one bucket: the device mode's padded size): the same timeline, states and metrics,
    bitwise. FedBuff's stage 2 is bitwise equal at XLA's default optimisation level but differs by
    an ulp in the gate adapter at -O0 (the suite's level: conftest.py), where the two programs'
    different fusions round differently: there the states agree to float32 rounding."""
    from fedms_jax.federated import population
    from fedms_jax.run import run

    results = {}
    for mode in ("device", "streamed"):
        config = tiny_config(*overrides, "algorithm=fedms", "rounds=4", "stage1_rounds=2", "eval_every=4",
                             "population.buckets=1", f"population.mode={mode}")
        results[mode] = run(config, tmp_path / mode, progress=False)
    dev, st = results["device"], results["streamed"]
    assert st.experiment.mode == "streamed" and st.experiment.engine.data is None
    assert isinstance(st.clients, population.Streamed)
    lines = {m: [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                 for x in (tmp_path / m / "metrics.jsonl").read_text().splitlines()] for m in results}
    sim = {m: [{k: v for k, v in r.items() if k.startswith("sim_")} for r in lines[m]] for m in lines}
    assert sim["device"] == sim["streamed"]  # the timeline is the host's: exactly the same
    assert any(r.get("sim_dropped", r.get("sim_dropped_total", 0)) for r in sim["device"])
    states = lambda r, c: flat((r.server, c))
    a, b = states(dev, dev.clients), states(st, st.clients.read(np.arange(8)))
    if "system.aggregation=fedbuff" in overrides:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        for x, y in zip(lines["device"], lines["streamed"]):
            assert x.keys() == y.keys()
            np.testing.assert_allclose([v for v in x.values() if isinstance(v, float)],
                                       [v for v in y.values() if isinstance(v, float)], rtol=1e-5)
    else:
        np.testing.assert_array_equal(a, b)
        assert lines["device"] == lines["streamed"]


def test_heterogeneity_script_writes_table_and_plot(tmp_path):
    """experiments/heterogeneity.py end to end on the tiny setting: the deadline is the quantile
    the slowest 20% miss at full depth, the ideal clients all contribute, FedBuff's rows come from
    its running totals."""
    import importlib.util
    from pathlib import Path

    from fed_helpers import TINY

    path = Path(__file__).parents[1] / "experiments" / "heterogeneity.py"
    spec = importlib.util.spec_from_file_location("heterogeneity", path)
    het = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(het)
    het.main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "runs"), "--algorithms", "fedavg_sal",
              "--scenarios", "ideal,deadline_sal,fedbuff", "--speed-median", "3e6", "--sigma", "1.0", "--fedbuff-scale", "2",
              *[f"--config.{o}" for o in TINY], "--config.rounds=3", "--config.eval_every=1",
              "--config.data.num_clients=20"])
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    info = out["deadlines"]["fedavg_sal"]
    assert info["late_at_full"] == pytest.approx(0.2, abs=0.05)
    rows = {r["scenario"]: r for r in out["rows"]}
    assert rows["ideal"]["contributed_share"] == 1.0 and rows["ideal"]["wasted_share"] == 0.0
    assert rows["deadline_sal"]["mean_depth"] <= rows["ideal"]["mean_depth"]
    assert rows["fedbuff"]["mean_staleness"] >= 0 and rows["fedbuff"]["mean_depth"] is None
    assert rows["ideal"]["time_to_ideal_final_s"] <= rows["ideal"]["sim_total_s"]  # it ends there at the latest
    fedbuff = out["runs"]["fedavg_sal/fedbuff"]
    assert rows["fedbuff"]["sim_total_s"] == fedbuff[-1]["sim_clock_s"] and len(fedbuff) == 6  # 2 x the rounds
    md = (tmp_path / "out" / "table.md").read_text()
    assert all(f"| fedavg_sal | {s} |" in md for s in rows)
    assert (tmp_path / "out" / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"


def test_dp_with_device_speeds_samples_and_accounts_as_without():
    """DP-FedAvg combines with speeds and bandwidths (which do not change who is sampled): the
    cohorts are the uniform ones the accountant assumes, every selected client contributes, and
    the epsilon is the one without a system model."""
    from fedms_jax.run import build

    dp = ("rounds=5", "dp.clip=1.0", "dp.noise_multiplier=1.0", "dp.reproducible_noise=true")
    plain = build(tiny_config(*dp))
    timed = build(tiny_config(*dp, "system.speed=lognormal", "system.speed_sigma=1.0", "system.bandwidth_sigma=0.5"))
    for t in range(5):
        plan = timed.timeline.plan(t)
        np.testing.assert_array_equal(plan.ids, plain.cohort(t))
        assert (plan.depth > 0).all() and plan.record["sim_round_s"] > 0
    assert timed.accountant.epsilon(5) == plain.accountant.epsilon(5)
