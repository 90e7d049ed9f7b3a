"""The fair tuning protocol: every method's hyper-parameters chosen on validation splits carved
from the clients' own training data, over the same small grid, never on a test split.

    python experiments/tune.py --config CONFIG --out DIR [--methods fedms,fedper,...] [--seeds 0]
        [--validation 0.2] [--workdir DIR] [--config.KEY=VALUE ...]

Every run here has ``data.validation = V`` (``--validation``): each client's training examples
lose a random fraction V, its validation split (``partition.validation_split``); personalised
evaluation runs on those splits and global evaluation on their union, so the test split does not
enter any number this script reads (``tests/test_tuning.py`` poisons the test labels and checks
that nothing here changes). Every method gets the same rounds and local steps as the config.

The search, per method (``GRIDS``), is coordinate-wise and the same for all:

1. the client learning rate over ``LRS`` with the method's other values at their defaults;
2. each of the method's own knobs (``KNOBS``: ``ditto.lam``, ``fedprox.mu``, FedMS's
   ``fedms.local_prox``) over its grid, at the learning rate chosen in step 1.

The score of a setting is the final personalised accuracy on the validation splits, averaged
over ``--seeds``; ties go to the earlier (smaller) value. ``DIR/tuned.json`` holds, per method,
the chosen overrides and every setting's score; ``DIR/tuning.md`` the same as a table.
``experiments/compare.py --tuned DIR/tuned.json`` then runs each method with its chosen values
(on the full training data, evaluated on the test splits).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from fedms_jax.config import resolve

LRS = ("1e-3", "3e-3", "1e-2")
KNOBS: dict[str, dict[str, tuple[str, ...]]] = {
    "ditto": {"ditto.lam": ("0.01", "0.1", "1.0")},
    "fedprox": {"fedprox.mu": ("0.001", "0.01", "0.1")},
    "fedms": {"fedms.local_prox": ("0.0", "0.1")},
}


def method_overrides(method: str) -> list[str]:
    """The overrides that make ``method`` (``compare.METHODS``) run."""
    from compare import METHODS  # experiments/compare.py, beside this script (on sys.path when run)

    return METHODS[method]


def run_setting(config_name: str, base: list[str], overrides: list[str], seed: int, workdir: Path) -> float:
    """One run with ``overrides`` on validation splits -> final personalised validation accuracy."""
    from fedms_jax.run import run

    config = resolve(config_name, [*base, *overrides, f"seed={seed}"])
    assert config.data.validation > 0, "tuning runs evaluate on validation splits only"
    shutil.rmtree(workdir, ignore_errors=True)
    out = run(config, workdir, progress=False)
    return float(out.metrics["personalized_accuracy"])


def _name(overrides: list[str]) -> str:
    return "".join(c if c.isalnum() else "_" for c in "-".join(overrides))


def _default(config_name: str, base: list[str], fixed: list[str], knob: str) -> float:
    """The value of ``knob`` ("section.field") in the method's config before tuning."""
    config = resolve(config_name, [*base, *fixed])
    section, field = knob.split(".")
    return float(getattr(getattr(config, section), field))


def tune(config_name: str, base: list[str], methods: list[str], seeds: list[int], runs: Path,
         log=print, lrs: tuple[str, ...] = LRS) -> dict:
    """Runs the coordinate-wise search for each method -> {method: {'chosen': [overrides],
    'scores': [{'overrides', 'score', 'per_seed'}]}}. Finished settings are read back from
    ``runs`` (``<setting>.json``), so an interrupted search resumes."""
    results: dict = {}
    for method in methods:
        fixed = method_overrides(method)
        scores: list[dict] = []

        def score(extra: list[str]) -> float:
            per_seed = []
            for s in seeds:
                key = runs / f"{_name([method, *extra])}_seed{s}"
                done = key.with_suffix(".json")
                if done.exists():
                    per_seed.append(json.loads(done.read_text())["score"])
                    continue
                value = run_setting(config_name, base, [*fixed, *extra], s, key)
                done.write_text(json.dumps({"method": method, "overrides": extra, "seed": s, "score": value}))
                per_seed.append(value)
            mean = float(np.mean(per_seed))
            scores.append({"overrides": extra, "score": mean, "per_seed": per_seed})
            log(f"{method:12s} {' '.join(extra):40s} validation personalised {mean:.4f}")
            return mean

        lr_scores = {v: score([f"client.lr={v}"]) for v in lrs}
        lr = max(lrs, key=lambda v: (lr_scores[v], -lrs.index(v)))
        chosen = [f"client.lr={lr}"]
        for knob, grid in KNOBS.get(method.split(" ")[0], {}).items():
            default = _default(config_name, base, fixed, knob)
            # The grid's default value was scored in step 1 already (same config): not run twice.
            knob_score = lambda v: lr_scores[lr] if float(v) == default else score([*chosen, f"{knob}={v}"])
            values = {v: knob_score(v) for v in grid}
            best = max(grid, key=lambda v: (values[v], -grid.index(v)))
            if float(best) != default:
                chosen.append(f"{knob}={best}")
        results[method] = {"chosen": chosen, "scores": scores}
    return results


def table(results: dict) -> str:
    rows = ["| method | chosen | setting | validation personalised acc. |", "|---|---|---|---|"]
    for method, r in results.items():
        for s in r["scores"]:
            mark = " **(chosen)**" if s["overrides"] == r["chosen"] else ""
            rows.append(f"| {method} | {' '.join(r['chosen'])} | {' '.join(s['overrides'])}{mark} | {s['score']:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    base = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="embedded")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="fedms,fedper,fedrep,ditto,finetune,local,fedavg")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lrs", default=",".join(LRS), help="the client learning rates searched")
    p.add_argument("--validation", type=float, default=0.2, help="each client's validation fraction")
    p.add_argument("--workdir", default=None, help="where the runs go (default: OUT/runs)")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    base = [*base, f"data.validation={args.validation}", "eval_every=1000000"]  # evaluate after the last round only
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = tuple(v.strip() for v in args.lrs.split(",") if v.strip())
    for m in methods:  # every setting is validated before anything runs
        for extra in [[f"client.lr={v}"] for v in lrs] + [
                [f"{k}={v}"] for k, grid in KNOBS.get(m.split(" ")[0], {}).items() for v in grid]:
            resolve(args.config, [*base, *method_overrides(m), *extra])
    out = Path(args.out)
    runs = Path(args.workdir) if args.workdir else out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results = tune(args.config, base, methods, seeds, runs, lrs=lrs)
    command = "python experiments/tune.py " + " ".join(shlex.quote(a) for a in argv)
    (out / "tuned.json").write_text(json.dumps({"command": command, "seeds": seeds, "validation": args.validation, "lrs": lrs,
                                                "methods": results}, indent=1))
    (out / "tuning.md").write_text(f"# Tuning on validation splits\n\nMade by\n\n    {command}\n\n{table(results)}\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
