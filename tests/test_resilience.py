"""Preemption and exact resume, corrupt checkpoints, changed configs, several hosts, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fed_helpers import TINY, flat, tiny_config
from fedms_jax.cli import main
from fedms_jax.config import ConfigError

HERE = Path(__file__).parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE)}
# Slow enough rounds (60 local steps) that a signal lands mid-run.
PREEMPT = [f"--config.{o}" for o in TINY] + [
    "--config.algorithm=fedms", "--config.rounds=10", "--config.stage1_rounds=5", "--config.client.local_steps=60",
    "--config.checkpoint.every=4", "--config.checkpoint.keep=2",
]


def _cli(workdir, *extra):
    return [sys.executable, "-m", "fedms_jax.cli", "run", "--workdir", str(workdir), "--no-progress", *PREEMPT, *extra]


def _lines(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _final_state(workdir, step):
    """A checkpoint's state as numpy, whatever devices (and processes) wrote it."""
    import orbax.checkpoint as ocp

    path = Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    structure = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
    return flat(checkpointer.restore(path, restore_args=as_numpy))


def _without_seconds(lines):
    return [{k: v for k, v in l.items() if k != "seconds"} for l in lines]


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory):
    """A 3-round run checkpointed every round; returns (work dir, its metrics)."""
    from fedms_jax.run import run

    work = tmp_path_factory.mktemp("three")
    run(tiny_config("algorithm=fedms", "rounds=3", "stage1_rounds=1", "checkpoint.every=1",
                    "checkpoint.asynchronous=false"), work, progress=False)
    return work, _lines(work)


