"""The federated engine: backends agree, sharding is real, compiles are few, learning happens."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fed_helpers import DP, evaluation, flat, run_experiment, run_rounds, tiny_config

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def vmap_two_rounds():
    exp, server, clients, metrics = run_experiment(tiny_config(), 2)
    evals = evaluation(exp, server, clients, exp.algorithm.phase(1))
    return flat(server.trainable), np.asarray(clients.participation), metrics, evals


def test_vmap_equals_sequential(vmap_two_rounds):
    ref, part, _, _ = vmap_two_rounds
    server, clients, _, _ = run_rounds(tiny_config("placement.backend=sequential"), 2)
    np.testing.assert_allclose(flat(server.trainable), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(clients.participation), part)
    assert part.sum() == 16  # 2 rounds x 8 clients gathered and scattered back


def test_chunked_equals_unchunked(vmap_two_rounds):
    ref, _, _, _ = vmap_two_rounds
    server, _, engine, _ = run_rounds(tiny_config("placement.chunk_size=2"), 2)
    np.testing.assert_allclose(flat(server.trainable), ref, atol=1e-5)


def test_server_update_is_weighted_mean_of_client_models():
    """FedAvg oracle: the new server tree = sum_i n_i * theta_i / sum_i n_i, each theta_i from a
    single-client round (cohort of one)."""
    from fedms_jax.run import build

    config = tiny_config("sal.mode=all")
    exp = build(config)
    algo, engine = exp.algorithm, exp.engine
    server0, clients0 = exp.init_states()
    k = algo.phase(0)
    cohort = np.array([1, 4, 6], np.int32)
    full, _, _ = engine.run_round(server0, clients0, 0, k, cohort)
    singles, counts = [], []
    for c in cohort:
        s, cl = exp.init_states()  # fresh: the full round donated server0
        one, _, _ = engine.run_round(s, cl, 0, k, np.array([c], np.int32))
        singles.append(flat(one.trainable))
        counts.append(int(engine.data.counts[c]))
    w = np.asarray(counts, np.float64)
    expected = (np.stack(singles) * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(flat(full.trainable), expected, atol=1e-5)


def test_one_compile_per_sal_level():
    config = tiny_config("model.layers=3", "sal.k0=1", "sal.every=4", "rounds=12", "cohort_size=4")
    _, _, engine, _ = run_rounds(config, 12)
    assert engine.num_traces == 3
    assert sorted(p.num_active for p in engine.compiled_phases) == [1, 2, 3]


def test_fedavg_learns_synthetic_task(tmp_path):
    config = tiny_config("rounds=8", "client.local_steps=10", "client.optimizer=adamw", "client.lr=0.01",
                         "algorithm=fedavg", "data.alpha=1.0")
    from fedms_jax.run import run

    out = run(config, tmp_path, progress=False)  # a fresh dir: a stale one would be resumed
    assert out.metrics["accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_bytes_count_active_units_only(vmap_two_rounds):
    from fedms_jax.federated.accounting import bytes_per_client
    from fedms_jax.federated.types import Phase, split_units, tree_bytes
    from fedms_jax.run import build

    exp = build(tiny_config())
    engine, (server, clients) = exp.engine, exp.init_states()
    down1, up1 = bytes_per_client(engine, server, clients, Phase(1, 1))
    down2, _ = bytes_per_client(engine, server, clients, Phase(1, 2))
    units = split_units(server.trainable)
    head = tree_bytes(units["head"])
    block = tree_bytes(units["blocks_1"])
    assert up1 == down1 == head + block
    assert down2 == head + 2 * block


def test_eight_devices_match_one_device(tmp_path, vmap_two_rounds):
    ref, _, _, _ = vmap_two_rounds
    # The session's own XLA flags (conftest) are kept.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out.npz"
    r = subprocess.run([sys.executable, str(HERE / "multidevice_worker.py"), str(out)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    assert int(got["num_devices"]) == 8
    assert int(got["cohort_shards"]) == 8  # the cohort's client axis is split over 8 devices
    np.testing.assert_allclose(got["trainable"], ref, atol=1e-5)
    _, dp_server, _, _ = run_experiment(tiny_config(*DP), 1)
    np.testing.assert_allclose(got["dp_trainable"], flat(dp_server.trainable), atol=1e-5)
    # Evaluation runs through the same placement: split over the 8 devices, same results.
    assert int(got["eval_shards"]) == 8
    evals = vmap_two_rounds[3]
    np.testing.assert_array_equal(got["personal_correct"], evals["personal_correct"])
    np.testing.assert_allclose(got["personal_nll"], evals["personal_nll"], rtol=1e-5)
    np.testing.assert_allclose(got["global"], evals["global"], rtol=1e-5)


def test_fedadam_moves_only_active_units_and_their_state():
    """FedAdam: one optax state per unit; a round at k=1 leaves block 0 and its moments as they were."""
    from fedms_jax.federated.types import split_units
    from fedms_jax.run import build

    config = tiny_config("server.optimizer=fedadam", "server.lr=0.01", "sal.mode=fixed", "sal.k0=1")
    exp = build(config)
    server, clients = exp.init_states()
    s0 = jax.tree_util.tree_map(np.asarray, server)
    server, _, _ = exp.engine.run_round(server, clients, 0, exp.algorithm.phase(0), np.arange(8, dtype=np.int32))
    u0, u1 = split_units(s0.trainable), split_units(server.trainable)
    np.testing.assert_array_equal(flat(u1["blocks_0"]), flat(u0["blocks_0"]))
    assert np.abs(flat(u1["blocks_1"]) - flat(u0["blocks_1"])).max() > 0
    np.testing.assert_array_equal(flat(server.opt_state["blocks_0"]), flat(s0.opt_state["blocks_0"]))
    # Adam's first step moves every coordinate with a non-zero gradient by about lr.
    step = np.abs(flat(u1["head"]) - flat(u0["head"]))
    assert step.max() == pytest.approx(0.01, rel=0.05)


def test_cached_frozen_part_equals_running_it_every_step():
    """client.cache_frozen runs the SAL trunk (and FedMS's frozen global expert) once per round
    over a client's examples; the rounds must equal running them inside every step."""
    from fedms_jax.federated.client import uses_cache

    extra = ("algorithm=fedms", "rounds=3", "stage1_rounds=2", "data.partition=iid",
             "client.batch_size=64")
    outs = {}
    for cache in (True, False):
        config = tiny_config(*extra, f"client.cache_frozen={cache}")
        server, clients, engine, metrics = run_rounds(config, 3)
        max_n = engine.data.images.shape[1]
        assert uses_cache(engine.algorithm.settings, max_n) is cache and max_n <= 2 * 64
        outs[cache] = (server.trainable, clients.local, [m["loss"] for m in metrics])
    # stage 1 at k = 1 (a real trunk below) and 2, then stage 2 (cached global logits)
    np.testing.assert_allclose(outs[True][2], outs[False][2], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(outs[True][:2]), jax.tree_util.tree_leaves(outs[False][:2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
