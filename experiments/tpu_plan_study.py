"""The pod-scale sharding study of ``fedms-jax plan --topology`` (issue 28): every plan below is
compiled for a TPU topology on this CPU-only host, written as JSON under
``experiments/results/tpu_plan/``, then tabulated (``RESULTS.md``'s tables) and plotted
(estimated round time against clients per round, per strategy).

    python experiments/tpu_plan_study.py [--only NAME,..] [--report-only]

A plan whose JSON exists is not compiled again (delete it to redo it), so the study resumes.
Shapes, not weights: the backbones are random-init ViTs of the named models' shapes (the
compile and its costs depend on shapes only); the data are synthetic at the same input size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "tpu_plan"

# Model shapes: (hidden, layers, heads, mlp, image, patch).
SHAPES = {
    "vit_b16": (768, 12, 12, 3072, 224, 16),
    "vit_l14": (1024, 24, 16, 4096, 224, 14),  # CLIP ViT-L/14's vision tower
    "dinov2_s14": (384, 12, 6, 1536, 56, 14),  # the real setting (experiments/configs/fmnist_dinov2.py)
}


def model(name: str, *extra: str) -> list[str]:
    h, l, heads, mlp, image, patch = SHAPES[name]
    return [f"--config.model.hidden={h}", f"--config.model.layers={l}", f"--config.model.heads={heads}",
            f"--config.model.mlp_dim={mlp}", f"--config.model.image_size={image}", f"--config.model.patch_size={patch}",
            "--config.model.dtype=bfloat16", *extra]


def fedms(cohort: int, chunk: int, clients: int | None = None) -> list[str]:
    return ["--config.algorithm=fedms", "--config.data.name=synthetic", f"--config.data.num_clients={clients or 2 * cohort}",
            f"--config.cohort_size={cohort}", f"--config.placement.chunk_size={chunk}"]


REMAT = "--config.model.remat=true"
# name -> plan arguments. FedMS's stage-2 round program (the heaviest: both experts and the gate,
# every SAL block of the schedule active) unless --programs all.
PLANS = {
    # The target: ViT-L/14, 4096 clients per round, v5e-256.
    "vit_l14_v5e_256_4096": ["--topology", "v5e:16x16", "--layouts", "256x1:replicated,64x4:fsdp,64x4:tensor",
                             "--programs", "round", *fedms(4096, 256), *model("vit_l14", REMAT)],
    # ViT-B/16 on the three pods, replicated against fsdp, and the round time against the cohort.
    "vit_b16_v5e_256_cohorts": ["--topology", "v5e:16x16", "--layouts", "256x1:replicated,64x4:fsdp",
                                "--programs", "round", "--cohorts", "1024,4096,16384", *fedms(256, 256),
                                *model("vit_b16", REMAT)],
    "vit_b16_v4_128": ["--topology", "v4:4x4x4", "--layouts", "128x1:replicated,32x4:fsdp", "--programs", "round",
                       *fedms(1024, 128), *model("vit_b16", REMAT)],
    "vit_b16_v6e_256": ["--topology", "v6e:16x16", "--layouts", "256x1:replicated,64x4:fsdp", "--programs", "round",
                        *fedms(1024, 256), *model("vit_b16", REMAT)],
    # ViT-L/14 on the other two pods, 1024 clients per round.
    "vit_l14_v4_128": ["--topology", "v4:4x4x4", "--layouts", "128x1:replicated,32x4:fsdp", "--programs", "round",
                       *fedms(1024, 128), *model("vit_l14", REMAT)],
    "vit_l14_v6e_256": ["--topology", "v6e:16x16", "--layouts", "256x1:replicated,64x4:fsdp", "--programs", "round",
                        *fedms(1024, 256), *model("vit_l14", REMAT)],
    # Every program of a two-stage ViT-B/16 run (stage 1's round included), streamed population.
    "vit_b16_v5e_256_all": ["--topology", "v5e:16x16", "--layouts", "256x1:replicated,64x4:fsdp", "--programs", "all",
                            *fedms(256, 256, 2560), *model("vit_b16", REMAT), "--config.rounds=4",
                            "--config.stage1_rounds=2", "--config.population.mode=streamed"],
    # Two v5e-64 slices: the client axis over both, the model axis inside a slice.
    "vit_b16_2x_v5e_64": ["--topology", "2xv5e:8x8", "--layouts", "32x4:fsdp", "--programs", "round",
                          *fedms(1024, 128), *model("vit_b16", REMAT)],
    # The real setting's DINOv2-S/14 shapes (56 px): every program of the run (both stages).
    "dinov2_s14_v5e_256_all": ["--topology", "v5e:16x16", "--layouts", "256x1:replicated,64x4:fsdp,64x4:tensor",
                               "--programs", "all", *fedms(256, 256, 2560), *model("dinov2_s14"),
                               "--config.rounds=4", "--config.stage1_rounds=2"],
    # Per-chip bytes against the model axis: fsdp over 2, 4 and 8 chips against replicated; with a
    # device population (its 512 clients' data and states on every chip), then streamed.
    "dinov2_s14_v5e_256_fsdp_sweep": ["--topology", "v5e:16x16", "--layouts",
                                      "256x1:replicated,128x2:fsdp,64x4:fsdp,32x8:fsdp", "--programs", "round",
                                      *fedms(256, 256), *model("dinov2_s14")],
    "dinov2_s14_v5e_256_fsdp_sweep_streamed": ["--topology", "v5e:16x16", "--layouts",
                                               "256x1:replicated,128x2:fsdp,64x4:fsdp,32x8:fsdp", "--programs",
                                               "round", *fedms(256, 256), *model("dinov2_s14"),
                                               "--config.population.mode=streamed"],
    # The largest cohort per round that fits, the real setting's shapes, fsdp; a streamed population
    # so that the population (65536 clients) does not cap the search.
    "dinov2_s14_v5e_256_largest": ["--topology", "v5e:16x16", "--layouts", "64x4:fsdp", "--programs", "round",
                                   "--cohorts", "search", *fedms(256, 256, 65536), *model("dinov2_s14"),
                                   "--config.population.mode=streamed"],
}


def compile_plans(names: list[str], timeout: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = OUT / f"{name}.json"
        if path.exists():
            print(f"{name}: {path} exists, kept", flush=True)
            continue
        cmd = ["fedms-jax", "plan", *PLANS[name], "--json", str(path)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        (OUT / f"{name}.log").write_text(r.stderr)
        print(f"{name}: exit {r.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)


def report() -> str:
    """Every plan's table (``tpu_plan.table``) with its command, and the plot."""
    from fedms_jax.tpu_plan import table

    out = []
    for name, args in PLANS.items():
        path = OUT / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        out += [f"### {name}", "", "    fedms-jax plan " + " ".join(args) + f" --json {path.relative_to(OUT.parent.parent.parent)}",
                "", table(result), ""]
    plot()
    return "\n".join(out)


def plot() -> None:
    """Estimated round time against clients per round, one line per layout (ViT-B/16, v5e-256)."""
    path = OUT / "vit_b16_v5e_256_cohorts.json"
    if not path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    lines: dict[str, list[tuple[int, float, bool]]] = {}
    for row in result["rows"]:
        if "round_s" in row:
            lines.setdefault(row["layout"], []).append((row["cohort"], row["round_s"], row["fits"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for layout, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=layout)
        for m, s, fits in points:
            if not fits:
                ax.annotate("does not fit", (m, s), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients per round")
    ax.set_ylabel("estimated round time (s, roofline)")
    ax.set_title(f"FedMS ViT-B/16 shapes, {result['topology']} ({result['chips']} chips), compiled offline", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "round_time_vs_cohort.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated plan names (default: all)")
    ap.add_argument("--report-only", action="store_true", help="tabulate and plot the JSON already there")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per plan")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(PLANS)
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        sys.exit(f"--only: unknown plan {unknown[0]!r}; plans: {', '.join(PLANS)}")
    if not args.report_only:
        compile_plans(names, args.timeout)
    (OUT / "tables.md").write_text(report())
    print(f"wrote {OUT / 'tables.md'}")


if __name__ == "__main__":
    main()
