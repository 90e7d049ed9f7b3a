"""The benchmark suite's report: the machine it ran on, the markdown tables of ``results.md``,
and writing ``results.json`` / ``results.md``. Imported by ``suite.py`` as a sibling module."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import jax


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = jax.devices()[0]
    return {
        "platform": d.platform, "device": getattr(d, "device_kind", str(d)), "devices": jax.device_count(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _table(title: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table under a heading, as lines (with a blank line after)."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return [title, "", line(header), "|" + "---|" * len(header), *map(line, rows), ""]


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [f"Machine: {m['device']} ({m['platform']}, {m['devices']} device(s)); CPU {m['cpu']}, {m['cpu_count']} cores; "
           f"jax {m['jax']}; XLA_FLAGS `{m['xla_flags']}`", ""]
    if "w1" in r:
        w = r["w1"]
        out += _table(
            f"### W1: s/round, images/s, utilisation (matmul {w['matmul_n']}^2 fp32: "
            + " / ".join(f"{x / 1e9:.0f}" for x in w["matmul_flops_per_second"])
            + f" GFLOP/s before / after; client chunk {w['chunk_size'] or 'whole cohort'})",
            ["k", "s/round", "images/s", "GFLOP/round", "GFLOP/s", "utilisation", "FLOP-ratio prediction", "vs prediction"],
            [[row["k"], f"{row['median']:.3f}", f"{row['images_per_second']:.0f}", f"{row['flops_per_round'] / 1e9:.0f}",
              f"{row['flops_per_second'] / 1e9:.0f}", f"{row['utilisation']:.0%}", f"{row['predicted_seconds']:.3f}",
              f"{row['vs_prediction']:+.1%}"] for row in w["rows"]],
        )
    if "backends" in r:
        out += _table(
            "### W2: vmap vs sequential backend",
            ["clients", "vmap s/round", "vmap chunk", "sequential s/round", "sequential / vmap"],
            [[row["clients"], f"{row['vmap']['median']:.3f}", row["chunk_size"] or row["clients"],
              f"{row['sequential']['median']:.3f}", f"{row['ratio']:.2f}x"] for row in r["backends"]["rows"]],
        )
    if "compile" in r:
        c = r["compile"]
        out += ["### Compilation over a growing SAL run", "",
                f"{c['rounds']} rounds, k = {' '.join(map(str, c['ks']))}: {c['distinct_k']} distinct k, "
                f"{c['xla_compilations']} XLA compilations, {c['round_programs_traced']} round programs traced; "
                f"{c['compile_seconds']:.1f} s compiling + {c['trace_and_lower_seconds']:.1f} s tracing/lowering "
                f"of {c['total_seconds']:.1f} s in all.", ""]
    if "memory" in r:
        mm = r["memory"]
        label = "peak device MiB" if mm["measure"] == "device_peak_bytes" else "peak host RSS during rounds MiB"
        mib = lambda v: "-" if v is None else f"{v / 2**20:.1f}"
        out += _table(
            f"### Memory vs cohort size (W2; backbone {mm['backbone_bytes'] / 2**20:.1f} MiB, "
            f"{mm['rows'][0]['backbone_params'] / 1e6:.2f} M params)",
            ["clients", "chunk", label, "host RSS after build MiB", "XLA arguments MiB", "XLA temp MiB", "client data MiB"],
            [[row["cohort"], row["chunk_size"] or row["cohort"], mib(row[mm["measure"]]), mib(row["rss_after_build_bytes"]),
              mib(row["xla_argument_bytes"]), mib(row["xla_temp_bytes"]), mib(row["data_bytes"])] for row in mm["rows"]],
        )
        out += [f"Growth per added client: {mm['growth_bytes_per_client'] / 2**20:.2f} MiB "
                f"(a per-client backbone copy would add {mm['backbone_bytes'] / 2**20:.1f} MiB).", ""]
    if "fedms" in r:
        out += _table(
            "### FedMS stage 2 vs stage 1 (W1)",
            ["k", "stage 1 s/round", "stage 2 s/round", "time ratio", "FLOP ratio"],
            [[row["k"], f"{row['stage1']['median']:.3f}", f"{row['stage2']['median']:.3f}", f"{row['ratio']:.2f}x",
              f"{row['flop_ratio']:.2f}x"] for row in r["fedms"]["rows"]],
        )
    if "startup" in r:
        st = r["startup"]
        rows = []
        for dtype in ("float32", "bfloat16"):
            v = st[f"vitb32_{dtype}"]
            for row in v["per_k"]:
                rows.append([dtype, row["k"], f"{v['build_s']:.1f}" if row is v["per_k"][0] else "",
                             f"{row['lower_s']:.2f}", f"{row['compile_s']:.2f}",
                             f"{row['build_to_first_round_s']:.1f}" if "build_to_first_round_s" in row else "",
                             f"{row['s_per_round']:.3f}" if "s_per_round" in row else ""])
        v = st["vitb32_float32"]
        out += _table(f"### Start-up: ViT-B/32 shape ({v['clients']} clients x {v['steps']} steps x {v['batch']})",
                      ["dtype", "k", "build s", "trace+lower s", "compile s", "build to first round s", "s/round"], rows)
        jobs = st["default"]
        out += _table("### Start-up: the default job (`fedms-jax run`)",
                      ["cache", "wall s", "XLA compiles", "cache hits", "first round done s"],
                      [[name, f"{j['wall_s']:.1f}", j.get("timing", {}).get("compiles", "-"),
                        j.get("timing", {}).get("cache_hits", "-"),
                        f"{j['timing']['first_round_done_s']:.1f}" if "timing" in j else "-"] for name, j in jobs.items()])
    targets = {k: v for sec in r.values() if isinstance(sec, dict) for k, v in sec.get("targets", {}).items()}
    if targets:
        out += _table("### Targets", ["target", "met"], [[k, "yes" if v else "no"] for k, v in targets.items()])
    return "\n".join(out) + "\n"


def save_json(out: Path, results: dict) -> None:
    """``out/results.json``, replaced whole (a run interrupted while writing keeps the last one)."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")


def save_markdown(out: Path, results: dict) -> str:
    """``out/results.md``; returns its text."""
    text = markdown(results)
    (out / "results.md").write_text(text)
    return text
