"""Accuracy against simulated time with clients that behave like devices (fedms_jax/system.py).

    python experiments/heterogeneity.py --config experiments/configs/fmnist_dinov2_compare.py \
        --config.model.pretrained=/tmp/dinov2_s --out experiments/results/heterogeneity \
        [--algorithms fedavg_sal,fedms] [--scenarios ideal,deadline,deadline_sal,dropout] \
        [--workdir DIR --reuse] [--config.KEY=VALUE ...]

Every scenario gives the clients the same devices: lognormal compute speeds (median
``--speed-median`` FLOP/s, log-spread ``--sigma``) and the default bandwidths. The deadline is set
so that exactly the slowest ``--late`` share of the clients (20%) cannot train the whole model in
time: the ``1 - late`` quantile of the clients' full-model round times (at the largest SAL level of
the run's costliest stage, from the compiled client's FLOPs and the bytes it sends). A run is
reused (``--reuse``) only when its config and overrides are the ones asked for. Scenarios:

  * ``ideal``: every client always available, none drops out, no deadline (a round lasts until
    its slowest client reports);
  * ``deadline``: the server aggregates what arrived by the deadline and drops the late;
  * ``deadline_sal``: the same deadline with ``sal.budget_mode=deadline``: each client trains the
    most top blocks it can finish in time;
  * ``dropout``: 30% of the selected clients drop out during their round (no deadline);
  * ``fedbuff``: buffered asynchronous aggregation (2 x cohort_size clients in flight, the server
    steps on every cohort_size results, staleness weight 1/sqrt(1+s)); a "round" is a server step
    of as many client results as a synchronous round. A step takes less simulated time than a
    round (it waits for the fastest cohort_size of the clients in flight, not for the slowest of a
    cohort), so FedBuff runs ``--fedbuff-scale`` (2.5) times the rounds (stage 1 likewise) to
    cover about the simulated time of the synchronous runs; the table compares the simulated
    seconds each needs to reach the target.

Written under ``--out``: ``table.md`` (final accuracy, simulated seconds to reach the target
accuracy (``--target``: 95% of the ideal run's final) and the ideal run's final accuracy, participation, wasted compute, contributions by speed quintile), ``results.json`` (every
run's metrics lines and the command), ``accuracy_vs_time.png``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from fedms_jax.config import resolve

SCENARIOS: dict[str, list[str]] = {
    "ideal": [],
    "deadline": ["system.deadline_s={deadline}"],
    "deadline_sal": ["system.deadline_s={deadline}", "sal.budget_mode=deadline"],
    "dropout": ["system.dropout=0.3"],
    "fedbuff": ["system.aggregation=fedbuff", "rounds={fedbuff_rounds}", "stage1_rounds={fedbuff_stage1}"],
}


def metric_of(algorithm: str) -> str:
    """The accuracy a method is judged by: the global model's for FedAvg, personalised for FedMS."""
    return "personalized_accuracy" if algorithm == "fedms" else "accuracy"


def deadline_for(config_name: str, base: list[str], late: float) -> tuple[float, dict]:
    """The deadline that the slowest ``late`` share of clients miss at full depth in the run's
    costliest stage (FedMS: stage 2, which trains the local expert and the gate beside the global
    expert's forward pass), and what it was computed from."""
    from fedms_jax.run import build

    config = resolve(config_name, base)
    exp = build(config)
    ids = np.arange(config.data.num_clients)
    best = None
    for stage in sorted({p.stage for p in exp.algorithm.phases(config.rounds)}):
        full = max((p for p in exp.algorithm.phases(config.rounds) if p.stage == stage), key=lambda p: p.num_active)
        costs, k = exp.level_costs(full), full.num_active
        times = sum(exp.system.times(ids, np.full(len(ids), k), costs))
        if best is None or np.median(times) > np.median(best[2]):
            best = (stage, k, times, costs)
    stage, k, times, costs = best
    deadline = float(np.quantile(times, 1 - late))
    return deadline, {"stage": stage, "level": k, "gflop_full": float(costs.flops[k]) / 1e9,
                      # level 1's FLOPs when the run trains it (the probes measure the levels a run uses)
                      "gflop_level1": float(costs.flops[1]) / 1e9 if np.isfinite(costs.flops[1]) else None,
                      "median_full_s": float(np.median(times)), "deadline_s": deadline,
                      "late_at_full": float(np.mean(times > deadline))}


def run_one(config_name: str, overrides: list[str], workdir: Path, reuse: bool) -> list[dict]:
    from fedms_jax.run import run

    done, finished = workdir / "metrics.jsonl", workdir / "finished.json"
    asked = {"config": config_name, "overrides": overrides}
    if reuse and finished.exists() and {k: v for k, v in json.loads(finished.read_text()).items() if k in asked} == asked:
        return [json.loads(x) for x in done.read_text().splitlines()]
    shutil.rmtree(workdir, ignore_errors=True)
    began = time.perf_counter()
    run(resolve(config_name, overrides), workdir, progress=False)
    finished.write_text(json.dumps({**asked, "wall_s": round(time.perf_counter() - began, 1)}))
    return [json.loads(x) for x in done.read_text().splitlines()]


def time_to(lines: list[dict], metric: str, target: float) -> float | None:
    """Simulated seconds at the end of the first evaluated round reaching ``target``."""
    for r in lines:
        if r.get(metric) is not None and r[metric] >= target:
            return r["sim_clock_s"]
    return None


