"""How the round program grows with the model's depth, scanned layers or not.

    python experiments/benchmarks/compile_vs_depth.py [--layers 2,4,8] [--config.KEY=VALUE ...]

For each depth it builds the run (default: FedMS over synthetic clients, a narrow bf16 ViT,
scanned layers) and lowers the round program of its last phase (stage 2, every block active),
then prints the StableHLO ops of the lowered program, the XLA:CPU compile seconds and the
optimised HLO's instructions; then, per op kind, what each added block costs. With scanned
layers the encoder's blocks are one loop body, so whatever grows with depth is work done per
parameter leaf outside the scan (the LoRA tree holds a subtree per block): gathers and scatters
of the cohort's rows, sharding constraints, the optimizer's update. Op counts are exact; the
compile seconds are this machine's (noisy when shared).
"""
from __future__ import annotations

import argparse
import collections
import re
import time

from fedms_jax.config import resolve
from fedms_jax.run import build
from fedms_jax.tpu_plan import shapes

BASE = ["algorithm=fedms", "data.name=synthetic", "data.num_clients=64", "cohort_size=32", "placement.chunk_size=16",
        "model.hidden=64", "model.heads=2", "model.mlp_dim=128", "model.image_size=28", "model.patch_size=7",
        "model.dtype=bfloat16"]


def measure(layers: int, overrides: list[str]) -> dict:
    exp = build(resolve(None, [*BASE, f"model.layers={layers}", *overrides]))
    server, clients = exp.states_like()
    kind, phase, *args = [w for w in exp.programs(server, clients) if w[0] == "round"][-1]
    _, lower = exp.engine.lowering(kind, phase, *[a if isinstance(a, int) else shapes(a) for a in args])
    lowered = lower()
    text = lowered.as_text()
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    ops = collections.Counter(re.findall(r"= \"?([a-z_]+\.[a-z_]+)", text))
    return dict(layers=layers, phase=str(phase), ops=ops, compile_s=seconds,
                hlo_instructions=sum(1 for line in compiled.as_text().splitlines() if " = " in line))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4,8", help="comma-separated depths")
    args, rest = ap.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    if len(overrides) != len(rest):
        ap.error(f"unknown arguments {[a for a in rest if not a.startswith('--config.')]}")
    rows = [measure(int(n), overrides) for n in args.layers.split(",")]
    print("| layers | phase | StableHLO ops | optimised HLO instructions | XLA:CPU compile s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['phase']} | {sum(r['ops'].values())} | {r['hlo_instructions']} | {r['compile_s']:.1f} |")
    first, last = rows[0], rows[-1]
    added = last["layers"] - first["layers"]
    if added:
        growth = {k: (last["ops"][k] - first["ops"][k]) / added for k in set(first["ops"]) | set(last["ops"])}
        print(f"\nStableHLO ops per added block ({first['layers']} -> {last['layers']} layers), largest first:")
        for k, v in sorted(growth.items(), key=lambda kv: -kv[1])[:15]:
            if v > 0:
                print(f"  {k}: {v:.1f}")


if __name__ == "__main__":
    main()
