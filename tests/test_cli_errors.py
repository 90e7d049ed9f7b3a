"""Every error a user can cause ends as one line, ``fedms-jax: error: ...``, exit 2 (bad config or
command line) or 1 (bad input: data, work dir, report), with nothing written and no traceback.

Everything runs in-process through ``fedms_jax.cli.main`` and fails before a model is built."""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import pytest

from fedms_jax import cli
from fedms_jax.cli import main

CONFIG, INPUT = 2, 1
# Small, valid settings the data rows start from (their errors come from the data, not these).
SMALL = ["--config.data.name=synthetic", "--config.data.num_clients=8", "--config.data.min_examples=8",
         "--config.cohort_size=8", "--config.algorithm=fedavg_sal", "--config.rounds=2"]


def _idx(shape: tuple[int, ...], data: bytes | None = None) -> bytes:
    body = bytes(math.prod(shape)) if data is None else data
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}i", *shape) + body


def _idx_dir(d: Path, train_images: bytes) -> Path:
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(train_images)
    (d / "train-labels-idx1-ubyte").write_bytes(_idx((4,), bytes([0, 1, 0, 1])))
    (d / "t10k-images-idx3-ubyte").write_bytes(_idx((2, 4, 4)))
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx((2,), bytes([0, 1])))
    return d


