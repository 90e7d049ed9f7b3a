"""Epsilon vs accuracy of DP-FedAvg (user level) on the embedded setting, FedAvg and FedMS.

    python experiments/dp_table.py --out experiments/results/dp [--clip 1.0] [--noise 0,0.5,1.0]

Runs the default job (``fedms-jax run``'s embedded config: 24 rounds, 20 clients, 8 a round) for
each algorithm and noise multiplier with ``dp.clip`` = ``--clip``, plus each algorithm without
DP, and writes ``RESULTS.md`` (a table of the last round's epsilon, personalised and global
accuracy, and the fraction of clipped updates) and ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fedms_jax.config import resolve
from fedms_jax.run import run
from fedms_jax.storage import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/dp")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--noise", default="0,0.5,1.0")
    p.add_argument("--algorithms", default="fedavg,fedms")
    p.add_argument("--extra", default="", help="comma-separated KEY=VALUE overrides for every run (tests)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [o for o in args.extra.split(",") if o]
    rows = []
    for algorithm in args.algorithms.split(","):
        # dp.raw_metrics: the personalised accuracy (from the clients' own test data) is not covered
        # by epsilon, so under DP it is in WORKDIR/metrics_not_private.jsonl, not in the metrics
        settings = [("no DP", "nodp", [])] + [(f"z={z}", f"z{z}", [f"dp.clip={args.clip}", f"dp.noise_multiplier={z}",
                                                                   "dp.raw_metrics=true"])
                                              for z in args.noise.split(",")]
        for label, name, dp in settings:
            config = resolve("embedded", [f"algorithm={algorithm}", *dp, *extra])
            workdir = out / "runs" / f"{algorithm}_{name}"
            shutil.rmtree(workdir, ignore_errors=True)  # a fresh run (never a resume of another setting's)
            began = time.perf_counter()
            result = run(config, workdir, progress=False)
            m = result.metrics
            if dp:  # the last line of what epsilon does not cover, beside the released one
                m = {**read_jsonl(workdir / "metrics_not_private.jsonl")[-1], **m}
            rows.append({
                "algorithm": algorithm, "dp": label, "delta": config.dp.delta if dp else None,
                # null in the metrics without noise: no guarantee at all
                "epsilon": (m.get("epsilon") if m.get("epsilon") is not None else float("inf")) if dp else None,
                "personalized_accuracy": m["personalized_accuracy"], "accuracy": m.get("accuracy"),
                "clipped": m.get("dp_clipped"), "update_norm": m.get("dp_update_norm"),
                "seconds": time.perf_counter() - began,
            })
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps([{k: (None if v == float("inf") else v) for k, v in r.items()}
                                                  for r in rows], indent=1))
    fmt = lambda v, spec: "—" if v is None else ("∞" if v == float("inf") else format(v, spec))
    lines = [
        "# DP-FedAvg on the embedded setting: epsilon vs accuracy",
        "",
        f"`python experiments/dp_table.py --out {args.out} --clip {args.clip} --noise {args.noise}`",
        "",
        f"The default job (embedded config: 20 clients, a fixed-size cohort of 8 a round drawn without replacement, "
        f"24 rounds; FedMS: 12 + 12) with user-level DP-FedAvg: each client's upload clipped to L2 norm "
        f"{args.clip}, Gaussian noise of std z x clip on the server's sum. Epsilon at the config's dp.delta (1e-5) "
        "after the last round (its dp.accountant: RDP; replace-one neighbours; ∞: no noise); personalised and global accuracy after the last round; "
        "clipped = fraction of the last round's updates the clip scaled down; norm = their mean norm before clipping.",
        "",
        "| algorithm | DP | epsilon | personalised acc. | global acc. | clipped | norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['dp']} | {fmt(r['epsilon'], '.1f')} | {r['personalized_accuracy']:.4f} | "
                     f"{fmt(r['accuracy'], '.4f')} | {fmt(r['clipped'], '.2f')} | {fmt(r['update_norm'], '.3f')} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