def test_corrupt_newest_checkpoint_falls_back(three_rounds, tmp_path):
    from fedms_jax.run import run

    work = tmp_path / "w"
    shutil.copytree(three_rounds[0], work)
    for f in (work / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage" * 8)
    with pytest.warns(UserWarning, match=r"checkpoints/3 is unreadable"):
        out = run(tiny_config("algorithm=fedms", "rounds=4", "stage1_rounds=1", "checkpoint.every=1"), work, progress=False)
    lines = _lines(work)
    assert [l["round"] for l in lines] == [0, 1, 2, 3]
    # Round 2 was run again from the checkpoint after round 2... and came out the same.
    assert _without_seconds(lines[:3]) == _without_seconds(three_rounds[1])
    assert out.metrics["round"] == 3


def test_resume_from_an_asynchronous_periodic_checkpoint_equals_uninterrupted(tmp_path):
    """A DP-FedMS run checkpointed every 2 rounds in the background dies after round 3; the
    rerun restores the asynchronous checkpoint of round 2 (DP ledger included) and ends as the
    uninterrupted run does: same metric lines (epsilon included) and bitwise the same states."""
    from fedms_jax.run import Callback, run

    class Crash(Callback):
        def on_round(self, end):
            if end.done == 3:
                raise RuntimeError("the machine went away")

    overrides = ("algorithm=fedms", "rounds=4", "stage1_rounds=2", "checkpoint.every=2", "checkpoint.asynchronous=true",
                 "dp.clip=1.0", "dp.noise_multiplier=0.5", "dp.reproducible_noise=true", "cohort_size=4")
    whole = run(tiny_config(*overrides), tmp_path / "whole", progress=False)
    with pytest.raises(RuntimeError, match="went away"):
        run(tiny_config(*overrides), tmp_path / "cut", progress=False, callbacks=[Crash()])
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [2]
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["dp"]["rounds"] == 2 and meta["dp"]["noise_multiplier"] == 0.5
    resumed = run(tiny_config(*overrides), tmp_path / "cut", progress=False)
    assert _without_seconds(_lines(tmp_path / "cut")) == _without_seconds(_lines(tmp_path / "whole"))
    # Epsilon in every line: dp-accounting's for t noisy rounds (8 clients, 4 a round, delta 1e-5).
    from test_dp_fedavg import dp_accounting_epsilon

    lines = _lines(tmp_path / "cut")
    assert [l["dp_rounds"] for l in lines] == [1, 2, 3, 4]
    for t, line in enumerate(lines):
        assert line["epsilon"] == pytest.approx(dp_accounting_epsilon(0.5, 8, 4, t + 1, 1e-5), rel=1e-9)
    assert all(a["epsilon"] < b["epsilon"] for a, b in zip(lines, lines[1:]))
    np.testing.assert_array_equal(flat((resumed.server, resumed.clients)), flat((whole.server, whole.clients)))


def test_a_changed_placement_resumes_with_a_warning(three_rounds, tmp_path):
    from fedms_jax.run import run

    work = tmp_path / "w"
    shutil.copytree(three_rounds[0], work)
    with pytest.warns(UserWarning, match=r"config.placement.backend = 'sequential' differs from the checkpoint's "
                                         r"\('vmap'\): resuming, but .* no longer bitwise equal"):
        run(tiny_config("algorithm=fedms", "rounds=4", "stage1_rounds=1", "placement.backend=sequential"), work,
            progress=False)
    assert [l["round"] for l in _lines(work)] == [0, 1, 2, 3]


def test_changed_config_refuses_to_resume_and_names_key(three_rounds, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(three_rounds[0], work)
    before = (work / "metrics.jsonl").read_text()
    args = [f"--config.{o}" for o in TINY] + ["--config.algorithm=fedms", "--config.rounds=4", "--config.stage1_rounds=1"]
    assert main(["run", "--workdir", str(work), "--no-progress", *args, "--config.client.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "config.client.lr = 0.5 differs from the checkpoint" in err and "(0.1)" in err
    assert (work / "metrics.jsonl").read_text() == before  # nothing lost


def test_checkpoint_from_another_format_is_refused(three_rounds, tmp_path):
    from fedms_jax.run import run

    work = tmp_path / "w"
    shutil.copytree(three_rounds[0], work)
    for meta in (work / "checkpoints").glob("*/meta/metadata"):
        data = json.loads(meta.read_text())
        meta.write_text(json.dumps({**data, "format": 0, "fedms_jax": "0.0.1"}))
    with pytest.raises(ConfigError, match=r"written by fedms_jax 0.0.1 \(checkpoint format 0\)"):
        run(tiny_config("algorithm=fedms", "rounds=4", "stage1_rounds=1"), work, progress=False)


def test_nonfinite_client_is_excluded_from_the_aggregate(monkeypatch):
    """Client 3 uploads NaN: the server ends where a round of the other clients alone puts it,
    client 3 keeps its old state, and the round counts one excluded client. An empty client
    (no examples) is excluded the same way."""
    import jax.numpy as jnp

    from fedms_jax.federated import rounds
    from fedms_jax.run import build

    def server_after(cohort, poison=None, empty=None):
        exp = build(tiny_config("algorithm=fedavg"))
        algo, engine = exp.algorithm, exp.engine
        if poison is not None:
            original = rounds.client_update

            def client_update(*args):
                fn = original(*args)

                def poisoned(broadcast, client):
                    out = fn(broadcast, client)
                    bad = client["id"] == poison
                    nan = jax.tree_util.tree_map(lambda u: jnp.where(bad, jnp.nan, u), out.upload)
                    return out._replace(upload=nan)

                return poisoned

            monkeypatch.setattr(rounds, "client_update", client_update)  # wrapped by the engine's guard
        if empty is not None:
            engine.data = engine.data.replace(counts=engine.data.counts.at[empty].set(0))
        server, clients, m = engine.run_round(*exp.init_states(), 0, algo.phase(0), np.asarray(cohort, np.int32))
        monkeypatch.undo()
        return flat(server.trainable), np.asarray(clients.participation), m

    ref, _, m_ref = server_after([1, 5])
    got, part, m = server_after([1, 3, 5], poison=3)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=1e-7)
    assert float(m["excluded_clients"]) == 1 and float(m_ref["excluded_clients"]) == 0
    assert part[3] == 0 and part[1] == part[5] == 1
    np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-6)
    got_empty, _, m_empty = server_after([1, 3, 5], empty=3)
    np.testing.assert_allclose(got_empty, ref, atol=1e-7)
    assert float(m_empty["excluded_clients"]) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, port, *extra):
    """The two processes of a gloo job running the PREEMPT config through the CLI."""
    procs = []
    for i in (0, 1):
        env = {**ENV, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(_cli(workdir, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_for_rounds(workdir, procs, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        path = Path(workdir) / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)


def _one_process(workdir, *extra):
    return [subprocess.Popen(_cli(workdir, *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]


def _finish(procs, timeout=600):
    """Waits for ``procs`` -> (return codes, stderr texts)."""
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    return [p.returncode for p in procs], errs


def test_sigterm_to_one_of_two_processes_both_save_the_same_round_then_resume_bitwise(tmp_path):
    """A two-process gloo job where only process 1 gets SIGTERM mid-run (one VM of a slice
    reclaimed): both processes save the same round and exit 143; the same command again resumes
    and ends bitwise equal to an uninterrupted two-process run, which agrees with one process.
    A copy whose newest checkpoint is corrupt falls back to the one before on both processes,
    set aside once, and ends the same too."""
    fast = "--config.client.local_steps=20"
    whole = [*_one_process(tmp_path / "whole1", fast), *_two_processes(tmp_path / "whole2", _free_port(), fast)]
    codes, errs = _finish(whole[1:])  # (the interrupted job then finds every program in the compilation cache)
    assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
    cut = _two_processes(tmp_path / "cut", _free_port(), fast)
    _wait_for_rounds(tmp_path / "cut", cut, 5)  # after the periodic checkpoint of round 4
    cut[1].send_signal(signal.SIGTERM)
    codes, errs = _finish(cut, 300)
    assert codes == [128 + signal.SIGTERM] * 2, "\n".join(e[-2000:] for e in errs)
    done = len(_lines(tmp_path / "cut"))
    assert 5 <= done < 10
    for e in errs:  # every process saved the round in flight when the signal came
        assert f"saved the state after round {done}" in e and "rerun the same command to resume" in e, e[-2000:]
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [4, done]
    # A copy whose newest checkpoint is corrupt: both processes must skip it and resume from round 4.
    shutil.copytree(tmp_path / "cut", tmp_path / "corrupt")
    for f in (tmp_path / "corrupt" / "checkpoints" / str(done) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage" * 8)
    again = _two_processes(tmp_path / "cut", _free_port(), fast)
    fallback = _two_processes(tmp_path / "corrupt", _free_port(), fast)
    for procs in (whole[:1], again, fallback):
        codes, errs = _finish(procs)
        assert codes == [0] * len(procs), "\n".join(e[-2000:] for e in errs)
    assert all(f"checkpoints/{done} is unreadable" in e for e in errs)  # (fallback's stderr, both processes)
    assert len(list((tmp_path / "corrupt" / "checkpoints_unreadable").iterdir())) == 1  # moved once
    for name in ("cut", "corrupt"):
        got, want = _without_seconds(_lines(tmp_path / name)), _without_seconds(_lines(tmp_path / "whole2"))
        assert [l["round"] for l in got] == [l["round"] for l in want]
        for g, w in zip(got, want):
            if name == "cut" and g["round"] == done - 1:  # saved on the signal without its evaluation
                assert "personalized_accuracy" not in g
                same = ("round", "stage", "active_blocks", "loss", "cohort", "bytes_up", "bytes_down")
                g, w = ({k: l[k] for k in same} for l in (g, w))
            assert g == w
        np.testing.assert_array_equal(_final_state(tmp_path / name, 10), _final_state(tmp_path / "whole2", 10))
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [8, 10]  # keep=2
    # Two processes compute what one does, up to the order of float sums (which 10 rounds of
    # local training amplify: compare the first rounds).
    one, two = _lines(tmp_path / "whole1")[:3], _lines(tmp_path / "whole2")[:3]
    np.testing.assert_allclose([l["loss"] for l in two], [l["loss"] for l in one], rtol=1e-5)
    assert [l["accuracy"] for l in two] == [l["accuracy"] for l in one]


def test_sigterm_to_one_of_two_processes_in_start_up_stops_both(tmp_path):
    """A SIGTERM to process 1 while the processes build the run (before any round): process 0
    hears of it through the key-value store, both end 143 with the start-up message, with no
    traceback and no XLA abort, and nothing was checkpointed."""
    procs = _two_processes(tmp_path / "w", _free_port())
    deadline = time.time() + 120
    while not (tmp_path / "w").exists() and time.time() < deadline:  # made by ``run``: connected
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    codes, errs = _finish(procs, 300)
    assert codes == [128 + signal.SIGTERM] * 2, "\n".join(e[-3000:] for e in errs)
    for e in errs:
        assert "caught SIGTERM during start-up" in e and "Traceback" not in e, e[-3000:]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_kill_9_of_one_process_ends_the_other_with_a_message(tmp_path):
    # Killed in stage 1, past its compiles: process 0's next collective breaks at once. (Were it
    # to sit more than multihost.timeout_s without one, e.g. waiting for a compile, the
    # coordination heartbeat would end it instead, with XLA's own fatal message.)
    procs = _two_processes(tmp_path / "w", _free_port(), "--config.multihost.timeout_s=30")
    _wait_for_rounds(tmp_path / "w", procs, 2)
    procs[1].kill()
    killed = time.time()
    _, err = procs[0].communicate(timeout=120)  # never a hang
    assert procs[0].returncode not in (0, None) and time.time() - killed < 60
    assert "fedms-jax: error:" in err and "rerun the job to resume" in err, err[-3000:]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- bad input


def _run_cli(tmp_path, capsys, *overrides):
    work = tmp_path / "never"
    args = [f"--config.{o}" for o in TINY] + [f"--config.{o}" for o in overrides]
    status = main(["run", "--workdir", str(work), "--no-progress", *args])
    assert not work.exists(), "a failed start must not leave a work dir behind"
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.name=cifar10", "data.data_dir=/nonexistent/tfds"], "TFDS dataset 'cifar10' split 'train' is not prepared"),
        (["model.pretrained=/nonexistent/checkpoint"], "checkpoint directory '/nonexistent/checkpoint' does not exist"),
        (["model.pretrained=someone/some-vit"], "someone/some-vit"),
        (["data.name=no_such_dataset_xyz"], "data.name 'no_such_dataset_xyz' is not a TFDS dataset"),
    ],
)
def test_bad_input_from_the_command_line(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, err = _run_cli(tmp_path, capsys, *overrides)
    assert status == 1 and message in err, err


def test_client_without_examples_is_refused(monkeypatch):
    from fedms_jax import experiment as run_module
    from fedms_jax.data.dataset import DataError

    original = run_module.partition_clients

    def with_empty_client(config, train, test):
        parts, test_parts = original(config, train, test)
        return [parts[0][:0]] + parts[1:], test_parts

    monkeypatch.setattr(run_module, "partition_clients", with_empty_client)
    with pytest.raises(DataError, match=r"client\(s\) \[0\] have no training examples"):
        run_module.build(tiny_config())


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 12]), r"label 12 is out of range \[0, 10\)"),
        (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32), r"must be uint8 \[N, H, W, C\], got float32"),
        (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int32), r"got uint8 \(4, 8, 8\)"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3, np.int32), r"labels must have shape \[4\], got \(3,\)"),
    ],
)
def test_malformed_data_is_refused(images, labels, message):
    from fedms_jax.data.sources import DataError, Dataset

    with pytest.raises(DataError, match=message):
        Dataset(images, labels, tuple(str(i) for i in range(10)))


