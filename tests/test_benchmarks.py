"""The benchmark suite at tiny sizes, in a fresh process (as users run it), so it cannot rot.

No timing is asserted: only that every section ran, reports positive measurements, and the
properties that do not depend on the machine hold (one compilation per distinct k, the images
and FLOPs a round must process, the backbone counted once).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "suite.py"


def test_suite_tiny_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # Without the test session's compilation cache: the suite counts XLA compilations.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    proc = subprocess.run([sys.executable, str(SUITE), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    sizes = r["sizes"]
    assert set(r) >= {"machine", "command", "w1", "backends", "compile", "memory", "fedms", "startup"}

    w1 = r["w1"]
    assert [row["k"] for row in w1["rows"]] == list(sizes["w1_ks"])
    for row in w1["rows"]:
        assert row["images_per_round"] == sizes["w1_clients"] * sizes["w1_steps"] * sizes["w1_batch"]
        assert row["median"] > 0 and row["flops_per_round"] > 0 and 0 < row["utilisation"]
    flops = [row["flops_per_round"] for row in w1["rows"]]
    assert flops == sorted(flops, reverse=True), "fewer active blocks must cost fewer FLOPs"
    assert w1["rows"][0]["predicted_seconds"] == w1["rows"][0]["median"]

    assert [row["clients"] for row in r["backends"]["rows"]] == list(sizes["backend_clients"])
    for row in r["backends"]["rows"]:
        assert row["ratio"] == row["sequential"]["median"] / row["vmap"]["median"]

    c = r["compile"]
    assert len(c["ks"]) == sizes["compile_rounds"] and c["ks"] == sorted(c["ks"])
    assert c["xla_compilations"] == c["distinct_k"] == c["round_programs_traced"] == len(set(c["ks"])) > 1

    rows = r["memory"]["rows"]
    assert [row["cohort"] for row in rows] == list(sizes["memory_cohorts"])
    # The round's arguments hold the backbone once, whatever the cohort size.
    for row in rows:
        assert row["backbone_bytes"] <= row["xla_argument_bytes"] < 2 * row["backbone_bytes"] + row["data_bytes"] + (1 << 20)
        assert row["peak_rss_bytes"] > 0

    for row in r["fedms"]["rows"]:
        assert row["stage2"]["median"] > 0 and row["flop_ratio"] > 1.0  # two experts' tops in stage 2

    st = r["startup"]
    for dtype in ("float32", "bfloat16"):
        v = st[f"vitb32_{dtype}"]
        assert v["build_s"] > 0 and [row["k"] for row in v["per_k"]] == [2]
        assert all(row["compile_s"] > 0 for row in v["per_k"]) and v["per_k"][0]["build_to_first_round_s"] > v["build_s"]
    cold = st["default"]["cold"]  # (the warm run compiling nothing: tests/test_compiling.py)
    assert cold["returncode"] == 0 and cold["timing"]["compiles"] > 0 and 0 < cold["personalized_accuracy"] <= 1

    md = (out / "results.md").read_text()
    for heading in ("### W1", "### W2", "### Compilation", "### Memory", "### FedMS", "### Start-up", "### Targets"):
        assert heading in md
