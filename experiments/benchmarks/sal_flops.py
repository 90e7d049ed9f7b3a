"""Training FLOPs of one client at SAL levels k = L, L/2, 1 (XLA cost analysis).

    python experiments/benchmarks/sal_flops.py [--batch 32] [--steps 5] [--models W1,ViT-B,CLIP]

For each backbone it builds an ``Experiment`` (``fedms_jax.run.build``) of a FedAvg+SAL config
(``algorithm=fedavg_sal``; LoRA rank 8 on q and v, SGD; one client holding ``steps x batch``
synthetic examples at the model's resolution) and measures
``accounting.client_flops(engine, server, clients, Phase(1, k))``: the FLOPs of one client's
whole local training in a round, i.e. the frozen trunk run once over its examples (it caches
it: ``steps x batch`` examples are no more than its steps process) plus ``steps`` optimizer
steps (forward and backward of the top k blocks and the head, and the SGD update). The table
gives that per-round number and the mean per local step (round / steps; the once-per-round trunk
amortised over the steps), and the ratio to k = L.

Backbones are randomly initialised at the real architectures' shapes (built from transformers'
configs; the CLIP vision tower, which the config's random ViT cannot express, is swapped into
the built experiment); FLOPs do not depend on the weights.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import transformers

from fedms_jax.algorithms import make_algorithm
from fedms_jax.config import resolve
from fedms_jax.data.sources import load_synthetic
from fedms_jax.federated import accounting
from fedms_jax.federated.types import Phase
from fedms_jax.models.transformer import EncoderSpec
from fedms_jax.models.vision import VisionSpec
from fedms_jax.run import Experiment, build

NUM_CLASSES = 100
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


def experiment(spec: VisionSpec, batch: int, steps: int) -> Experiment:
    """A one-client FedAvg+SAL experiment whose expert has the architecture ``spec``."""
    enc = spec.encoder
    config = resolve("embedded", [
        "algorithm=fedavg_sal", f"model.hidden={enc.hidden_size}", f"model.layers={enc.num_layers}",
        f"model.heads={enc.num_heads}", f"model.mlp_dim={enc.mlp_dim}", f"model.hidden_act={enc.hidden_act}",
        f"model.image_size={spec.image_size}", f"model.patch_size={spec.patch_size}", "model.dtype=float32",
        "lora.rank=8", "lora.alpha=16.0", "lora.dropout=0.0", "lora.targets=q,v",
        "client.optimizer=sgd", "client.lr=0.1", "client.schedule=constant", f"client.local_steps={steps}",
        f"client.batch_size={batch}", "data.name=synthetic", "data.num_clients=1", "cohort_size=1",
        "data.partition=iid", "checkpoint.every=0",
    ])
    data = load_synthetic(num_train=steps * batch, num_test=8, num_classes=NUM_CLASSES,
                          image_size=spec.image_size, seed=config.seed)
    exp = build(config, datasets=data)
    if exp.settings.expert.spec == spec:
        return exp
    # An architecture outside the config's random ViT (CLIP): the same experiment with its expert.
    expert = dataclasses.replace(exp.settings.expert, spec=spec)
    algorithm = make_algorithm(config, dataclasses.replace(exp.settings, expert=expert))
    engine = exp.engine.with_layout(algorithm=algorithm, backbone=jax.jit(expert.init_backbone)(jax.random.key(0)))
    return dataclasses.replace(exp, algorithm=algorithm, engine=engine)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="local steps per round")
    p.add_argument("--models", default="", help="comma-separated substrings of the model names (default: all)")
    args = p.parse_args()
    picks = [m for m in args.models.split(",") if m]
    print(f"FLOPs of one client's local training per round: the frozen trunk once over its "
          f"{args.steps * args.batch} examples + {args.steps} SGD steps of batch {args.batch}; "
          f"per step = per round / {args.steps}.\n")
    print("| backbone | batch | local steps | k | GFLOP / client / round | GFLOP / step | vs k = L |\n"
          "|---|---|---|---|---|---|---|")
    for name, spec in MODELS.items():
        if picks and not any(m in name for m in picks):
            continue
        exp = experiment(spec, args.batch, args.steps)
        L = spec.num_layers
        full = None
        for k in (L, L // 2, 1):
            flops = accounting.client_flops(exp.engine, *exp.init_states(), Phase(1, k))
            full = full or flops
            print(f"| {name} | {args.batch} | {args.steps} | {k} | {flops / 1e9:.1f} | "
                  f"{flops / args.steps / 1e9:.1f} | {flops / full:.2f} |", flush=True)


if __name__ == "__main__":
    main()
