"""Seconds per round: vmap backend vs sequential backend, same workload, same process.

    python experiments/benchmarks/backends.py [--clients 32] [--rounds 5]

Workload: the embedded default's ViT (64 wide, 4 layers, 16x16 input, LoRA r=8 on all six
targets), synthetic 8x8 data, every client in the cohort, 2 local steps x batch 8, SAL k = L.
The first round of each backend (compilation) is excluded; the median of the rest is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax

from fedms_jax.config import apply_overrides, load_config, validate
from fedms_jax.federated.engine import sample_cohort
from fedms_jax.run import build


def seconds_per_round(backend: str, clients: int, rounds: int) -> float:
    config = validate(apply_overrides(load_config("embedded"), [
        "data.name=synthetic", f"data.num_clients={clients}", f"cohort_size={clients}",
        "data.min_examples=8", "client.local_steps=2", "client.batch_size=8", "algorithm=fedavg",
        f"placement.backend={backend}",
    ]))
    b = build(config)
    server, cl, engine = b["server"], b["clients"], b["engine"]
    phase = b["algorithm"].phase(0)
    times = []
    for t in range(rounds + 1):
        cohort = sample_cohort(config.seed, t, clients, clients)
        start = time.perf_counter()
        server, cl, m = engine.run_round(server, cl, t, phase, cohort)
        jax.block_until_ready((server, cl, m))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    vm = seconds_per_round("vmap", a.clients, a.rounds)
    sq = seconds_per_round("sequential", a.clients, a.rounds)
    print("| clients | vmap s/round | sequential s/round | sequential / vmap |\n|---|---|---|---|")
    print(f"| {a.clients} | {vm:.3f} | {sq:.3f} | {sq / vm:.2f}x |")


if __name__ == "__main__":
    main()