def test_wrong_image_shape_for_the_model_is_refused(tiny_expert, tiny_backbone):
    import jax.numpy as jnp

    trainable = tiny_expert.init_trainable(jax.random.key(0))
    with pytest.raises(ValueError, match="16"):
        tiny_expert.logits(tiny_backbone, trainable, jnp.zeros((2, 12, 12, 3)), 1)


def test_report_of_missing_workdir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_report_writes_summary_plots_and_tensorboard(three_rounds, tmp_path):
    from tensorboardX.proto import event_pb2

    work, lines = three_rounds
    assert main(["report", str(work), "--out", str(tmp_path / "r"), "--tensorboard"]) == 0
    md = (tmp_path / "r" / "summary.md").read_text()
    assert f"| final personalised accuracy | {lines[-1]['personalized_accuracy']:.4f} |" in md
    for png in ("accuracy.png", "loss.png", "bytes.png", "active_blocks.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in md
    # TFRecord framing: u64 length, u32 crc, payload, u32 crc.
    (events,) = (tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*")
    raw, seen = events.read_bytes(), {}
    while raw:
        n = int.from_bytes(raw[:8], "little")
        event = event_pb2.Event.FromString(raw[12 : 12 + n])
        raw = raw[16 + n :]
        for v in event.summary.value:
            seen[(v.tag, event.step)] = v.simple_value
    assert seen[("personalized_accuracy", 3)] == pytest.approx(lines[-1]["personalized_accuracy"], rel=1e-6)
    assert seen[("loss", 1)] == pytest.approx(lines[0]["loss"], rel=1e-6)


def test_keys_added_after_a_checkpoint_count_as_unchanged_at_their_default():
    """A checkpoint written before a config key existed resumes when the key holds its
    built-in default, and not when it was changed."""
    from fedms_jax.checkpoint import config_changes, config_fingerprint

    config = tiny_config()
    old = {k: v for k, v in config_fingerprint(config).items() if not k.startswith("data.train_examples")}
    assert config_changes(old, config) == []
    changed = tiny_config("data.train_examples=100")
    assert config_changes(old, changed) == [("data.train_examples", "<absent>", 100)]