def _folder(d: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (d / split / c).mkdir(parents=True)
            Image.new("L", (4, 4)).save(d / split / c / "0.png")
    (d / "train" / "b" / "1.png").write_bytes(b"not a png")
    return d


def _config_file(d: Path, text: str) -> str:
    (d / "my_config.py").write_text(text)
    return str(d / "my_config.py")


def _file(d: Path) -> Path:
    (d / "a_file").write_text("x")
    return d / "a_file"


def _run(*args: str) -> list[str]:
    return ["run", "--workdir", "{work}", "--no-progress", *args]


# (argv, with {tmp} for tmp_path and {work} for a work dir that must never appear; status; what
# the line must name). Callables make their files in tmp_path and return the argv.
CASES = {
    # --- the command line and the config: exit 2
    "unknown key": (_run("--config.no_such=1"), CONFIG, "unknown config key 'no_such'"),
    "unknown nested key": (_run("--config.model.no_such=1"), CONFIG, "unknown config key 'model.no_such'"),
    "key under a value": (_run("--config.rounds.x=1"), CONFIG, "unknown config key 'rounds.x'"),
    "section as a value": (_run("--config.data=1"), CONFIG, "config key 'data' is a section"),
    "malformed int": (_run("--config.rounds=abc"), CONFIG, "--config.rounds='abc' is not a valid int"),
    "malformed float": (_run("--config.client.lr=fast"), CONFIG, "--config.client.lr='fast' is not a valid float"),
    "malformed bool": (_run("--config.client.cache_frozen=maybe"), CONFIG, "--config.client.cache_frozen='maybe'"),
    "malformed tuple": (_run("--config.sal.budgets=4,x"), CONFIG, "--config.sal.budgets='4,x'"),
    "negative rounds": (_run("--config.rounds=-1"), CONFIG, "config.rounds = -1: must be an integer >= 1"),
    "cohort > clients": (_run("--config.cohort_size=50"), CONFIG, "config.cohort_size = 50: must be <= data.num_clients=20"),
    "lora.rank=0": (_run("--config.lora.rank=0"), CONFIG, "config.lora.rank = 0"),
    "lora.alpha=0": (_run("--config.lora.alpha=0"), CONFIG, "config.lora.alpha = 0.0: must be > 0"),
    "lora.dropout=1": (_run("--config.lora.dropout=1"), CONFIG, "config.lora.dropout = 1.0"),
    "data.alpha<0": (_run("--config.data.alpha=-1"), CONFIG, "config.data.alpha = -1.0: must be > 0"),
    "data.min_examples=0": (_run("--config.data.min_examples=0"), CONFIG, "config.data.min_examples = 0"),
    "client.lr=nan": (_run("--config.client.lr=nan"), CONFIG, "config.client.lr = nan"),
    "sal.k0 > layers": (_run("--config.sal.k0=9"), CONFIG, "config.sal.k0 = 9"),
    "unknown algorithm": (_run("--config.algorithm=fedsgd"), CONFIG, "config.algorithm = 'fedsgd'"),
    "stage1 >= rounds": (_run("--config.stage1_rounds=24"), CONFIG, "config.stage1_rounds = 24: must be < rounds=24"),
    "seed beyond int64": (_run("--config.seed=1180591620717411303424"), CONFIG, "config.seed = 1180591620717411303424"),
    "override without =": (_run("--config.rounds"), CONFIG, "--config.rounds needs a value"),
    "override with a space": (_run("--config.rounds", "3"), CONFIG, "write --config.rounds=3"),
    "unknown config name": (_run("--config", "nope"), CONFIG, "--config 'nope' is neither a .py file"),
    "missing config file": (_run("--config", "{tmp}/missing.py"), CONFIG, "missing.py' does not exist"),
    "config file syntax error": (lambda d: _run("--config", _config_file(d, "def get_config(:\n")),
                                 CONFIG, "my_config.py' line 1: SyntaxError"),
    "config file without get_config": (lambda d: _run("--config", _config_file(d, "X = 1\n")),
                                       CONFIG, "my_config.py' defines no get_config()"),
    "get_config returns a dict": (lambda d: _run("--config", _config_file(d, "def get_config():\n    return {}\n")),
                                  CONFIG, "returned a dict, not an ml_collections.ConfigDict"),
    "config file is a directory": (lambda d: (d / "dir.py").mkdir() or _run("--config", str(d / "dir.py")),
                                   CONFIG, "dir.py' cannot be read"),
    "report with overrides": (["report", "{tmp}", "--config.rounds=3"], CONFIG, "report takes no --config.KEY=VALUE"),
    "plan: malformed layout": (["plan", "--layouts", "2y:fsdp", *SMALL], CONFIG, "layout '2y:fsdp' must look like"),
    # --- impossible partitions (the data and the config): exit 1, before anything is built
    # (the synthetic source grows with data.num_clients: these use the embedded digits, 1438 examples)
    "num_clients=100000 of digits": (
        _run("--config.data.num_clients=100000"), INPUT,
        "data.num_clients=100000 x min_examples=16: 100000 clients need at least data.min_examples = 16 "
        "examples each (1600000 in all), but the training set has 1438"),
    "min_examples too large": (_run(*SMALL, "--config.data.name=digits", "--config.data.min_examples=1000"), INPUT,
                               "data.min_examples = 1000 examples each (8000 in all), but the training set has 1438"),
    "shards_per_client too large": (_run(*SMALL, "--config.data.partition=shards", "--config.data.shards_per_client=1000"),
                                    INPUT, "data.shards_per_client = 1000 shards each = 8000 shards"),
    "iid: more clients than examples": (_run(*SMALL, "--config.data.name=digits", "--config.data.partition=iid",
                                             "--config.data.num_clients=5000"),
                                        INPUT, "data.num_clients = 5000 clients need at least one example each"),
    "train_examples too few": (_run(*SMALL, "--config.data.train_examples=20"), INPUT, "the training set has 20"),
    "data.alpha=inf": (_run(*SMALL, "--config.data.alpha=inf"), CONFIG, "data.alpha = inf: must be a finite number"),
    "plan: num_clients=100000": (["plan", "--config.data.num_clients=100000"], INPUT,
                                 "data.num_clients=100000 x min_examples=16"),
    # --- malformed or missing data files: exit 1
    "idx: garbage": (lambda d: _run(*SMALL, "--config.data.name=idx", f"--config.data.data_dir={_idx_dir(d / 'idx', b'garbage!')}"),
                     INPUT, "train-images-idx3-ubyte: bad IDX magic number"),
    "idx: truncated": (lambda d: _run(*SMALL, "--config.data.name=idx",
                                      f"--config.data.data_dir={_idx_dir(d / 'idx', _idx((4, 4, 4))[:-5])}"),
                       INPUT, "(truncated or wrong file)"),
    "idx: file missing": (lambda d: (d / "idx").mkdir() or _run(*SMALL, "--config.data.name=idx", f"--config.data.data_dir={d / 'idx'}"),
                          INPUT, "has no train-images-idx3-ubyte"),
    "idx: no such dir": (_run(*SMALL, "--config.data.name=idx", "--config.data.data_dir={tmp}/nowhere"), INPUT,
                         "nowhere' is not a directory"),
    "idx: no data_dir": (_run(*SMALL, "--config.data.name=idx"), CONFIG, "config.data.data_dir = ''"),
    "folder: unreadable image": (lambda d: _run(*SMALL, "--config.data.name=folder", f"--config.data.data_dir={_folder(d / 'f')}"),
                                 INPUT, "1.png: cannot read the image"),
    # --- work dir and report dir: exit 1
    "work dir is a file": (lambda d: ["run", "--workdir", str(_file(d)), "--no-progress", *SMALL], INPUT,
                           "a_file' exists and is not a directory"),
    "work dir under a file": (lambda d: ["run", "--workdir", str(_file(d) / "w"), "--no-progress", *SMALL], INPUT,
                              "cannot be created: '{tmp}/a_file' is not a directory"),
    "report: missing dir": (["report", "{tmp}/nope"], INPUT, "work dir '{tmp}/nope' does not exist"),
    "report: a file": (lambda d: ["report", str(_file(d))], INPUT, "a_file' is not a directory"),
    "report: not a run": (["report", "{tmp}"], INPUT, "metrics.jsonl does not exist"),
    "report: empty metrics": (lambda d: (d / "metrics.jsonl").write_text("") and None or ["report", str(d)], INPUT,
                              "metrics.jsonl is empty"),
    "report: bad metrics": (lambda d: (d / "metrics.jsonl").write_text("{oops\n") and None or ["report", str(d)], INPUT,
                            "metrics.jsonl line 1 is not JSON"),
    "report: --out is a file": (lambda d: (d / "metrics.jsonl").write_text('{"round": 0}\n') and None
                                or ["report", str(d), "--out", str(_file(d))], INPUT, "--out '{tmp}/a_file' exists and is not a directory"),
}


def _check_one_line_error(err: str, needle: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedms-jax: error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def _listing(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("argv, status, needle", CASES.values(), ids=CASES.keys())
def test_user_error_is_one_line(tmp_path, capsys, monkeypatch, argv, status, needle):
    monkeypatch.chdir(tmp_path)  # a relative path a bug might write to lands here
    work = tmp_path / "never"
    argv = argv(tmp_path) if callable(argv) else argv
    before = _listing(tmp_path)
    argv = [a.format(tmp=tmp_path, work=work) for a in argv]
    assert main(argv) == status
    _check_one_line_error(capsys.readouterr().err, needle.format(tmp=tmp_path))
    assert _listing(tmp_path) == before, "a refused command must write nothing"


def _read_only_dir(tmp_path, monkeypatch) -> Path:
    """A directory the process may not write: by its mode, or (as root, which ignores modes) by
    ``os.access`` saying so, as on a read-only file system."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(cli.os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    else:
        ro.chmod(0o555)
    return ro


@pytest.mark.parametrize("sub, needle", [("", "--workdir '{ro}' is not writable"),
                                         ("w/x", "--workdir '{ro}/w/x' cannot be created: '{ro}' is not writable")])
def test_work_dir_that_cannot_be_written(tmp_path, capsys, monkeypatch, sub, needle):
    ro = _read_only_dir(tmp_path, monkeypatch)
    work = ro / sub if sub else ro
    assert main(["run", "--workdir", str(work), "--no-progress", *SMALL]) == INPUT
    _check_one_line_error(capsys.readouterr().err, needle.format(ro=ro))
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory modes")
def test_work_dir_without_write_permission(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", "--workdir", str(ro / "w"), "--no-progress", *SMALL]) == INPUT
        _check_one_line_error(capsys.readouterr().err, "is not writable")
        assert not (ro / "w").exists()
    finally:
        ro.chmod(0o755)


def test_argparse_usage_errors_exit_2(capsys):
    for argv in (["run", "--workdir"], ["nope"], [], ["run", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("fedms-jax") and ": error: " in err and "Traceback" not in err


def test_help_keeps_the_docstring_line_breaks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "\n    fedms-jax run [--config FILE_OR_NAME]" in out
    assert "\n    fedms-jax report WORKDIR" in out
    assert "\nExit status: 0 done;" in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "\n  --config.KEY=VALUE" in out and "Runs a job:" in out


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug"), OSError("a bug")])
def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch, error):
    """Only the user's errors become one line: anything else propagates (a traceback)."""
    import fedms_jax.run

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(fedms_jax.run, "run", broken)
    with pytest.raises(type(error), match="a bug"):
        main(["run", "--workdir", str(tmp_path / "w"), "--no-progress", *SMALL])


def test_interrupt_before_the_run_starts(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the job is being built (before the run's own handler saves a checkpoint)."""
    import fedms_jax.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedms_jax.run, "run", interrupted)
    assert main(["run", "--workdir", str(tmp_path / "w"), "--no-progress", *SMALL]) == 128 + 2
    assert capsys.readouterr().err == "fedms-jax: interrupted\n"
