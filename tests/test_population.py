"""Populations beyond device memory (``population.mode``): the streamed mode against the device
mode, the client store and its incremental checkpoints, bucketed client sizes, sampled
personalised evaluation."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fed_helpers import flat, tiny_config
from fedms_jax.budgets import uniform_cohort
from fedms_jax.config import ConfigError
from fedms_jax.data.clients import FlatClients, bucket_of, bucket_sizes, stack_clients
from fedms_jax.data.sources import Dataset
from fedms_jax.federated import population
from fedms_jax.federated.client import Sampler
from fedms_jax.federated.store import ClientCheckpoints, StateStore, StoreError
from fedms_jax.run import run

HERE = Path(__file__).parent
N, M, ROUNDS = 12, 4, 5
# FedMS with persistent local experts and gate heads (stage 2 from round 2), checkpoints after
# rounds 2, 4 and 5 of which the newest two are kept: the last restore needs the delta of round 2.
POP = ["algorithm=fedms", "stage1_rounds=2", f"data.num_clients={N}", f"cohort_size={M}", "data.min_examples=4",
       "checkpoint.every=2", "checkpoint.keep=2", "eval_every=5", "population.buckets=1"]


def _config(mode: str, *extra: str):
    return tiny_config(*POP, f"rounds={ROUNDS}", f"population.mode={mode}", *extra)


def _lines(workdir) -> list[dict]:
    drop = ("seconds",)
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same FedMS run with every client on the device, and streamed (one bucket: the device
    mode's padded size)."""
    out = {}
    for mode in ("device", "streamed"):
        workdir = tmp_path_factory.mktemp(mode)
        out[mode] = (workdir, run(_config(mode), workdir, progress=False))
    return out


def _states(result) -> object:
    clients = result.clients
    if isinstance(clients, population.Streamed):
        return clients.read(np.arange(N))
    return jax.device_get(clients)


def test_streamed_rounds_equal_device_rounds_bitwise(runs):
    (dev_dir, dev), (st_dir, st) = runs["device"], runs["streamed"]
    assert dev.experiment.mode == "device" and st.experiment.mode == "streamed"
    assert st.experiment.engine.data is None  # nothing of the population on the device
    assert np.array_equal(flat(dev.server), flat(st.server))
    assert np.array_equal(flat(_states(dev)), flat(_states(st)))
    assert _lines(dev_dir) == _lines(st_dir)  # losses, gate statistics, evaluation: every metric


def test_store_writes_exactly_the_sampled_clients_and_checkpoints_exactly_the_changed(runs, tmp_path):
    workdir, result = runs["streamed"]
    streamed = result.clients
    cohorts = [uniform_cohort(0, t, N, M) for t in range(ROUNDS)]
    sampled = np.unique(np.concatenate(cohorts))
    never = np.setdiff1d(np.arange(N), sampled)
    assert len(never) > 0, "the fixture should leave some client out"
    np.testing.assert_array_equal(streamed.store.written_ids(), sampled)
    # A never-sampled client reads the initial state, bitwise, and has no row on disk.
    fresh = result.experiment.init_states(tmp_path)[1].read(never)
    np.testing.assert_array_equal(flat(streamed.read(never)), flat(fresh))
    assert all((streamed.store.slot[never] < 0))
    # Each delta holds exactly the clients sampled since the checkpoint before it.
    ck = workdir / "client_checkpoints"
    for step, since in ((4, (2, 3)), (5, (4,))):
        with np.load(ck / f"delta-{step}.npz") as z:
            np.testing.assert_array_equal(z["ids"], np.unique(np.concatenate([cohorts[t] for t in since])))
    # Orbax kept rounds 4 and 5; round 2's delta stays as long as their manifests name it.
    assert sorted(p.name for p in ck.iterdir()) == ["delta-2.npz", "delta-4.npz", "delta-5.npz",
                                                     "manifest-4.npz", "manifest-5.npz"]
    with np.load(ck / "manifest-5.npz") as z:
        np.testing.assert_array_equal(z["ids"], sampled)
        newest = {int(i): int(s) for i, s in zip(z["ids"], z["steps"])}
    last = {int(c): t + 1 for t, cohort in enumerate(cohorts) for c in cohort}  # round after which each last trained
    assert newest == {c: (2 if t <= 2 else 4 if t <= 4 else 5) for c, t in last.items()}


