"""Every sharding layout on the same small workload: memory, seconds per round, collectives.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python experiments/sharding_compare.py [--rounds 4] [--layouts 8x1:replicated,...] [--config.K=V ...]

Workload (default): the embedded config with a 192-wide, 6-block ViT (6 heads, MLP 768) at
32x32, FedMS stage 2 at k = L, cohort 8 x 2 local steps x batch 8. For each layout it reports
the backbone bytes per device (placed arrays), XLA's memory analysis of the compiled round
(arguments, temporaries), the median seconds per round after compilation, the number of
collective ops in the compiled program, and the collectives a round runs (count and result bytes
of all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute ops, an op inside a
loop counted once per iteration: ``known_trip_count`` of each while loop). Every layout is
compiled first and the rounds are then timed round-robin, with each layout's seconds also given
relative to the first layout's (the median over rounds of the per-round ratio), so a shared
machine's changing load falls on all layouts alike.
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

from fedms_jax.config import resolve
from fedms_jax.federated import sharding
from fedms_jax.federated.rounds import sample_cohort
from fedms_jax.plan import Layout, default_layouts, one_chunk

WORKLOAD = ["model.hidden=192", "model.layers=6", "model.heads=6", "model.mlp_dim=768", "model.image_size=32",
            "model.patch_size=4", "client.local_steps=2", "client.batch_size=8", "cohort_size=8",
            "rounds=2", "stage1_rounds=0", "sal.mode=all", "lora.targets=q,v"]
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def _multiplicities(hlo: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The computations of compiled HLO text (name -> lines) and how many times a round runs each:
    the entry once, a while body ``known_trip_count`` times its caller, anything else called
    (fusions, calls, conditional branches: an upper bound) as often as its caller."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if m:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    runs = {entry: 1}
    order = [entry]
    for name in order:  # callers come before their callees
        for line in comps.get(name, []):
            callees = [(k, c) for k, c in re.findall(r"\b(body|condition|to_apply|calls)=%([\w.\-]+)", line)]
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            callees += [("branch", c) for c in re.findall(r"%([\w.\-]+)", branches.group(1))] if branches else []
            for kind, callee in callees:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line) if kind == "body" else None
                runs[callee] = runs.get(callee, 0) + runs[name] * (int(trips.group(1)) if trips else 1)
                if callee not in order:
                    order.append(callee)
    return comps, runs


def collectives(hlo: str) -> dict[str, tuple[int, int, int]]:
    """{op: (count in the program, count run per round, result bytes run per round)} from
    compiled HLO text: an op in a loop body counts once in the program and trip-count times per
    round."""
    comps, runs = _multiplicities(hlo)
    out = {op: [0, 0, 0] for op in COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if not m:
                continue
            nbytes = 0
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                nbytes += n * DTYPE_BYTES.get(dtype, 4)
            k = runs.get(name, 1)
            out[m.group(2)] = [out[m.group(2)][0] + 1, out[m.group(2)][1] + k, out[m.group(2)][2] + k * nbytes]
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--layouts", default="")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    from fedms_jax.run import build

    # Every layout runs the whole cohort as one vmapped chunk (``plan.one_chunk``).
    config = one_chunk(resolve("embedded", WORKLOAD + overrides))
    n = len(jax.devices())
    layouts = [Layout.parse(t) for t in args.layouts.split(",") if t] or default_layouts(n)
    exp = build(config, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    algorithm, base = exp.algorithm, exp.engine
    phase = algorithm.phase(0)
    host_states = jax.tree_util.tree_map(np.asarray, exp.init_states())  # rounds donate theirs
    print(f"{n} x {jax.devices()[0].device_kind}; workload: {' '.join(WORKLOAD + overrides)}; phase {phase}\n")
    # Every layout is compiled and warmed up first, then the rounds are timed round-robin (round t
    # of every layout, then round t + 1, ...), so load that comes and goes on a shared machine
    # falls on all layouts alike; the ratio column is the median over rounds of each round's
    # seconds over the first layout's same round.
    runs, rows = [], {}
    for layout in layouts:
        try:
            engine = base.with_layout(sharding.make_mesh(layout.clients, layout.model), layout.strategy)
        except ValueError as e:
            rows[layout] = f"| {layout} | not possible: {e} |"
            continue
        server, clients = engine.place(host_states)
        cohort = sample_cohort(config.seed, 0, config.data.num_clients, config.cohort_size)
        compiled = engine.lower_round(phase, server, clients, len(cohort)).compile()
        server, clients, _ = jax.block_until_ready(engine.run_round(server, clients, 0, phase, cohort))  # compiles
        runs.append({"layout": layout, "engine": engine, "states": (server, clients), "times": [],
                     "mem": compiled.memory_analysis(), "coll": collectives(compiled.as_text())})
    for t in range(1, args.rounds + 1):
        cohort = sample_cohort(config.seed, t, config.data.num_clients, config.cohort_size)
        for run in runs:
            start = time.perf_counter()
            server, clients, m = run["engine"].run_round(*run["states"], t, phase, cohort)
            jax.block_until_ready((server, clients, m))
            run["times"].append(time.perf_counter() - start)
            run["states"] = (server, clients)
    print("| layout | backbone MB/device | arguments MB | temporaries MB | s/round (median) | "
          f"s/round / {runs[0]['layout'] if runs else '-'} | collectives in program | "
          + " | ".join(f"{c} per round (n, MB)" for c in COLLECTIVES) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(COLLECTIVES))
    for run in runs:
        mem, coll = run["mem"], run["coll"]
        backbone = max(sharding.bytes_per_device(run["engine"].backbone).values()) / 2**20
        ratio = statistics.median(a / b for a, b in zip(run["times"], runs[0]["times"]))
        cells = " | ".join(f"{n}, {b_ / 2**20:.2f}" for _, n, b_ in coll.values())
        rows[run["layout"]] = (
            f"| {run['layout']} | {backbone:.2f} | {mem.argument_size_in_bytes / 2**20:.2f} | "
            f"{mem.temp_size_in_bytes / 2**20:.2f} | {statistics.median(run['times']):.3f} | {ratio:.2f} | "
            f"{sum(c[0] for c in coll.values())} | {cells} |")
    for layout in layouts:
        print(rows[layout], flush=True)


if __name__ == "__main__":
    main()
