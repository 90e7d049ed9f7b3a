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
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(Path(workdir).absolute() / "checkpoints" / str(step) / "state")
    return flat(tree)


def _without_seconds(lines):
    return [{k: v for k, v in l.items() if k != "seconds"} for l in lines]


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    whole = subprocess.run(_cli(tmp_path / "whole"), env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    work = tmp_path / "cut"
    proc = subprocess.Popen(_cli(work), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (work / "metrics.jsonl").exists() and len((work / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    done = len(_lines(work))
    assert 2 <= done < 10
    assert f"saved the state after round {done}" in err and "rerun the same command to resume" in err

    again = subprocess.run(_cli(work), env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _without_seconds(_lines(work)) == _without_seconds(_lines(tmp_path / "whole"))
    np.testing.assert_array_equal(_final_state(work, 10), _final_state(tmp_path / "whole", 10))
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [8, 10]  # keep=2


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


def test_two_gloo_processes_equal_one_process(tmp_path):
    port, single_port = str(_free_port()), str(_free_port())
    worker = [sys.executable, str(HERE / "multihost_worker.py")]
    # The two-process job and the one-process reference run at the same time.
    args = [[str(i), "2", port] for i in (0, 1)] + [["0", "1", single_port]]
    procs = [subprocess.Popen(worker + a + [str(tmp_path)], env=ENV, cwd=HERE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in args]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    np.testing.assert_allclose(np.load(tmp_path / "server_2.npy"), np.load(tmp_path / "server_1.npy"), atol=1e-6)
    # Metrics and checkpoints were written once, by process 0.
    assert len(_lines(tmp_path / "w2")) == 3
    assert sorted(p.name for p in (tmp_path / "w2" / "checkpoints").iterdir()) == ["3"]


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
    from fedms_jax import run as run_module
    from fedms_jax.data.sources import DataError

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