def test_resume_from_a_chain_of_incremental_checkpoints_equals_the_uninterrupted_run(runs, tmp_path):
    _, whole = runs["streamed"]
    run(_config("streamed", "rounds=3"), tmp_path, progress=False)  # checkpoints after rounds 2 and 3
    resumed = run(_config("streamed"), tmp_path, progress=False)  # restores 3: deltas 2 and 3
    assert np.array_equal(flat(resumed.server), flat(whole.server))
    assert np.array_equal(flat(_states(resumed)), flat(_states(whole)))
    got, want = _lines(tmp_path), _lines(runs["streamed"][0])
    assert [l["loss"] for l in got] == [l["loss"] for l in want]
    assert got[3:] == want[3:]  # (the 3-round run evaluated after its last round; this one did not)


def _digest(workdir) -> dict[str, str]:
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and "client_store" not in p.parts}


@pytest.mark.parametrize("damage", ["corrupt delta", "missing delta", "missing manifest", "truncated manifest"])
def test_a_damaged_client_store_file_is_a_clear_error_naming_it(runs, tmp_path, damage):
    workdir = tmp_path / "w"
    shutil.copytree(runs["streamed"][0], workdir, ignore=shutil.ignore_patterns("client_store"))
    ck = workdir / "client_checkpoints"
    target = ck / ("delta-4.npz" if "delta" in damage else "manifest-5.npz")  # round 5 restores from deltas 2, 4 and 5
    if damage == "corrupt delta":  # flip bytes inside a member: its CRC-32 no longer matches
        data = bytearray(target.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncated manifest":
        target.write_bytes(target.read_bytes()[:40])
    else:
        target.unlink()
    before = _digest(workdir)
    with pytest.raises(StoreError, match=str(target).replace(".", r"\.")):
        run(_config("streamed", "rounds=6"), workdir, progress=False)
    assert _digest(workdir) == before  # no round ran, nothing was written or moved


def test_a_checkpoint_of_the_other_mode_is_refused(runs, tmp_path):
    shutil.copytree(runs["device"][0], tmp_path / "w")
    with pytest.raises(ConfigError, match="population.mode=device"):
        run(_config("streamed", "rounds=6"), tmp_path / "w", progress=False)


# --- the store and its checkpoints, without a model --------------------------------------------
TEMPLATE = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "ready": np.zeros((), bool), "n": np.int32(7)}


def _states_of(ids, value):
    return {"a": np.full((len(ids), 2, 3), value, np.float32), "ready": np.ones(len(ids), bool),
            "n": np.asarray(ids, np.int32)}


def test_store_rows_template_growth_and_chain(tmp_path):
    store = StateStore(tmp_path / "s", TEMPLATE, 1000, capacity=2)
    ck = ClientCheckpoints(tmp_path / "c")
    store.write([5, 900, 7], _states_of([5, 900, 7], 1.0))  # grows past its capacity of 2
    assert store.written == 3 and store.capacity >= 3
    assert ck.save(1, store) == {"clients": 3, "bytes": (tmp_path / "c" / "delta-1.npz").stat().st_size
                                 + (tmp_path / "c" / "manifest-1.npz").stat().st_size}
    store.write([7, 11], _states_of([7, 11], 2.0))
    assert ck.save(2, store)["clients"] == 2  # only what changed since round 1
    got = store.read([5, 7, 11, 0])
    np.testing.assert_array_equal(got["a"][:, 0, 0], [1.0, 2.0, 2.0, 0.0])  # client 0: the template
    np.testing.assert_array_equal(got["n"], [5, 7, 11, 7])
    # The newest manifest restores everything from both deltas into a fresh store, bitwise.
    fresh = StateStore(tmp_path / "s2", TEMPLATE, 1000)
    ClientCheckpoints(tmp_path / "c").restore(2, fresh)
    ids = np.arange(1000)
    for k in TEMPLATE:
        np.testing.assert_array_equal(fresh.read(ids)[k], store.read(ids)[k])
    np.testing.assert_array_equal(fresh.written_ids(), [5, 7, 11, 900])
    ck.prune([2])  # delta 1 is still named by manifest 2 (clients 5 and 900)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["delta-1.npz", "delta-2.npz", "manifest-2.npz"]