def summary(lines: list[dict], metric: str) -> dict:
    """A run's final accuracy, simulated clock, participation and wasted compute. Synchronous
    rounds: each round's selected, contributed and compute; FedBuff steps: the running totals of
    the last step (results used, dropped, discarded as too stale; the clients still in flight at
    the end are in neither)."""
    by_speed = np.sum([r["sim_contributed_by_speed"] for r in lines], axis=0)
    contributed = sum(r["sim_contributed"] for r in lines)
    if "sim_selected" in lines[0]:
        selected = sum(r["sim_selected"] for r in lines)
        useful, wasted = sum(r["sim_useful_gflop"] for r in lines), sum(r["sim_wasted_gflop"] for r in lines)
        depth = float(np.mean([r["sim_mean_depth"] for r in lines if r["sim_contributed"]]))
        staleness = None
    else:
        last = lines[-1]
        selected = contributed + last["sim_dropped_total"] + last["sim_stale_total"]
        useful, wasted = last["sim_useful_gflop_total"], last["sim_wasted_gflop_total"]
        depth = None  # every result trains its step's whole level
        staleness = float(np.mean([r["sim_mean_staleness"] for r in lines]))
    return {
        "final": lines[-1][metric], "sim_total_s": lines[-1]["sim_clock_s"],
        "contributed_share": contributed / selected, "wasted_share": wasted / max(useful + wasted, 1e-12),
        "mean_depth": depth, "mean_staleness": staleness, "contributed_by_speed": by_speed.tolist(),
    }


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = sorted({a for a, _ in results})
    fig, axes = plt.subplots(1, len(algorithms), figsize=(6 * len(algorithms), 4), squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms):
        metric = metric_of(algorithm)
        for (a, scenario), lines in results.items():
            if a != algorithm:
                continue
            points = [(r["sim_clock_s"], r[metric]) for r in lines if r.get(metric) is not None]
            ax.plot(*zip(*points), marker="o", label=scenario)
        ax.set_xlabel("simulated seconds")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(algorithm)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="embedded")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedms_heterogeneity"))
    parser.add_argument("--algorithms", default="fedavg_sal,fedms")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--speed-median", type=float, default=1e10)
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--late", type=float, default=0.2)
    parser.add_argument("--target", type=float, default=0.95, help="time-to-accuracy target, a share of ideal's final")
    parser.add_argument("--fedbuff-scale", type=float, default=2.5, help="FedBuff's server steps per synchronous round")
    parser.add_argument("--reuse", action="store_true")
    args, rest = parser.parse_known_args(argv)
    extra = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    if len(extra) != len(rest):
        parser.error(f"unknown arguments {[a for a in rest if not a.startswith('--config.')]}")
    devices = ["system.speed=lognormal", f"system.speed_median={args.speed_median}", f"system.speed_sigma={args.sigma}"]
    args.out.mkdir(parents=True, exist_ok=True)
    results, deadlines, rows = {}, {}, []
    for algorithm in args.algorithms.split(","):
        base = extra + devices + [f"algorithm={algorithm}"]
        deadline, info = deadline_for(args.config, base, args.late)
        deadlines[algorithm] = info
        print(f"{algorithm}: deadline {deadline:.2f} s ({info})", flush=True)
        config = resolve(args.config, base)
        fill = {"deadline": deadline, "fedbuff_rounds": round(args.fedbuff_scale * config.rounds),
                "fedbuff_stage1": round(args.fedbuff_scale * config.stage1_rounds)}
        for scenario in args.scenarios.split(","):
            overrides = base + [o.format(**fill) for o in SCENARIOS[scenario]]
            lines = run_one(args.config, overrides, args.workdir / f"{algorithm}_{scenario}", args.reuse)
            results[(algorithm, scenario)] = lines
            print(f"  {scenario}: {summary(lines, metric_of(algorithm))}", flush=True)
    for (algorithm, scenario), lines in results.items():
        metric = metric_of(algorithm)
        ideal = results.get((algorithm, "ideal"))
        target = args.target * ideal[-1][metric] if ideal else None
        s = summary(lines, metric)
        s["time_to_target_s"] = time_to(lines, metric, target) if target is not None else None
        s["time_to_ideal_final_s"] = time_to(lines, metric, ideal[-1][metric]) if ideal else None
        rows.append({"algorithm": algorithm, "scenario": scenario, "metric": metric, "target": target, **s})
    command = "python experiments/heterogeneity.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)
    table = [f"Command: `{command}`", "",
             "| algorithm | scenario | final accuracy | target | sim. s to target | sim. s to ideal's final | sim. s total | contributed | "
             "mean depth | mean staleness | wasted compute | contributions by speed quintile (slowest first) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['algorithm']} | {r['scenario']} | {fmt(r['final'])} ({r['metric']}) | {fmt(r['target'])} | "
                     f"{fmt(r['time_to_target_s'], '{:.1f}')} | {fmt(r['time_to_ideal_final_s'], '{:.1f}')} | {r['sim_total_s']:.1f} | {r['contributed_share']:.1%} | "
                     f"{fmt(r['mean_depth'], '{:.2f}')} | {fmt(r['mean_staleness'], '{:.2f}')} | {r['wasted_share']:.1%} | {r['contributed_by_speed']} |")
    table += ["", "Deadlines: " + "; ".join(
        f"{a}: {i['deadline_s']:.2f} s (stage {i['stage']}, level {i['level']}: {i['gflop_full']:.1f} GFLOP"
        + ("" if i['gflop_level1'] is None else f", level 1: {i['gflop_level1']:.1f} GFLOP")
        + f"; median full-model time {i['median_full_s']:.2f} s; {i['late_at_full']:.0%} of clients miss it at full depth)"
        for a, i in deadlines.items())]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"command": command, "deadlines": deadlines, "rows": rows,
         "runs": {f"{a}/{s}": lines for (a, s), lines in results.items()}}, indent=1))
    plot(results, args.out)
    print("\n".join(table))


if __name__ == "__main__":
    main()
