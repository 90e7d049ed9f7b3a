"""The tuning protocol (experiments/tune.py) reads validation splits only: poisoning every test
label leaves every score and every chosen value unchanged."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np

from fed_helpers import TINY

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def _write_idx(d: Path, train, test, test_labels) -> Path:
    d.mkdir(parents=True)
    (d / "train-images-idx3-ubyte").write_bytes(_idx(train.images[..., 0]))
    (d / "train-labels-idx1-ubyte").write_bytes(_idx(train.labels))
    (d / "t10k-images-idx3-ubyte").write_bytes(_idx(test.images[..., 0]))
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx(test_labels))
    return d


def _tune_module():
    sys.path.insert(0, str(EXPERIMENTS))  # tune.py imports compare.py beside it
    spec = importlib.util.spec_from_file_location("tune", EXPERIMENTS / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_never_reads_the_test_split(tmp_path):
    from fedms_jax.data.sources import load_synthetic

    train, test = load_synthetic(image_size=8, seed=0)
    poisoned = (test.labels + 1 + np.random.default_rng(0).integers(0, 9, test.labels.shape)) % 10
    assert (poisoned != test.labels).all()
    tune = _tune_module()
    results = []
    for name, labels in (("clean", test.labels), ("poisoned", poisoned)):
        d = _write_idx(tmp_path / name / "data", train, test, labels)
        args = ["--out", str(tmp_path / name / "out"), "--methods", "fedavg", "--lrs", "0.01,0.3",
                *[f"--config.{o}" for o in TINY if not o.startswith("data.name")],
                "--config.data.name=idx", f"--config.data.data_dir={d}", "--config.rounds=3"]
        tune.main(args)
        results.append(json.loads((tmp_path / name / "out" / "tuned.json").read_text())["methods"])
    clean, dirty = results
    assert clean == dirty  # same chosen values, same scores to the last bit
    scores = [s["score"] for s in clean["fedavg"]["scores"]]
    assert len(scores) == 2 and scores[0] != scores[1]  # the learning rate matters: the scores are real
    assert (tmp_path / "clean" / "out" / "tuning.md").read_text().count("(chosen)") == 1
