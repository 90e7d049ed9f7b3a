"""Reliability on real faults: full disks (a real tmpfs), torn files, real signals, hostile
inputs (a real gz bomb, a real 9000x9000 PNG under RLIMIT_AS), divergence, DP secrecy."""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fed_helpers import TINY, tiny_config
from fedms_jax.storage import StorageError

HERE = Path(__file__).parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE)}
DP = ("dp.clip=0.05", "dp.noise_multiplier=1.0")  # the default: secret noise
STREAMED = ("population.mode=streamed", "algorithm=fedms", "stage1_rounds=1", "data.num_clients=16",
            "cohort_size=4", "checkpoint.every=1", "checkpoint.keep=1")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``path`` (skips where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int = 0) -> Path:
    """Fills the file system of ``path`` with a ballast file, leaving ``leave`` bytes free."""
    ballast = path / "ballast"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(ballast, "ab") as f:
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, max(0, free - leave))
    return ballast


def _cli(workdir, *overrides, **kw):
    args = [sys.executable, "-m", "fedms_jax.cli", "run", "--workdir", str(workdir), "--no-progress",
            *[f"--config.{o}" for o in (*TINY, *overrides)]]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def _lines(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _without_seconds(lines):
    return [{k: v for k, v in l.items() if k != "seconds"} for l in lines]


def _one_error_line(stderr: str) -> str:
    errors = [l for l in stderr.splitlines() if l.startswith("fedms-jax: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def streamed_whole(tmp_path_factory):
    """An uninterrupted streamed run (the oracle of the resumes)."""
    from fedms_jax.run import run

    work = tmp_path_factory.mktemp("whole")
    run(tiny_config(*STREAMED, "rounds=4"), work, progress=False)
    return work, _lines(work)


# ---------------------------------------------------------------- 1, 2: retention and full disks
def test_a_failed_asynchronous_save_on_a_full_disk_keeps_the_step_before(streamed_whole, tmp_path, monkeypatch):
    """keep=1: the disk fills after round 3's client files, so orbax's asynchronous save of
    round 3 fails. orbax then no longer lists round 2, which is still on disk: the client files
    of round 2 must survive, the run must end with a StorageError, and the rerun (with space)
    resumes from round 2 and ends bitwise as the uninterrupted run."""
    from fedms_jax.federated import population
    from fedms_jax.run import run

    with tmpfs(tmp_path / "disk", "64m") as disk:
        work = disk / "w"
        original = population.Streamed.checkpoint

        def then_fill(self, step):
            out = original(self, step)
            if step == 3:
                fill(disk)
            return out

        monkeypatch.setattr(population.Streamed, "checkpoint", then_fill)
        with pytest.raises(StorageError, match=r"cannot write .* the disk is full .*restorable: rounds 2"):
            run(tiny_config(*STREAMED, "rounds=4"), work, progress=False)
        monkeypatch.undo()
        names = sorted(p.name for p in (work / "client_checkpoints").iterdir())
        assert "manifest-2.npz" in names and not [n for n in names if n.endswith(".tmp")], names
        (disk / "ballast").unlink()
        result = run(tiny_config(*STREAMED, "rounds=4"), work, progress=False)
        assert not list((work / "checkpoints").glob("*orbax-checkpoint-tmp*"))
        assert _without_seconds(_lines(work)) == _without_seconds(streamed_whole[1])
    assert result.metrics["round"] == 3


def test_the_client_store_on_a_full_disk_raises_instead_of_sigbus(tmp_path):
    """The memory-mapped client store grows by reserving its blocks: on a full tmpfs the growth
    raises StorageError (a sparse file would have died of SIGBUS on the first write)."""
    script = textwrap.dedent(f"""
        import numpy as np
        from fedms_jax.federated.store import StateStore
        from fedms_jax.storage import StorageError
        store = StateStore({str(tmp_path / 'disk' / 'store')!r}, {{"w": np.zeros(4096, np.float32)}}, 10_000, capacity=8)
        try:
            for i in range(0, 10_000, 8):
                ids = np.arange(i, i + 8)
                store.write(ids, {{"w": np.ones((8, 4096), np.float32)}})
        except StorageError as e:
            print("StorageError:", e)
    """)
    with tmpfs(tmp_path / "disk", "1m"):
        done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7 would be SIGBUS
    assert re.search(r"StorageError: cannot write the client store .* the disk is full .* needed about", done.stdout), done.stdout


def test_a_full_disk_ends_the_cli_with_one_line_and_the_rerun_resumes_bitwise(tmp_path):
    """A device-mode run on a tmpfs too small for its checkpoints: exit 1 with one line naming
    the path; every step written before stays restorable; with room again, the same command
    resumes and ends as the uninterrupted run."""
    args = ("algorithm=fedms", "rounds=4", "stage1_rounds=1", "checkpoint.every=1", "checkpoint.keep=2")
    whole = _cli(tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    step = sum(f.stat().st_size for f in (tmp_path / "whole" / "checkpoints" / "4").rglob("*") if f.is_file())
    with tmpfs(tmp_path / "disk", f"{int(2.5 * step) // 4096 * 4096 + 65536}") as disk:
        cut = _cli(disk / "w", *args)
        assert cut.returncode == 1, cut.stderr[-3000:]
        line = _one_error_line(cut.stderr)
        assert "the disk is full" in line and str(disk / "w") in line, line
        from fedms_jax.checkpoint import Checkpointer

        kept = Checkpointer(disk / "w" / "checkpoints", every=1, keep=2).restorable_steps()
        assert kept and max(kept) < 4
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = _cli(disk / "w", *args)
        assert again.returncode == 0, again.stderr[-2000:]
        assert _without_seconds(_lines(disk / "w")) == _without_seconds(_lines(tmp_path / "whole"))


# ---------------------------------------------------------------- 3: torn metrics
def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    from fedms_jax.run import run

    config = tiny_config("rounds=3", "checkpoint.every=1", "checkpoint.asynchronous=false")
    run(config, tmp_path / "whole", progress=False)
    run(tiny_config("rounds=2", "checkpoint.every=1", "checkpoint.asynchronous=false"), tmp_path / "cut", progress=False)
    path = tmp_path / "cut" / "metrics.jsonl"
    full = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    with open(path, "a") as f:  # round 2's line, cut by a power loss half-way
        f.write(full[2][: len(full[2]) // 2])
    with pytest.warns(UserWarning, match="dropped its damaged last line 3"):
        run(config, tmp_path / "cut", progress=False)
    assert _without_seconds(_lines(tmp_path / "cut")) == _without_seconds(_lines(tmp_path / "whole"))


def test_atomically_written_files_get_the_mode_open_would_give_them(tmp_path):
    from fedms_jax.storage import atomic_file

    with open(tmp_path / "plain", "wb") as f:  # the oracle: what open() makes under this umask
        f.write(b"x")
    with atomic_file(tmp_path / "atomic", "a test file") as f:
        f.write(b"x")
    mode = os.stat(tmp_path / "atomic").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777
    assert mode & 0o044, oct(mode)  # not mkstemp's owner-only 0600


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    from fedms_jax.storage import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1, "lo\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)
    path.write_text('{"round": 0}\n{"round": 1, "lo')
    with pytest.warns(UserWarning, match="torn write"):
        assert read_jsonl(path) == [{"round": 0}]


# ---------------------------------------------------------------- 4: DP secrecy
def _first_round(config):
    from fedms_jax.experiment import build
    from fed_helpers import flat

    exp = build(config)
    server, clients = exp.init_states()
    server, _, _ = exp.engine.run_round(server, clients, 0, exp.algorithm.phase(0), exp.cohort(0))
    return flat(server.params if hasattr(server, "params") else server), exp


def test_dp_noise_comes_from_a_secret_and_the_reproducible_mode_says_so(tmp_path):
    config = tiny_config(*DP, "data.num_clients=16", "cohort_size=8")
    one, exp1 = _first_round(config)
    two, exp2 = _first_round(config)
    assert exp1.secret_noise and not np.array_equal(one, two), "two runs of one config added the same noise"
    assert exp1.cohort_seed != exp2.cohort_seed and exp1.cohort_seed is not None
    assert str(exp1.cohort_seed) not in repr(exp1) and str(exp1.cohort_seed) not in repr(exp1.resources)
    same = tiny_config(*DP, "data.num_clients=16", "cohort_size=8", "dp.reproducible_noise=true")
    a, e = _first_round(same)
    b, _ = _first_round(same)
    assert not e.secret_noise
    np.testing.assert_array_equal(a, b)


def test_the_secret_is_in_no_file_and_raw_metrics_stay_out_of_the_epsilon_lines(tmp_path):
    from fedms_jax.run import RELEASED, RELEASED_EVALUATION, run

    cache = tmp_path / "cache"
    config = tiny_config(*DP, "rounds=2", "checkpoint.every=1", "compile.cache=true", f"compile.cache_dir={cache}",
                         "dp.raw_metrics=true")
    result = run(config, tmp_path / "w", progress=False)
    secret = result.experiment.cohort_seed
    key = result.experiment.engine.noise_key
    needles = [str(secret).encode(), secret.to_bytes(8, "little"), secret.to_bytes(8, "big"), key.tobytes(),
               key.byteswap().tobytes(), hex(secret).encode()]
    import jax

    # the run's work dir and every compilation cache this process may have written to
    roots = {tmp_path / "w", cache, Path(jax.config.jax_compilation_cache_dir or cache),
             Path(os.environ.get("JAX_COMPILATION_CACHE_DIR", cache))}
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]
    assert len(files) > 5
    for p in files:
        data = p.read_bytes()
        assert not any(n in data for n in needles), f"the DP secret is in {p}"
    for line in _lines(tmp_path / "w"):
        assert set(line) <= set(RELEASED + RELEASED_EVALUATION) and line["dp_noise"] == "secret", line
    raw = [json.loads(l) for l in (tmp_path / "w" / "metrics_not_private.jsonl").read_text().splitlines()]
    assert {"loss", "personalized_accuracy", "dp_update_norm"} <= set(raw[-1])
    off = run(tiny_config(*DP, "rounds=1", "dp.reproducible_noise=true"), tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "metrics_not_private.jsonl").exists()
    assert "epsilon is not a guarantee" in off.metrics["dp_noise"]


# ---------------------------------------------------------------- 5: bounded inputs
def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _gz_bomb(path: Path, header: bytes, gigabytes: int = 10) -> None:
    """About 10 MB of gzip that decompresses to ``header`` + ``gigabytes`` GB of zeros
    (concatenated gzip members: ``gzip`` reads them as one stream)."""
    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header))
        for _ in range(gigabytes * 1024):
            f.write(member)


def _limited(code: str, limit: int = 1 << 30) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter under RLIMIT_AS = ``limit`` (no jax in it)."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=ENV, capture_output=True,
                          text=True, timeout=300)


LOAD = """
    import sys
    from fedms_jax.data.sources import load_dataset
    from fedms_jax.data.dataset import DataError
    try:
        load_dataset({name!r}, {data_dir!r}{extra})
    except DataError as e:
        print("DataError:", e); sys.exit(1)
    print("loaded")
"""


@pytest.fixture(scope="module")
def idx_bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    good = {"train-images-idx3-ubyte": rng.integers(0, 255, (20, 8, 8)), "train-labels-idx1-ubyte": np.arange(20) % 2,
            "t10k-images-idx3-ubyte": rng.integers(0, 255, (8, 8, 8)), "t10k-labels-idx1-ubyte": np.arange(8) % 2}
    out = {}
    for kind, header in [("huge_header", bytes([0, 0, 8, 3]) + (10 << 27).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2),
                         ("trailing", bytes([0, 0, 8, 3]) + (20).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2)]:
        d = root / kind
        d.mkdir()
        for name, a in good.items():
            _idx(d / name, a)
        (d / "train-images-idx3-ubyte").unlink()
        _gz_bomb(d / "train-images-idx3-ubyte.gz", header)
        out[kind] = d
    assert 9e6 < (out["trailing"] / "train-images-idx3-ubyte.gz").stat().st_size < 12e6
    return out


@pytest.mark.parametrize("kind, message", [("huge_header", "refused before decompressing"),
                                           ("trailing", "more data follow")])
def test_a_gz_bomb_is_one_data_error_under_1_gb(idx_bombs, kind, message):
    done = _limited(LOAD.format(name="idx", data_dir=str(idx_bombs[kind]), extra=""))
    assert done.returncode == 1 and done.stdout.startswith("DataError:") and message in done.stdout, (
        done.stdout, done.stderr[-2000:])
    assert len(done.stdout.strip().splitlines()) == 1


def test_a_gz_bomb_through_the_cli_is_one_line_and_costs_no_memory(idx_bombs, tmp_path):
    done = _cli(tmp_path / "w", "data.name=idx", f"data.data_dir={idx_bombs['trailing']}")
    assert done.returncode == 1 and "more data follow" in _one_error_line(done.stderr)
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def big_png_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    Image.new("RGB", (9000, 9000)).save(root / "train" / "b" / "1x.png")  # between the small ones
    assert (root / "train" / "b" / "1x.png").stat().st_size < 1_000_000
    return root


def test_a_9000x9000_png_among_small_images_is_one_data_error_under_1_gb(big_png_folder):
    done = _limited(LOAD.format(name="folder", data_dir=str(big_png_folder), extra=""))
    assert done.returncode == 1 and "1x.png is 9000x9000 but" in done.stdout, (done.stdout, done.stderr[-2000:])
    # Resized, it is checked against data.max_bytes before decoding.
    done = _limited(LOAD.format(name="folder", data_dir=str(big_png_folder), extra=", image_size=8, max_bytes=50_000_000"))
    assert done.returncode == 1 and "refused before decoding" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_sizes_beyond_memory_are_one_line_errors(tmp_path):
    done = _cli(tmp_path / "w", "data.num_clients=1000000000000", "cohort_size=8")
    line = _one_error_line(done.stderr)
    assert done.returncode == 1 and "data.num_clients = 1000000000000" in line and "of memory but only" in line, line


def test_checkpoint_shard_names_must_stay_inside_the_checkpoint(tmp_path):
    from fedms_jax.models.hf import CheckpointError, _read_state_dict

    (tmp_path / "outside.safetensors").write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
        with pytest.raises(CheckpointError, match="shard"):
            _read_state_dict(ckpt)
    (ckpt / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "link.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        _read_state_dict(ckpt)


# ---------------------------------------------------------------- 6: divergence
def test_a_diverged_server_stops_the_run_with_one_line(tmp_path):
    done = _cli(tmp_path / "w", "rounds=4", "server.lr=1e308", "checkpoint.every=1")
    line = _one_error_line(done.stderr)
    assert done.returncode == 1 and re.search(r"round 0 of fedavg_sal diverged: the server state is not finite", line), line
    assert "no checkpoint" in line and not (tmp_path / "w" / "checkpoints" / "1").exists()


def test_rounds_with_every_client_excluded_stop_the_run(tmp_path):
    from fedms_jax.run import Diverged, run

    config = tiny_config("rounds=6", "client.lr=1e30", "checkpoint.every=1", "guard.max_bad_rounds=2",
                         "checkpoint.asynchronous=false")
    with pytest.raises(Diverged, match=r"round 1 of fedavg_sal diverged: every client's update was non-finite in 2 "
                                       r"consecutive rounds .*the last checkpoint, after round 1"):
        run(config, tmp_path, progress=False)


# ---------------------------------------------------------------- 7: preemption at any moment
def test_sigterm_during_feature_extraction_exits_143_leaving_no_temp_file(tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "fedms_jax.cli", "run", "--workdir", str(tmp_path / "w"), "--no-progress",
            *[f"--config.{o}" for o in TINY], "--config.model.frozen_blocks=1", f"--config.data.feature_cache={cache}",
            "--config.data.num_clients=4000", "--config.data.min_examples=40"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(cache.glob(".*.tmp")):
        time.sleep(0.005)
    assert list(cache.glob(".*.tmp")), "never saw the temporary file"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "caught SIGTERM during start-up" in err and "Traceback" not in err, err[-3000:]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_signal_while_the_final_save_is_waited_for_does_not_cut_it(tmp_path):
    from fedms_jax.callbacks import Callback
    from fedms_jax.run import run

    class SignalAtTheEnd(Callback):
        def on_end(self):  # runs before checkpointing's on_end (reverse order): its wait comes after
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config("rounds=2", "checkpoint.every=0")
    before = signal.getsignal(signal.SIGTERM)
    result = run(config, tmp_path, progress=False, callbacks=[SignalAtTheEnd()])
    assert result.metrics["round"] == 1
    from fedms_jax.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints", every=0, keep=1).restorable_steps() == [2]
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the save


def test_after_a_sigterm_the_round_in_flight_is_saved_without_its_evaluation(tmp_path):
    from fedms_jax.callbacks import Callback, Preempted
    from fedms_jax.run import run

    class SignalInRound(Callback):
        def on_start(self, exp, start):
            original = exp.engine.run_round

            def run_round(*a, **k):
                out = original(*a, **k)
                if a[2] == 1:  # while round 1 runs
                    os.kill(os.getpid(), signal.SIGTERM)
                return out
            exp.engine.run_round = run_round

    with pytest.raises(Preempted, match="saved the state after round 2"):
        run(tiny_config("rounds=4", "checkpoint.every=0"), tmp_path, progress=False, callbacks=[SignalInRound()])
    lines = _lines(tmp_path)
    assert [l["round"] for l in lines] == [0, 1]
    assert "personalized_accuracy" in lines[0] and "personalized_accuracy" not in lines[1]
