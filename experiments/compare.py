"""Runs every method on one setting and writes the comparison table and plots.

    python experiments/compare.py --config embedded --out experiments/results/embedded \
        [--seeds 0,1,2] [--methods fedms,fedavg,...] [--config.KEY=VALUE ...]

For each method (an algorithm plus its overrides, ``METHODS``) and seed it runs the whole job
(``fedms_jax.run.run``) and then writes, under ``--out``:

  * ``table.md``: final personalised accuracy (mean weighted by test size; and the 10th
    percentile over clients), global accuracy (global model on the whole test set; "-" for
    methods without one), trainable parameters per client as % of the backbone, bytes uploaded
    and downloaded per client per round (mean over rounds), training GFLOPs per round (XLA cost
    analysis of one client's compiled local training x local steps x cohort, mean over rounds),
    and wall seconds. With several seeds: mean +- std over seeds.
  * ``accuracy_vs_round.png``, ``accuracy_vs_bytes.png`` (personalised accuracy against
    cumulative bytes communicated, up + down, all clients), ``global_accuracy_vs_round.png``.
  * ``results.json``: every number above plus each run's metrics, and the command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fedms_jax.config import apply_overrides, load_config, validate
from fedms_jax.federated import accounting

METHODS: dict[str, list[str]] = {
    "fedms": ["algorithm=fedms"],
    "fedms (fixed 0.5/0.5)": ["algorithm=fedms", "fedms.gate=fixed", "fedms.local_weight=0.5"],
    "fedms (no SAL)": ["algorithm=fedms", "sal.mode=all"],
    "fedms (no stage 1)": ["algorithm=fedms", "stage1_rounds=0"],
    "fedavg_sal": ["algorithm=fedavg_sal"],
    "fedavg": ["algorithm=fedavg"],
    "fedprox": ["algorithm=fedprox"],
    "fedper": ["algorithm=fedper"],
    "local": ["algorithm=local"],
    "finetune": ["algorithm=finetune"],
}


def run_method(base: list[str], config_name: str, method: str, seed: int, workdir: Path) -> dict:
    from fedms_jax.run import run

    config = validate(apply_overrides(load_config(config_name), base + METHODS[method] + [f"seed={seed}"]))
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of an old one
    start = time.perf_counter()
    out = run(config, workdir, progress=False)
    seconds = time.perf_counter() - start
    engine, algorithm = out.experiment.engine, out.experiment.algorithm
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    phases = [algorithm.phase(t) for t in range(config.rounds)]
    server, clients = out.server, out.clients
    flops = {p: accounting.client_flops(engine, server, clients, p) for p in algorithm.phases(config.rounds)}
    trainable = max(accounting.trainable_params(engine, server, clients, p) for p in algorithm.phases(config.rounds))
    backbone = sum(x.size for x in jax.tree_util.tree_leaves(engine.backbone))
    final = lines[-1]
    return {
        "method": method, "seed": seed, "seconds": seconds,
        "personalized_accuracy": final["personalized_accuracy"],
        "personalized_p10": final["personalized_p10"],
        "accuracy": final.get("accuracy"),
        "trainable_params": trainable, "backbone_params": int(backbone),
        "trainable_pct": 100.0 * trainable / backbone,
        "bytes_up": float(np.mean([l["bytes_up"] / l["cohort"] for l in lines])),
        "bytes_down": float(np.mean([l["bytes_down"] / l["cohort"] for l in lines])),
        "gflops_per_round": float(np.mean([flops[p] * config.cohort_size for p in phases])) / 1e9,
        "gate_local_weight": final.get("gate_local_weight"),
        "metrics": lines,
    }


def _fmt(values: list, spec: str, scale: float = 1.0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    v = np.asarray(values, np.float64) * scale
    return format(v.mean(), spec) if len(v) == 1 else f"{format(v.mean(), spec)} ± {format(v.std(), spec)}"


def table(results: list[dict], methods: list[str]) -> str:
    rows = [
        "| method | personalised acc. | p10 over clients | global acc. | trainable % of backbone "
        "| KB up / client / round | KB down / client / round | GFLOPs / round | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        col = lambda key: [r[key] for r in rs]
        rows.append(
            f"| {m} | {_fmt(col('personalized_accuracy'), '.3f')} | {_fmt(col('personalized_p10'), '.3f')} "
            f"| {_fmt(col('accuracy'), '.3f')} | {_fmt(col('trainable_pct'), '.2f')} "
            f"| {_fmt(col('bytes_up'), '.1f', 1e-3)} | {_fmt(col('bytes_down'), '.1f', 1e-3)} "
            f"| {_fmt(col('gflops_per_round'), '.2f')} | {_fmt(col('seconds'), '.0f')} |"
        )
    return "\n".join(rows)


def plots(results: list[dict], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(key: str, x_of):
        for m in methods:
            rs = [r for r in results if r["method"] == m]
            if not rs or key not in rs[0]["metrics"][-1]:
                continue
            xs = x_of(rs[0]["metrics"])
            ys = np.mean([[l.get(key, np.nan) for l in r["metrics"]] for r in rs], axis=0)
            ok = ~np.isnan(ys)
            style = "-" if m.startswith("fedms") else "--"
            yield m, np.asarray(xs)[ok], ys[ok], style

    def figure(key, x_of, xlabel, ylabel, name, logx=False):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, x, y, style in curves(key, x_of):
            ax.plot(x, y, style, label=m, lw=2 if m == "fedms" else 1.2)
        if logx:
            ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

    rounds = lambda lines: [l["round"] + 1 for l in lines]
    cum_mb = lambda lines: np.cumsum([(l["bytes_up"] + l["bytes_down"]) / 1e6 for l in lines])
    figure("personalized_accuracy", rounds, "round", "personalised accuracy", "accuracy_vs_round.png")
    figure("personalized_accuracy", cum_mb, "MB communicated (up + down, all clients, cumulative)",
           "personalised accuracy", "accuracy_vs_bytes.png", logx=True)
    figure("accuracy", rounds, "round", "global accuracy (whole test set)", "global_accuracy_vs_round.png")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    base = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="embedded")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workdir", default=None, help="where the runs' metrics go (default: OUT/runs)")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    for m in methods:  # every config is validated before anything runs
        for s in seeds:
            validate(apply_overrides(load_config(args.config), base + METHODS[m] + [f"seed={s}"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.workdir) if args.workdir else out / "runs"
    results = []
    for m in methods:
        for s in seeds:
            r = run_method(base, args.config, m, s, runs / f"{''.join(c if c.isalnum() else '_' for c in m)}_seed{s}")
            print(f"{m:24s} seed {s}: personalised {r['personalized_accuracy']:.3f}  global "
                  f"{r['accuracy'] if r['accuracy'] is not None else float('nan'):.3f}  {r['seconds']:.0f}s", flush=True)
            results.append(r)
    command = "python experiments/compare.py " + " ".join(shlex.quote(a) for a in argv)
    md = table(results, methods)
    header = (
        f"# {args.config}: every method\n\nMade by\n\n    {command}\n\non {jax.devices()[0].device_kind} "
        f"({jax.device_count()} device(s)); seeds {seeds}; final round's numbers.\n\n"
    )
    (out / "table.md").write_text(header + md + "\n")
    plots(results, methods, out)
    (out / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
