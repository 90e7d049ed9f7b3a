"""Every sharding layout on the same small workload: memory, seconds per round, collectives.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python experiments/sharding_compare.py [--rounds 4] [--layouts 8x1:replicated,...] [--config.K=V ...]

Workload (default): the embedded config with a 192-wide, 6-block ViT (6 heads, MLP 768) at
32x32, FedMS stage 2 at k = L, cohort 8 x 2 local steps x batch 8. For each layout it reports
the backbone bytes per device (placed arrays), XLA's memory analysis of the compiled round
(arguments, temporaries), the median seconds per round after compilation, and the collectives in
the compiled program (count and result bytes of all-gather, all-reduce, reduce-scatter,
all-to-all and collective-permute ops; ops inside a loop body are counted once, as XLA's cost
analysis does).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.config import apply_overrides, load_config, validate
from fedms_jax.federated import sharding
from fedms_jax.federated.placement import Vmap
from fedms_jax.federated.rounds import Engine, sample_cohort
from fedms_jax.plan import Layout, default_layouts

WORKLOAD = ["model.hidden=192", "model.layers=6", "model.heads=6", "model.mlp_dim=768", "model.image_size=32",
            "model.patch_size=4", "client.local_steps=2", "client.batch_size=8", "cohort_size=8",
            "rounds=2", "stage1_rounds=0", "sal.mode=all", "lora.targets=q,v"]
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{op: (count, result bytes)} from compiled HLO text."""
    out = {op: [0, 0] for op in COLLECTIVES}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        op = m.group(2)
        out[op][0] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            out[op][1] += n * DTYPE_BYTES.get(dtype, 4)
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--layouts", default="")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    from fedms_jax.run import build

    config = validate(apply_overrides(load_config("embedded"), WORKLOAD + overrides))
    n = len(jax.devices())
    layouts = [Layout.parse(t) for t in args.layouts.split(",") if t] or default_layouts(n)
    exp = build(config, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    algorithm, base = exp.algorithm, exp.engine
    phase = algorithm.phase(0)
    host_states = jax.tree_util.tree_map(np.asarray, exp.init_states())  # rounds donate theirs
    print(f"{n} x {jax.devices()[0].device_kind}; workload: {' '.join(WORKLOAD + overrides)}; phase {phase}\n")
    print("| layout | backbone MB/device | arguments MB | temporaries MB | s/round (median) | "
          + " | ".join(f"{c} (n, MB)" for c in COLLECTIVES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(COLLECTIVES))
    for layout in layouts:
        try:
            mesh = sharding.make_mesh(layout.clients, layout.model)
            engine = Engine(algorithm, base.backbone, base.data, seed=config.seed, placement=Vmap(mesh),
                            strategy=layout.strategy)
        except ValueError as e:
            print(f"| {layout} | not possible: {e} |")
            continue
        server, clients = engine.place(host_states)
        cohort = sample_cohort(config.seed, 0, config.data.num_clients, config.cohort_size)
        compiled = engine.round_fn(phase).lower(
            server, clients, jnp.int32(0), jnp.asarray(cohort), engine.backbone, engine.data).compile()
        mem = compiled.memory_analysis()
        coll = collectives(compiled.as_text())
        times = []
        for t in range(args.rounds + 1):
            cohort = sample_cohort(config.seed, t, config.data.num_clients, config.cohort_size)
            start = time.perf_counter()
            server, clients, m = engine.run_round(server, clients, t, phase, cohort)
            jax.block_until_ready((server, clients, m))
            times.append(time.perf_counter() - start)
        backbone = max(sharding.bytes_per_device(engine.backbone).values()) / 2**20
        cells = " | ".join(f"{c}, {b_ / 2**20:.2f}" for c, b_ in coll.values())
        print(f"| {layout} | {backbone:.2f} | {mem.argument_size_in_bytes / 2**20:.2f} | "
              f"{mem.temp_size_in_bytes / 2**20:.2f} | {statistics.median(times[1:]):.3f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
