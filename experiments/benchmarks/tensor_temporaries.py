"""Per-chip temporaries of FedMS's stage-2 round under replicated, fsdp and tensor, with and without
``model.remat``, compiled for v5e:2x2 with no TPU attached (needs the tpu extra).

    python experiments/benchmarks/tensor_temporaries.py [--image-size 112] [--layers 4]

The reproduction of what the ViT-L/14 pod plan showed (tensor asked 191 GB of HBM where fsdp
needed 7.2 GB): a tiny config (16 clients per round, lane-aligned widths) whose tensor layout
has 2x the clients per chip of the replicated one, and prints each layout's temporaries MB.
"""
from __future__ import annotations

import argparse

from fedms_jax import plan, tpu_plan
from fedms_jax.config import apply_overrides, load_config, validate

TINY = ["data.name=synthetic", "model.hidden=128", "model.mlp_dim=256", "model.heads=4", "algorithm=fedms",
        "rounds=2", "stage1_rounds=1", "eval_every=2", "model.dtype=bfloat16", "cohort_size=16",
        "data.num_clients=32", "placement.chunk_size=16"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)
    layouts = [plan.Layout(4, 1, "replicated"), plan.Layout(2, 2, "fsdp"), plan.Layout(2, 2, "tensor")]
    print("| remat | layout | clients per chip | temporaries MB | arguments MB |")
    print("|---|---|---|---|---|")
    for remat in ("false", "true"):
        config = validate(apply_overrides(load_config("embedded"), [
            *TINY, f"model.image_size={args.image_size}", "model.patch_size=14", f"model.layers={args.layers}",
            f"model.remat={remat}"]))
        result = tpu_plan.plan_topology(config, "v5e:2x2", layouts, programs="round", jobs=1)
        for layout, row in zip(layouts, result["rows"]):
            per_chip = 16 // (layout.clients * (layout.model if layout.strategy == "fsdp" else 1))
            print(f"| {remat} | {layout} | {per_chip} | {row['temporaries_mb']:.0f} | {row['arguments_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
