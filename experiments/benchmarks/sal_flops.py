"""FLOPs of one compiled LoRA gradient step at SAL levels k = L, L/2, 1 (XLA cost analysis).

    python experiments/benchmarks/sal_flops.py [--batch 32]

Backbones are randomly initialised at the real architectures' shapes (built from transformers'
configs); FLOPs do not depend on the weights. LoRA rank 8 on q and v, SGD.
"""
from __future__ import annotations

import argparse

import jax
import optax
import transformers

from fedms_jax import sal
from fedms_jax.models.expert import Expert
from fedms_jax.models.lora import LoRASpec
from fedms_jax.models.transformer import EncoderSpec
from fedms_jax.models.vision import VisionSpec
from fedms_jax.train import compiled_step_flops

MODELS = {
    "W1 ViT (192 wide, 12 layers, 32x32, patch 4)": VisionSpec(
        EncoderSpec(192, 12, 3, 768, "gelu", 1e-12), image_size=32, patch_size=4
    ),
    "ViT-B/16 224 (google/vit-base-patch16-224-in21k shape)": VisionSpec.from_hf(
        transformers.ViTConfig(), pooler=False
    ),
    "CLIP ViT-B/32 224 vision tower (openai/clip-vit-base-patch32 shape)": VisionSpec.from_hf(
        transformers.CLIPConfig()
    ),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    print("| backbone | batch | k | GFLOP / step | vs k = L |\n|---|---|---|---|---|")
    for name, spec in MODELS.items():
        expert = Expert(spec, LoRASpec(rank=8, alpha=16.0, targets=("q", "v")), 100)
        backbone = jax.eval_shape(expert.init_backbone, jax.random.key(0))
        trainable = jax.eval_shape(expert.init_trainable, jax.random.key(1))
        L = spec.num_layers
        full = None
        for k in (L, L // 2, 1):
            t = {"lora": sal.active_lora(trainable["lora"], k, L), "head": trainable["head"]}
            flops = compiled_step_flops(expert, optax.sgd(0.1), k, backbone, t, args.batch)
            full = full or flops
            print(f"| {name} | {args.batch} | {k} | {flops / 1e9:.1f} | {flops / full:.2f} |", flush=True)


if __name__ == "__main__":
    main()
