"""Trainable parameters per client as a share of the backbone, at ViT-B/16 and DINOv2-S/14 scale.

    python experiments/benchmarks/trainable_share.py [--rank 8] [--targets q,v] [--gate-rank 16]

The paper claims FedMS tunes < 0.3% of the foundation model's parameters. This counts, from
abstract shapes only (``jax.eval_shape``: nothing is allocated or compiled), what one FedMS
client trains at SAL level k. One expert is the top k blocks' LoRA and the linear head. With
FedMS's defaults (``local_start=stage1``, ``train_global=true``) a client trains two experts in
every round, the global one (uploaded) and its local one (kept), and in stage 2 also the gate
adapter (aggregated) and the gate head (local), reading the global expert's pooled feature;
with ``train_global=false`` stage 2 trains the local expert and the gate only. The backbone is the whole encoder with its
embeddings (no pooler). Shapes are HF's: ViT-B/16 at 224 px (``google/vit-base-patch16-224``:
768 wide, 12 blocks), DINOv2-S/14 (384 wide, 12 blocks; its head reads [CLS] + mean patch).
"""
from __future__ import annotations

import argparse

import jax

from fedms_jax import mofm
from fedms_jax.models.expert import Expert
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import EncoderSpec
from fedms_jax.models.vision import VisionSpec
from fedms_jax.federated.types import active_units, select

MODELS = {
    "ViT-B/16 (224 px, 1000 classes)": (VisionSpec(EncoderSpec(768, 12, 12, 3072, "gelu", 1e-12), image_size=224, patch_size=16), 1000),
    "ViT-B/16 (224 px, 10 classes)": (VisionSpec(EncoderSpec(768, 12, 12, 3072, "gelu", 1e-12), image_size=224, patch_size=16), 10),
    "DINOv2-S/14 (56 px, 10 classes)": (VisionSpec(EncoderSpec(384, 12, 6, 1536, "gelu", 1e-6, layer_scale=True),
                                                    image_size=56, patch_size=14, flavor="dinov2"), 10),
}


def count(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,v")
    p.add_argument("--gate-rank", type=int, default=4)
    args = p.parse_args()
    lora = LoRASpec(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets.split(",")))
    print(f"LoRA r={args.rank} on {args.targets}; gate adapter rank {args.gate_rank}\n")
    print("| backbone | backbone params | k | one expert: LoRA + head | % | stage 1: two experts | % "
          "| stage 2: two experts + gate | % | stage 2, global frozen: local + gate | % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (spec, classes) in MODELS.items():
        expert = Expert(spec, lora, classes)
        backbone = count(jax.eval_shape(expert.init_backbone, jax.random.key(0)))
        trainable = jax.eval_shape(lambda r: expert.init_trainable(r), jax.random.key(0))
        gate = count(jax.eval_shape(lambda r: mofm.init_gate(r, spec.feature_dim, args.gate_rank), jax.random.key(0)))
        L = spec.num_layers
        for k in sorted({1, L // 4, L // 2, L}):
            one = count(select(trainable, active_units(k, L)))
            cells = [one, 2 * one, 2 * one + gate, one + gate]
            print(f"| {name} | {backbone / 1e6:.2f} M | {k} | "
                  + " | ".join(f"{n:,} | {100 * n / backbone:.3f}" for n in cells) + " |")


if __name__ == "__main__":
    main()