def test_store_refuses_a_manifest_of_another_population(tmp_path):
    store = StateStore(tmp_path / "s", TEMPLATE, 10)
    store.write([1], _states_of([1], 1.0))
    ClientCheckpoints(tmp_path / "c").save(1, store)
    with pytest.raises(StoreError, match="manifest-1.npz"):
        ClientCheckpoints(tmp_path / "c").restore(1, StateStore(tmp_path / "s2", TEMPLATE, 11))


# --- bucketed sizes ----------------------------------------------------------------------------
def test_buckets_reach_every_example_and_never_a_padded_one():
    rng = np.random.default_rng(0)
    counts = np.concatenate([rng.integers(1, 40, 60), [300]])  # one outlier
    n = counts.sum()
    images = rng.integers(0, 255, (n, 2, 2, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    order = rng.permutation(n)
    parts = np.split(order, np.cumsum(counts)[:-1])
    data = Dataset(images, labels, tuple(str(i) for i in range(10)))
    flat_clients = FlatClients.from_parts(data, parts)
    sizes = bucket_sizes(flat_clients.counts, 4)
    assert sizes == (40, 80, 152, 300) and max(sizes) == max(counts)  # the device mode's padding is the largest
    stacked = stack_clients(data, parts)
    for ids in (np.array([3, 7, 9]), np.array([60, 1]), np.arange(61)):
        size = bucket_of(sizes, counts[ids].max())
        got = flat_clients.gather(ids, size)
        assert got.images.shape[1] == size and (size == 300) == (60 in ids)
        for row, c in enumerate(ids):
            k = counts[c]
            np.testing.assert_array_equal(got.images[row, :k], images[parts[c]])
            np.testing.assert_array_equal(got.labels[row, :k], labels[parts[c]])
            assert not got.images[row, k:].any() and not got.labels[row, k:].any()
            np.testing.assert_array_equal(got.images[row, :k], stacked.images[c, :k])  # the device mode's rows
        np.testing.assert_array_equal(got.counts, counts[ids])


@pytest.mark.parametrize("holdout", [0.0, 0.25])
def test_the_sampler_reads_only_real_examples_at_every_padded_size(holdout):
    """A client's epoch orders and held-out slice at a padded size: every training example once
    per epoch, no padded position, and the same draws at every padded size (prefixes of one
    stream), so a bucket changes the padding, not what trains."""
    class S:
        batch_size, epochs, local_steps = 4, 2, 0

    count, key, split = jnp.int32(13), jax.random.key(1), jax.random.key(2)
    seen = {}
    for size in (13, 16, 64):
        sampler = Sampler(S, holdout, count, size, key, split)
        steps = S.epochs * -(-size // S.batch_size)
        idx, mask = jax.vmap(sampler.batch)(jnp.arange(steps))
        idx, mask = np.asarray(idx), np.asarray(mask)
        real = idx[mask > 0]
        held = int(sampler.held)
        assert real.max() < int(count)
        per_epoch = np.split(real, 2)
        train = np.asarray(sampler.order[held:int(count)]) if holdout else np.arange(int(count))
        for epoch in per_epoch:
            np.testing.assert_array_equal(np.sort(epoch), np.sort(train))
        if holdout:
            h_idx, _ = jax.vmap(sampler.held_batch)(jnp.arange(steps))
            assert set(np.asarray(h_idx).ravel()) <= set(np.asarray(sampler.order[:held]).tolist())
        seen[size] = real
    assert all(np.array_equal(seen[13], v) for v in seen.values())


# --- mode choice and sampled evaluation ----------------------------------------------------------
def test_auto_mode_and_the_evaluation_sample():
    gb = 1 << 30
    assert population.choose_mode("auto", 20, 1 * gb, 24 * gb) == "device"
    assert population.choose_mode("auto", 20, 7 * gb, 24 * gb) == "streamed"  # over a quarter
    assert population.choose_mode("auto", 100_000, 1, 24 * gb) == "streamed"
    assert population.choose_mode("device", 100_000, 1 << 50, 1) == "device"  # asked for
    assert population.eval_ids(0, 1024, 0) is None and population.eval_ids(0, 50, 100) is None
    ids = population.eval_ids(3, 100_000, 0)
    assert len(ids) == 1024 and len(np.unique(ids)) == 1024 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, population.eval_ids(3, 100_000, 0))  # seeded: every evaluation the same
    assert not np.array_equal(ids, population.eval_ids(4, 100_000, 0))


@pytest.mark.parametrize("mode", ["device", "streamed"])
def test_sampled_personalised_evaluation_is_the_sampled_clients_own(runs, mode):
    """A sampled evaluation equals the full evaluation's per-client sums at the sampled ids."""
    from fedms_jax.run import build

    _, whole = runs[mode]
    exp = whole.experiment
    phase = exp.algorithm.phase(ROUNDS - 1)
    full = exp.engine.evaluate_clients(whole.server, exp.evaluated_states(whole.clients), phase, exp.client_test)
    assert exp.eval_ids is None and whole.metrics["personalized_clients"] == N
    sampled = build(_config(mode, "population.eval_sample=5"))
    ids = sampled.eval_ids
    assert len(ids) == 5 and sampled.client_test.counts.shape == (5,)
    np.testing.assert_array_equal(np.asarray(sampled.client_test.counts), full["count"][ids])
    out = sampled.evaluate(whole.server, whole.clients, phase)
    assert out["personalized_clients"] == 5
    assert out["personalized_accuracy"] == pytest.approx(full["correct"][ids].sum() / full["count"][ids].sum(), abs=1e-6)
    assert out["personalized_loss"] == pytest.approx(full["nll"][ids].sum() / full["count"][ids].sum(), rel=1e-5)


def test_a_streamed_run_preempted_by_sigterm_resumes_bitwise(runs, tmp_path):
    """SIGTERM after round 3 (between periodic checkpoints): the round is saved (client delta 3
    on top of delta 2), the run stops with Preempted, and the same call resumes to the end."""
    import signal

    from fedms_jax.run import Callback, Preempted

    class Terminate(Callback):
        def on_round(self, end):
            if end.done == 3:
                signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Preempted) as stopped:
        run(_config("streamed"), tmp_path, progress=False, callbacks=[Terminate()])
    assert stopped.value.rounds_done == 3
    resumed = run(_config("streamed"), tmp_path, progress=False)
    _, whole = runs["streamed"]
    assert np.array_equal(flat(resumed.server), flat(whole.server))
    assert np.array_equal(flat(_states(resumed)), flat(_states(whole)))
    assert _lines(tmp_path) == _lines(runs["streamed"][0])


def test_every_algorithm_starts_every_client_from_one_state():
    """The streamed store's template (one client's initial state) stands for every client."""
    from fedms_jax.config import ALGORITHMS
    from fedms_jax.run import build

    for name in ALGORITHMS:
        exp = build(tiny_config(*POP, f"algorithm={name}", "rounds=3", "stage1_rounds=1"))
        key = jax.random.key(0)
        server, many = jax.jit(exp.algorithm.init, static_argnums=1)(key, 3)
        server1, one = population.template_states(exp.algorithm.init, key)
        for a, b in zip(jax.tree_util.tree_leaves(server), jax.tree_util.tree_leaves(server1), strict=True):
            np.testing.assert_array_equal(a, b)
        for row in range(3):
            np.testing.assert_array_equal(flat(jax.tree_util.tree_map(lambda x: x[row], many)), flat(one))


def test_streamed_budget_tiers_equal_device_tiers_bitwise(tmp_path):
    """Budget-aware rounds (tier groups, each gathered at its own positions) streamed."""
    tiers = ["sal.budgets=1,2", "sal.budget_shares=0.5,0.5", "rounds=3", "eval_every=3"]
    out = {}
    for mode in ("device", "streamed"):
        r = run(_config(mode, *tiers), tmp_path / mode, progress=False)
        out[mode] = (flat(r.server), flat(_states(r)), _lines(tmp_path / mode))
    assert np.array_equal(out["device"][0], out["streamed"][0])
    assert np.array_equal(out["device"][1], out["streamed"][1])
    assert out["device"][2] == out["streamed"][2]


def test_streamed_cohorts_split_over_four_devices_equal_device_mode_bitwise(tmp_path):
    """On 4 devices a streamed cohort's states and data are split over the client axis (each
    device holds its 4 of the 16 clients' rows, in and out), budget tiers and two chunks per
    tier included, and the run is bitwise the device mode's (replicated population)."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out.npz"
    r = subprocess.run([sys.executable, str(HERE / "population_worker.py"), str(out), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    assert got["shard_rows"].tolist() == [4]
    assert np.array_equal(got["device_server"], got["streamed_server"])
    assert np.array_equal(got["device_states"], got["streamed_states"])
    assert json.loads(str(got["device_lines"])) == json.loads(str(got["streamed_lines"]))
