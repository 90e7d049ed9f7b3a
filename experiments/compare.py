"""Runs every method on one setting and writes the comparison table and plots.

    python experiments/compare.py --config embedded --out experiments/results/embedded \
        [--seeds 0,1,2] [--methods fedms,fedavg,...] [--flops-seeds 0] [--workdir DIR --reuse] \
        [--config.KEY=VALUE ...]

For each method (an algorithm plus its overrides, ``METHODS``) and seed it runs the whole job
(``fedms_jax.run.run``) and then writes, under ``--out``:

  * ``table.md``: final personalised accuracy (mean weighted by test size; and the 10th
    percentile over clients), global accuracy (global model on the whole test set; "-" for
    methods without one), the FedMS gate's mean weight on the local expert over all test
    examples (and its std over the examples), trainable parameters per client as % of the
    whole backbone, bytes uploaded and downloaded per client per round (mean over rounds),
    training GFLOPs per round (XLA cost analysis of one client's compiled local training x
    local steps x cohort, each budget tier at its level, mean over rounds), and wall seconds.
    With several seeds: mean +- std over seeds. For FedMS runs, a second table sets the
    mixture against each of its experts alone on the same test splits; with budget tiers, a
    third gives each tier's costs.
  * ``accuracy_vs_round.png``, ``accuracy_vs_bytes.png`` (personalised accuracy against
    cumulative bytes communicated, up + down, all clients), ``global_accuracy_vs_round.png``.
  * ``results.json``: every number above plus each run's metrics, and the command.

Each finished run is also kept as ``WORKDIR/<method>_seed<s>.json``; with ``--reuse`` a later
invocation (or several in parallel, one per seed) takes those instead of running them again, so
a long comparison can be split and then tabulated by one last invocation over every seed.
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

from fedms_jax.config import resolve
from fedms_jax.federated import accounting

METHODS: dict[str, list[str]] = {
    "fedms": ["algorithm=fedms"],
    # Ablations of issue 25's changes, one at a time (DESIGN.md section 1's revised choices).
    "fedms (no label prior)": ["algorithm=fedms", "fedms.prior=none"],
    "fedms (global frozen in stage 2)": ["algorithm=fedms", "fedms.train_global=false"],
    "fedms (local expert from stage 2)": ["algorithm=fedms", "fedms.local_start=stage2"],
    "fedms (local expert through the mixture)": ["algorithm=fedms", "fedms.local_loss=mixture"],
    "fedms (fixed held-out slice)": ["algorithm=fedms", "fedms.rotate_holdout=false"],
    "fedms (residual mix)": ["algorithm=fedms", "fedms.mixing=residual"],
    "fedms (local prox 0.1)": ["algorithm=fedms", "fedms.local_prox=0.1"],
    # The FedMS of issue 14 (frozen global expert, no prior, local expert in stage 2 only).
    "fedms (issue 14)": ["algorithm=fedms", "fedms.prior=none", "fedms.train_global=false", "fedms.local_start=stage2",
                         "fedms.local_loss=own", "fedms.rotate_holdout=false", "fedms.gate_rank=16"],
    # Older ablations: the gate trained with the experts on the same batches from the branch
    # point's mean token (this project's first scheme); no gate; SAL off; no stage 1; budget tiers.
    "fedms (gate on train batches)": ["algorithm=fedms", "fedms.gate_holdout=0", "fedms.gate_input=mean"],
    "fedms (fixed 0.5/0.5)": ["algorithm=fedms", "fedms.gate=fixed", "fedms.local_weight=0.5"],
    "fedms (no SAL)": ["algorithm=fedms", "sal.mode=all"],
    "fedms (no stage 1)": ["algorithm=fedms", "stage1_rounds=0"],
    # Half as long a stage 1: the local experts get more of the same rounds.
    "fedms (stage 1 halved)": ["algorithm=fedms", "stage1_rounds=5"],
    # Budget-aware SAL: 3 tiers of 1, 2 and 4 blocks (a quarter, a quarter, half of each cohort).
    "fedms (budgets 1/2/4)": ["algorithm=fedms", "sal.budgets=1,2,4", "sal.budget_shares=0.25,0.25,0.5"],
    "fedavg_sal": ["algorithm=fedavg_sal"],
    "fedavg_sal (budgets 1/2/4)": ["algorithm=fedavg_sal", "sal.budgets=1,2,4", "sal.budget_shares=0.25,0.25,0.5"],
    "fedavg": ["algorithm=fedavg"],
    "fedprox": ["algorithm=fedprox"],
    "fedper": ["algorithm=fedper"],
    "fedrep": ["algorithm=fedrep"],
    "ditto": ["algorithm=ditto"],
    "local": ["algorithm=local"],
    "finetune": ["algorithm=finetune"],
}


def overrides_of(method: str, tuned: dict | None = None) -> list[str]:
    """The method's overrides, then (``--tuned``) the values the tuning protocol chose for it, or
    for an ablation (``'fedms (...)'``) those chosen for its method."""
    tuned = tuned or {}
    chosen = tuned.get(method, tuned.get(method.split(" (")[0], {})).get("chosen", [])
    return METHODS[method] + list(chosen)


def run_method(base: list[str], config_name: str, method: str, seed: int, workdir: Path, flops: bool = True,
               tuned: dict | None = None) -> dict:
    from fedms_jax.run import run

    config = resolve(config_name, base + overrides_of(method, tuned) + [f"seed={seed}"])
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of an old one
    start = time.perf_counter()
    out = run(config, workdir, progress=False)
    seconds = time.perf_counter() - start
    engine, algorithm = out.experiment.engine, out.experiment.algorithm
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    phases = [algorithm.phase(t) for t in range(config.rounds)]
    server, clients = out.server, out.clients
    # FLOPs per round: each budget tier's clients x one client's FLOPs at the tier's level (one
    # tier of the whole cohort without budgets); client_flops memoised per level.
    per_level: dict = {}
    if flops:  # compiles one client per phase: off for the seeds of --flops-seeds' complement
        flops = {p: accounting.tier_flops(engine, server, clients, p, config.cohort_size, per_level)
                 for p in algorithm.phases(config.rounds)}
    trainable = max(accounting.trainable_params(engine, server, clients, p) for p in algorithm.phases(config.rounds))
    # The whole backbone (all L blocks), also with model.frozen_blocks > 0, where the engine
    # holds only the top L - F blocks: "% of the backbone" stays relative to the real model.
    backbone = out.experiment.backbone_params
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
        "gflops_per_round": float(np.mean([sum(flops[p]) for p in phases])) / 1e9 if flops else None,
        "gflops_per_client_round": float(np.mean([sum(flops[p]) for p in phases])) / 1e9 / config.cohort_size if flops else None,
        "overrides": overrides_of(method, tuned),
        "gate_local_weight": final.get("gate_local_weight"),
        "gate_local_std": final.get("gate_local_std"),
        "personalized_accuracy_global": final.get("personalized_accuracy_global"),
        "personalized_accuracy_local": final.get("personalized_accuracy_local"),
        "mixture_minus_best_expert": final.get("mixture_minus_best_expert"),
        "tiers": tier_costs(engine, server, clients, phases, config.cohort_size, per_level) if flops else None,
        "metrics": lines,
    }


def tier_costs(engine, server, clients, phases, cohort_size: int, per_level: dict) -> list[dict] | None:
    """Per budget tier (``sal.budgets``; None without): clients per round, mean blocks trained,
    bytes and GFLOPs per client per round (means over the rounds), from each round's level."""
    if engine.tiers is None:
        return None
    nbytes: dict = {}
    out = []
    for i, budget in enumerate(engine.tiers.budgets):
        tiers = [accounting.tier_phases(engine, p, cohort_size)[i] for p in phases]
        for t in tiers:
            if t.phase not in nbytes:
                nbytes[t.phase] = accounting.bytes_per_client(engine, server, clients, t.phase)
            if t.phase not in per_level:
                per_level[t.phase] = accounting.client_flops(engine, server, clients, t.phase)
        out.append({
            "budget": budget, "clients_per_round": tiers[0].clients,
            "mean_blocks": float(np.mean([t.phase.num_active for t in tiers])),
            "bytes_down": float(np.mean([nbytes[t.phase][0] for t in tiers])),
            "bytes_up": float(np.mean([nbytes[t.phase][1] for t in tiers])),
            "gflops_per_client_round": float(np.mean([per_level[t.phase] for t in tiers])) / 1e9,
        })
    return out


