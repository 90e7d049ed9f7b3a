"""The benchmark suite: every performance number of RESULTS.md, measured in one run.

    python experiments/benchmarks/suite.py --out DIR [--tiny] [--only w1,backends,compile,memory,fedms]

Writes ``DIR/results.json`` and ``DIR/results.md``. Sections (``--only`` picks some):

  w1        W1 (ViT 192 wide, 12 layers, 3 heads, MLP 768, 32x32, patch 4, LoRA r8 on q,v; 16
            clients x 5 local steps x batch 32, fp32): s/round and images/s at SAL k = 12, 6, 3, 1;
            achieved FLOP/s (XLA cost-analysis FLOPs / time) over the dense-matmul FLOP/s of a
            2048x2048 fp32 matmul measured in the same process; the k=1 time against the one
            the FLOP ratio to k=12 predicts.
  backends  W2 (W1's model, 2 local steps x batch 8, k = 12): vmap vs sequential backend at 16,
            64 and 256 clients, s/round and the ratio.
  compile   a 20-round FedAvg+SAL run on W2 (16 clients) with a growing schedule: XLA
            compilations counted by jax.monitoring, compile seconds, programs traced per k.
  memory    W2 rounds at cohorts of 1..64 clients, each in a fresh process: peak host RSS (CPU)
            or peak device bytes (GPU), and XLA's argument/temp sizes, against the backbone.
  fedms     FedMS stage-2 round vs stage-1 round at the same k on W1.
  startup   start-up costs (``startup.py``): the ViT-B/32-shaped workload in fp32 and bf16 (build
            seconds, per-phase trace and compile seconds, time to the first round, s/round on
            an accelerator) and the default job end to end, cold and warm compilation cache.

Timings are medians over ``--repeats`` rounds after one warm-up round (which compiles). The
suite uses the package's defaults (fedms_jax/perf.py): YNNPACK fusions off on CPU and cache-sized
client chunks; ``--config.placement.chunk_size=N`` overrides the chunk (any ``--config.KEY=VALUE``
goes to every workload). ``--tiny`` shrinks every size so the whole suite runs in about a minute
(the smoke test). Results hold for the machine they ran on only.

This file is the CLI and the sections; the workloads and their timing are in ``workload.py``,
the tables and result files in ``report.py``, the start-up section in ``startup.py``: sibling
modules, imported as such because running a script by its path puts its directory on
``sys.path`` (run it as ``python experiments/benchmarks/suite.py``, not with ``-m``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # before any JAX backend starts
    from fedms_jax.perf import configure_xla_cpu

    YNN_OFF = configure_xla_cpu()

import jax
import jax.numpy as jnp

# Siblings in this directory (on sys.path when this script is run by its path).
from report import machine, save_json, save_markdown
from workload import FULL, TINY, Sizes, chunk_size, make, matmul_flops, timed_rounds

from fedms_jax.federated import accounting
from fedms_jax.federated.rounds import sample_cohort
from fedms_jax.federated.types import Phase
from fedms_jax.models.lora import count_params


# --- sections ------------------------------------------------------------------------------
def bench_w1(s: Sizes, repeats: int, extra: list[str]) -> dict:
    peak_before = matmul_flops(s.matmul)
    w = make(s, s.w1_clients, s.w1_steps, s.w1_batch, *extra)
    engine = w.engine
    rows = []
    for k in s.w1_ks:
        phase = Phase(1, k)
        flops = accounting.client_flops(engine, w.server, w.clients, phase) * s.w1_clients
        r = timed_rounds(w, phase, repeats)
        images = s.w1_clients * s.w1_steps * s.w1_batch
        rows.append({"k": k, "flops_per_round": flops, "images_per_round": images, **r,
                     "images_per_second": images / r["median"], "flops_per_second": flops / r["median"]})
        print(f"  W1 k={k}: {r['median']:.3f} s/round", flush=True)
    peak_after = matmul_flops(s.matmul)
    peak = max(peak_before, peak_after)
    full, one = rows[0], rows[-1]
    for row in rows:
        row["utilisation"] = row["flops_per_second"] / peak
        row["predicted_seconds"] = full["median"] * row["flops_per_round"] / full["flops_per_round"]
        row["vs_prediction"] = row["median"] / row["predicted_seconds"] - 1.0
    return {
        "matmul_n": s.matmul, "matmul_flops_per_second": [peak_before, peak_after], "peak": peak,
        "chunk_size": chunk_size(engine), "rows": rows,
        "targets": {
            f"utilisation at k={full['k']} >= 0.70": full["utilisation"] >= 0.70,
            f"k={one['k']} within 15% of the FLOP-ratio prediction": abs(one["vs_prediction"]) <= 0.15,
        },
    }


def bench_backends(s: Sizes, repeats: int, extra: list[str]) -> dict:
    rows = []
    for m in s.backend_clients:
        row: dict[str, Any] = {"clients": m}
        for backend in ("vmap", "sequential"):
            w = make(s, m, s.w2_steps, s.w2_batch, f"placement.backend={backend}", *extra)
            r = timed_rounds(w, Phase(1, s.layers), repeats)
            row[backend] = r
            if backend == "vmap":
                row["chunk_size"] = chunk_size(w.engine)
            print(f"  W2 {m} clients {backend}: {r['median']:.3f} s/round", flush=True)
        row["ratio"] = row["sequential"]["median"] / row["vmap"]["median"]
        rows.append(row)
    at = 64 if 64 in s.backend_clients else s.backend_clients[-1]
    ratio = next(r["ratio"] for r in rows if r["clients"] == at)
    return {"rows": rows, "targets": {f"vmap >= 1.5x sequential at {at} clients": ratio >= 1.5}}


def bench_compile(s: Sizes, extra: list[str]) -> dict:
    """A growing-SAL run: k = 1, 2, ... every 2 rounds. Compilations are counted by JAX's own
    monitoring events (every XLA compile in the process while the loop runs)."""
    every = 2
    w = make(s, s.compile_clients, s.w2_steps, s.w2_batch, "sal.mode=progressive", "sal.k0=1", "sal.step=1",
             f"sal.every={every}", f"rounds={s.compile_rounds}", *extra)
    engine, algorithm = w.engine, w.exp.algorithm
    events: list[tuple[str, float]] = []
    listener = lambda name, secs, **kw: events.append((name, secs))
    jax.monitoring.register_event_duration_secs_listener(listener)
    server, clients = w.server, w.clients
    per_round, ks = [], []
    start_all = time.perf_counter()
    try:
        for t in range(s.compile_rounds):
            phase = algorithm.phase(t)
            cohort = sample_cohort(w.exp.config.seed, t, s.compile_clients, s.compile_clients)
            start = time.perf_counter()
            server, clients, metrics = engine.run_round(server, clients, t, phase, cohort)
            jax.block_until_ready((server, clients, metrics))
            per_round.append(time.perf_counter() - start)
            ks.append(phase.num_active)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    w.server, w.clients = server, clients
    total = time.perf_counter() - start_all
    compiles = [secs for name, secs in events if name.endswith("backend_compile_duration")]
    tracing = [secs for name, secs in events if name.endswith(("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration"))]
    distinct = len(set(ks))
    return {
        "rounds": s.compile_rounds, "ks": ks, "distinct_k": distinct, "xla_compilations": len(compiles),
        "round_programs_traced": engine.num_traces, "compile_seconds": sum(compiles),
        "trace_and_lower_seconds": sum(tracing), "total_seconds": total, "round_seconds": per_round,
        "targets": {"one compilation per distinct k": len(compiles) == distinct == engine.num_traces},
    }


def memory_point(s: Sizes, cohort: int, extra: list[str]) -> dict:
    """Run in a fresh process: build, 2 rounds of W2 at ``cohort`` clients, peak memory."""
    w = make(s, cohort, s.w2_steps, s.w2_batch, *extra)
    engine = w.engine
    phase = Phase(1, s.layers)
    rss_built = _rss_now()
    ids = jnp.arange(cohort, dtype=jnp.int32)
    compiled = engine.lower_round(phase, w.server, w.clients, cohort).compile()
    mem = compiled.memory_analysis()
    timed_rounds(w, phase, 0)  # compiles and runs once
    # The process's own peak (ru_maxrss) is set by XLA compiling, not by running; so RSS is
    # sampled every 2 ms while rounds run, after the compile.
    peak, stop = [_rss_now()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_now())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timed_rounds(w, phase, 1)
    stop.set()
    sampler.join()
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "cohort": cohort, "chunk_size": chunk_size(engine), "platform": device.platform,
        "peak_rss_bytes": peak[0], "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_build_bytes": rss_built,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "backbone_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.backbone))),
        "backbone_params": count_params(engine.backbone),
        "data_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.data))),
        "xla_argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    }


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(s: Sizes, argv_sizes: list[str], extra: list[str]) -> dict:
    rows = []
    for m in s.memory_cohorts:
        cmd = [sys.executable, __file__, "--_memory_point", str(m), *argv_sizes, *[f"--config.{e}" for e in extra]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"memory point {m} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  memory at {m} clients: peak RSS {rows[-1]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    key = "device_peak_bytes" if rows[0]["device_peak_bytes"] is not None else "peak_rss_bytes"
    lo, hi = rows[0], rows[-1]
    per_client = (hi[key] - lo[key]) / max(hi["cohort"] - lo["cohort"], 1)
    return {
        "measure": key, "rows": rows, "growth_bytes_per_client": per_client,
        "backbone_bytes": lo["backbone_bytes"],
        "targets": {"backbone held once (growth per client < backbone)": per_client < lo["backbone_bytes"]},
    }


def bench_fedms(s: Sizes, repeats: int, extra: list[str]) -> dict:
    w = make(s, s.w1_clients, s.w1_steps, s.w1_batch, "algorithm=fedms", "stage1_rounds=1", "rounds=2", *extra)
    engine = w.engine
    rows = []
    for k in s.fedms_ks:
        r1 = timed_rounds(w, Phase(1, k), repeats)
        r2 = timed_rounds(w, Phase(2, k), repeats)
        f1 = accounting.client_flops(engine, w.server, w.clients, Phase(1, k))
        f2 = accounting.client_flops(engine, w.server, w.clients, Phase(2, k))
        rows.append({"k": k, "stage1": r1, "stage2": r2, "ratio": r2["median"] / r1["median"],
                     "flop_ratio": f2 / f1})
        print(f"  FedMS k={k}: stage 1 {r1['median']:.3f} s, stage 2 {r2['median']:.3f} s", flush=True)
    return {"rows": rows, "targets": {f"stage 2 <= 1.4x stage 1 at k={r['k']}": r["ratio"] <= 1.4 for r in rows}}


def bench_startup(tiny: bool, extra: list[str]) -> dict:
    """Start-up costs (``startup.py``): the ViT-B/32-shaped workload (fp32, bf16) -- build
    seconds, per-phase lower and compile seconds, time to the first round, s/round -- and the
    whole default job, cold and warm compilation cache."""
    import startup

    accel = jax.devices()[0].platform != "cpu"
    model = startup.TINY_VIT if tiny else startup.VITB32
    ks = [2] if tiny else [12, 3]
    clients, steps, batch, rounds = (16, 5, 32, 6) if accel else (2, 1, 8, 1)
    out = {f"vitb32_{dtype}": startup.vitb32(model, dtype, clients, steps, batch, ks, rounds, extra)
           for dtype in ("float32", "bfloat16")}
    job = [f"--config.{o}" for o in extra]
    if tiny:  # one phase: three programs
        job += ["--config.algorithm=fedavg_sal", "--config.rounds=1", "--config.model.layers=2", "--config.sal.k0=1",
                "--config.data.num_clients=8", "--config.cohort_size=8"]
    out["default"] = startup.default_job(job, timeout=900, cache_key="compile.cache_dir", warm=not tiny)
    return out


SECTIONS = ("w1", "backends", "compile", "memory", "fedms", "startup")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/benchmarks/results/latest")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (default 3; tiny 1)")
    p.add_argument("--_memory_point", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    sizes = TINY if args.tiny else FULL
    if args._memory_point is not None:
        print(json.dumps(memory_point(sizes, args._memory_point, extra)))
        return
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {list(SECTIONS)}")
    repeats = args.repeats or (1 if args.tiny else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *argv]),
                               "sizes": dataclasses.asdict(sizes)}
    runners = {
        "w1": lambda: bench_w1(sizes, repeats, extra),
        "backends": lambda: bench_backends(sizes, repeats, extra),
        "compile": lambda: bench_compile(sizes, extra),
        "memory": lambda: bench_memory(sizes, ["--tiny"] if args.tiny else [], extra),
        "fedms": lambda: bench_fedms(sizes, repeats, extra),
        "startup": lambda: bench_startup(args.tiny, extra),
    }
    for name in only:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        results[name] = runners[name]()
        results[name]["section_seconds"] = time.perf_counter() - start
        save_json(out, results)  # after every section: a long run interrupted late keeps what it measured
    print(save_markdown(out, results))


if __name__ == "__main__":
    main()
