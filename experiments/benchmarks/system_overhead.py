"""What simulated time costs a round's wall time on the embedded setting (fedms_jax/system.py).

    python experiments/benchmarks/system_overhead.py [--rounds 24] [--out experiments/benchmarks/results/system_overhead.json]

Two engines of the embedded default run the same rounds, alternating round by round in one
process (so the machine's noise falls on both): one without a system model, one with lognormal
speeds, a deadline, 10% dropouts and ``sal.budget_mode=deadline`` (each round then takes every
client's depth and masks the blocks below it). Reported: the median wall seconds of a round of
each (compiles excluded: each phase's first round is left out), their ratio, the host's planning
time per round (``Timeline.plan``, made fresh), and the one-off start-up cost of the FLOP probes
(``accounting.level_costs``: two client compiles per stage).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import jax

    from fedms_jax import system
    from fedms_jax.config import resolve
    from fedms_jax.run import build

    rounds = [f"rounds={args.rounds}", f"stage1_rounds={args.rounds // 2}"]
    plain = build(resolve("embedded", rounds))
    timed = build(resolve("embedded", rounds + ["system.speed=lognormal", "system.speed_median=1e9", "system.deadline_s=1.5",
                                                "system.dropout=0.1", "sal.budget_mode=deadline"]))
    began = time.perf_counter()
    for phase in timed.algorithm.phases(args.rounds):
        timed.level_costs(phase)
    probes = time.perf_counter() - began
    fresh = system.Timeline(timed.system, timed.algorithm.phase, timed.level_costs,
                            deadline_depth=timed.engine.deadline_depth)
    began = time.perf_counter()
    for t in range(args.rounds):
        fresh.plan(t)
    planning = (time.perf_counter() - began) / args.rounds

    states = {"plain": plain.init_states(), "timed": timed.init_states()}
    seconds: dict[str, list[float]] = {"plain": [], "timed": []}
    seen: set = set()
    for t in range(args.rounds):
        phase = plain.algorithm.phase(t)
        for name, exp in (("plain", plain), ("timed", timed)):
            server, clients = states[name]
            start = time.perf_counter()
            inputs = exp.round_inputs(t)  # the host's plan is part of the round's cost
            server, clients, metrics = exp.engine.run_round(server, clients, t, phase, exp.cohort(t), **inputs)
            jax.block_until_ready(metrics)
            if (name, phase) in seen:
                seconds[name].append(time.perf_counter() - start)
            seen.add((name, phase))
            states[name] = (server, clients)
    plain_s, timed_s = float(np.median(seconds["plain"])), float(np.median(seconds["timed"]))
    out = {
        "rounds_timed": len(seconds["plain"]), "median_round_s_without": plain_s, "median_round_s_with": timed_s,
        "ratio": timed_s / plain_s, "planning_s_per_round": planning, "flop_probes_s_once": probes,
        "device": str(jax.devices()[0].platform),
    }
    print(json.dumps(out, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
