"""Config validation and the `fedms-jax run` main job, end to end from the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedms_jax.config import ConfigError, apply_overrides, load_config, validate


def test_overrides_are_typed():
    c = apply_overrides(load_config("embedded"), ["rounds=3", "stage1_rounds=1", "lora.targets=q,v", "client.lr=0.5", "model.dtype=bfloat16"])
    assert c.rounds == 3 and c.lora.targets == ("q", "v") and c.client.lr == 0.5
    assert c.model.dtype == "bfloat16"
    validate(c)


@pytest.mark.parametrize(
    "override, message",
    [
        ("rounds=two", r"--config.rounds='two' is not a valid int"),
        ("model.depth=3", r"unknown config key 'model.depth'"),
        ("lora.targets=q,query", r"config.lora.targets = \('q', 'query'\)"),
        ("model.hidden=30", r"config.model.hidden = 30: must be divisible by model.heads=4"),
        ("sal.mode=sometimes", r"config.sal.mode = 'sometimes'"),
        ("client.lr=-1", r"config.client.lr = -1.0"),
        ("model.image_size=18", r"config.model.image_size = 18"),
        ("cohort_size=50", r"config.cohort_size = 50: must be <= data.num_clients=20"),
        ("placement.chunk_size=3", r"config.placement.chunk_size = 3: must divide cohort_size=8"),
        ("data.partition=random", r"config.data.partition = 'random'"),
        ("stage1_rounds=24", r"config.stage1_rounds = 24: must be < rounds=24"),
        ("fedms.mixing=geometric", r"config.fedms.mixing = 'geometric'"),
        ("fedms.gate=none", r"config.fedms.gate = 'none'"),
        ("fedms.gate_rank=0", r"config.fedms.gate_rank = 0"),
        ("fedms.local_weight=1.5", r"config.fedms.local_weight = 1.5: must be in \[0, 1\]"),
        ("algorithm=fedsgd", r"config.algorithm = 'fedsgd'"),
        ("fedprox.mu=-1", r"config.fedprox.mu = -1.0"),
        ("sal.every=0", r"config.sal.every = 0"),
        ("model.head=zero_shot", r"config.model.head = 'zero_shot': 'zero_shot' needs a CLIP checkpoint"),
    ],
)
def test_bad_config_names_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(load_config("embedded"), [override]))


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="'nope'"):
        load_config("nope")


def _cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "fedms_jax.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=600,
    )


def test_run_end_to_end(tmp_path):
    """The default job (FedMS) from the command line: 2 stage-1 rounds, then 2 of stage 2."""
    work = tmp_path / "w"
    r = _cli("run", "--workdir", str(work), "--no-progress", "--config.rounds=4", "--config.stage1_rounds=2",
             "--config.client.local_steps=2", "--config.sal.every=1", "--config.eval_every=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [0, 1, 2, 3]
    assert [l["stage"] for l in lines] == [1, 1, 2, 2]
    assert [l["active_blocks"] for l in lines] == [1, 2, 3, 4]
    for l in lines:
        assert {"loss", "bytes_up", "bytes_down", "seconds"} <= set(l)
        evaluated = l["round"] % 2 == 1  # eval_every=2: the last round of each stage
        assert evaluated == ("accuracy" in l) == ("personalized_accuracy" in l)
        if evaluated:
            assert 0.0 <= l["accuracy"] <= 1.0 and 0.0 <= l["personalized_accuracy"] <= 1.0
    # Each newly active block adds the same adapter bytes per client, in both stages (the global
    # expert keeps training in stage 2); from stage 2 on the gate adapter goes up too.
    up = [l["bytes_up"] for l in lines]
    block = up[1] - up[0]
    assert block > 0 and up[3] - up[2] == block and up[2] - up[1] > block
    assert 0.0 < lines[-1]["gate_local_weight"] < 1.0
    assert "done:" in r.stdout


def test_run_rejects_bad_value_before_compiling(tmp_path):
    r = _cli("run", "--workdir", str(tmp_path / "w"), "--config.sal.k0=0", cwd=tmp_path)
    assert r.returncode == 2
    assert "config.sal.k0 = 0" in r.stderr
    assert not (tmp_path / "w").exists()