def _fmt(values: list, spec: str, scale: float = 1.0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    v = np.asarray(values, np.float64) * scale
    return format(v.mean(), spec) if len(v) == 1 else f"{format(v.mean(), spec)} ± {format(v.std(), spec)}"


def _gate(rs: list[dict]) -> str:
    if not rs or rs[0].get("gate_local_weight") is None:
        return "-"
    std = [r["gate_local_std"] for r in rs if r.get("gate_local_std") is not None]
    return _fmt([r["gate_local_weight"] for r in rs], ".2f") + (f" ({np.mean(std):.2f})" if std else "")


def table(results: list[dict], methods: list[str], num_seeds: int = 1) -> str:
    rows = [
        "| method | personalised acc. | p10 over clients | global acc. | gate: local weight (std over examples) "
        "| trainable % of backbone | KB up / client / round | KB down / client / round | GFLOPs / client / round | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        col = lambda key: [r[key] for r in rs]
        name = m if len(rs) == num_seeds else f"{m} ({len(rs)} seed{'s' * (len(rs) > 1)})"
        rows.append(
            f"| {name} | {_fmt(col('personalized_accuracy'), '.3f')} | {_fmt(col('personalized_p10'), '.3f')} "
            f"| {_fmt(col('accuracy'), '.3f')} | {_gate(rs)} | {_fmt(col('trainable_pct'), '.3f')} "
            f"| {_fmt(col('bytes_up'), '.1f', 1e-3)} | {_fmt(col('bytes_down'), '.1f', 1e-3)} "
            f"| {_fmt([r.get('gflops_per_client_round') for r in rs], '.2f')} | {_fmt(col('seconds'), '.0f')} |"
        )
    mixtures = [m for m in methods if any(r["method"] == m and r.get("personalized_accuracy_local") is not None for r in results)]
    if mixtures:  # FedMS: the mixture against each of its own experts alone, on the same clients
        rows += ["", "The mixture against its own experts (personalised accuracy on each client's test split):", "",
                 "| method | mixture | global expert alone | local expert alone | per-client mixture - best expert |",
                 "|---|---|---|---|---|"]
        for m in mixtures:
            rs = [r for r in results if r["method"] == m]
            col = lambda key: [r[key] for r in rs]
            rows.append(f"| {m} | {_fmt(col('personalized_accuracy'), '.3f')} | {_fmt(col('personalized_accuracy_global'), '.3f')} "
                        f"| {_fmt(col('personalized_accuracy_local'), '.3f')} | {_fmt(col('mixture_minus_best_expert'), '+.3f')} |")
    tiered = [(m, r["tiers"]) for m in methods for r in results if r["method"] == m and r.get("tiers")]
    if tiered:  # budget-aware SAL: the costs of each tier (the first seed's run of each method)
        rows += ["", "Per budget tier (`sal.budgets`; means over the rounds):", "",
                 "| method | budget (blocks) | clients / round | blocks trained | KB up / client / round "
                 "| KB down / client / round | GFLOPs / client / round |",
                 "|---|---|---|---|---|---|---|"]
        seen = set()
        for m, tiers in tiered:
            if m in seen:
                continue
            seen.add(m)
            rows += [f"| {m} | {t['budget']} | {t['clients_per_round']} | {t['mean_blocks']:.2f} "
                     f"| {t['bytes_up'] / 1e3:.1f} | {t['bytes_down'] / 1e3:.1f} | {t['gflops_per_client_round']:.3f} |"
                     for t in tiers]
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
    p.add_argument("--flops-seeds", default=None,
                   help="measure GFLOPs per round only in these seeds' runs (each costs a compile per phase; "
                        "the table averages the runs that have it). Default: every run")
    p.add_argument("--tuned", default=None,
                   help="experiments/tune.py's tuned.json: each method runs with the values chosen for it")
    p.add_argument("--reuse-only", action="store_true",
                   help="tabulate the finished runs in WORKDIR only (none is run); a method with fewer "
                        "seeds than --seeds says how many it has")
    p.add_argument("--reuse", action="store_true",
                   help="take a run's result from WORKDIR/<method>_seed<s>.json when an earlier invocation "
                        "finished it (the same config and overrides are the caller's responsibility)")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    flops_seeds = None if args.flops_seeds is None else {int(s) for s in args.flops_seeds.split(",")}
    tuned = json.loads(Path(args.tuned).read_text())["methods"] if args.tuned else None
    for m in methods:  # every config is validated before anything runs
        for s in seeds:
            resolve(args.config, base + overrides_of(m, tuned) + [f"seed={s}"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.workdir) if args.workdir else out / "runs"
    results = []
    for m in methods:
        for s in seeds:
            workdir = runs / f"{''.join(c if c.isalnum() else '_' for c in m)}_seed{s}"
            done = workdir.with_name(workdir.name + ".json")
            if (args.reuse or args.reuse_only) and done.exists():  # finished by an earlier invocation
                results.append(json.loads(done.read_text()))
                continue
            if args.reuse_only:
                continue
            r = run_method(base, args.config, m, s, workdir, flops=flops_seeds is None or s in flops_seeds, tuned=tuned)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(r))
            tmp.replace(done)
            print(f"{m:24s} seed {s}: personalised {r['personalized_accuracy']:.3f}  global "
                  f"{r['accuracy'] if r['accuracy'] is not None else float('nan'):.3f}  {r['seconds']:.0f}s", flush=True)
            results.append(r)
    command = "python experiments/compare.py " + " ".join(shlex.quote(a) for a in argv)
    methods = [m for m in methods if any(r["method"] == m for r in results)]
    md = table(results, methods, len(seeds))
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
