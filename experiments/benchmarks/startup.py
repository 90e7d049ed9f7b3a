"""Start-up costs: building a run, compiling its phase programs, time to the first round, and the
whole default job -- the costs that dominated a run on an accelerator (issue 15).

    python experiments/benchmarks/startup.py --out DIR [--tiny] [--only vitb32,default] [--dtype float32,bfloat16]

Sections:

  vitb32   the ViT-B/32-shaped workload (768 wide, 12 blocks, 12 heads, MLP 3072, 224 px, patch
           32; LoRA r8 on q, v; FedAvg + SAL; 16 clients x 5 steps x 32 on an accelerator, fewer
           on a CPU): seconds of ``run.build``; for each SAL level k, the round program's trace +
           lower seconds and XLA compile seconds (``jit(...).lower(...).compile()``, as each
           phase is compiled); seconds from the start of ``build`` to the first round's metrics
           on the host; and (``--rounds`` > 1) the median s/round after it.
  default  the default job, ``fedms-jax run`` on the embedded config, as a fresh process, twice
           with one persistent compilation cache (cold, then warm): wall seconds, and the
           compilations it counts (``timing.json`` of the run, when the package writes one).

Results go to ``DIR/startup.json`` after every step (a killed run keeps what it measured). The
script only uses APIs that existed before the start-up work, so it measures the code it runs
with (``PYTHONPATH`` picks the checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before any JAX backend starts
    from fedms_jax.perf import configure_xla_cpu

    configure_xla_cpu()

import jax
import jax.numpy as jnp

VITB32 = ["model.image_size=224", "model.patch_size=32", "model.hidden=768", "model.layers=12", "model.heads=12",
          "model.mlp_dim=3072"]
TINY_VIT = ["model.image_size=32", "model.patch_size=8", "model.hidden=64", "model.layers=4", "model.heads=2",
            "model.mlp_dim=128"]


def _save(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "startup.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "startup.json")


def vitb32(model: list[str], dtype: str, clients: int, steps: int, batch: int, ks: list[int], rounds: int,
           extra: list[str]) -> dict:
    """Build, per-k lower + compile, first round and s/round of FedAvg + SAL on the given shape."""
    from fedms_jax.config import apply_overrides, load_config, validate
    from fedms_jax.data.sources import load_synthetic
    from fedms_jax.federated.rounds import FULL_DEPTH, sample_cohort
    from fedms_jax.federated.types import Phase
    from fedms_jax.run import build

    size = int(next(o.split("=")[1] for o in model if o.startswith("model.image_size=")))
    config = validate(apply_overrides(load_config("embedded"), model + [
        f"model.dtype={dtype}", "lora.rank=8", "lora.targets=q,v", "data.partition=iid", "data.name=synthetic",
        f"data.num_clients={clients}", f"cohort_size={clients}", f"client.local_steps={steps}",
        f"client.batch_size={batch}", f"data.min_examples={min(batch, 16)}", "algorithm=fedavg_sal",
        "sal.mode=fixed", f"sal.k0={ks[0]}", "client.optimizer=sgd", "client.lr=0.01", "checkpoint.every=0",
        *extra,
    ]))
    data = load_synthetic(num_train=clients * batch, num_test=64, image_size=size, seed=0)
    t0 = time.perf_counter()
    exp = build(config, datasets=data)
    server, clients_state = exp.init_states()
    jax.block_until_ready((server, clients_state))
    build_s = time.perf_counter() - t0
    engine = exp.engine
    cohort = sample_cohort(config.seed, 0, clients, clients)
    ids, t = jnp.asarray(cohort, jnp.int32), jnp.asarray(0, jnp.int32)
    depth = jnp.full(len(cohort), FULL_DEPTH, jnp.int32)  # every client trains the whole level
    per_k = []
    for n, k in enumerate(ks):
        phase = Phase(1, k)
        s = time.perf_counter()
        lowered = engine.lower_round(phase, server, clients_state, len(cohort))
        lower_s = time.perf_counter() - s
        s = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - s
        row = {"k": k, "lower_s": lower_s, "compile_s": compile_s}
        if n == 0:  # the first round (its program compiled just above, as a run compiles it)
            server, clients_state, metrics = compiled(server, clients_state, t, ids, depth, engine.backbone, engine.data)
            float(metrics["loss"])
            row["first_round_s"] = time.perf_counter() - s - compile_s
            row["build_to_first_round_s"] = time.perf_counter() - t0
            times = []
            for r in range(1, rounds):
                s = time.perf_counter()
                tr = jnp.asarray(r, jnp.int32)
                server, clients_state, metrics = compiled(server, clients_state, tr, ids, depth, engine.backbone, engine.data)
                float(metrics["loss"])
                times.append(time.perf_counter() - s)
            if times:
                row["s_per_round"] = statistics.median(times)
                row["images_per_s"] = clients * steps * batch / row["s_per_round"]
        per_k.append(row)
        print(f"  k={k}: lower {lower_s:.2f} s, compile {compile_s:.2f} s"
              + (f", s/round {row['s_per_round']:.3f}" if "s_per_round" in row else ""), flush=True)
    return {"dtype": dtype, "clients": clients, "steps": steps, "batch": batch, "build_s": build_s,
            "platform": jax.devices()[0].platform, "per_k": per_k}


def default_job(extra: list[str], timeout: float, cache_key: str, warm: bool = True) -> dict:
    """``fedms-jax run`` on the embedded config, cold then (``warm``) warm, with one fresh
    compilation cache (set by the config override ``cache_key``; empty: the code has no cache,
    run it once)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        cache = [f"--config.{cache_key}={Path(tmp) / 'cache'}"] if cache_key else []
        for name in (("cold", "warm") if warm else ("cold",)) if cache_key else ("no cache",):
            workdir = Path(tmp) / name.replace(" ", "_")
            cmd = [sys.executable, "-m", "fedms_jax.cli", "run", "--workdir", str(workdir), "--no-progress", *cache, *extra]
            s = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            wall = time.perf_counter() - s
            row = {"wall_s": wall, "returncode": proc.returncode}
            if proc.returncode:
                row["stderr"] = proc.stderr[-2000:]
            timing = workdir / "timing.json"
            if timing.exists():
                row["timing"] = json.loads(timing.read_text())
            lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
            if lines:
                last = json.loads(lines[-1])
                row["personalized_accuracy"] = last.get("personalized_accuracy")
                row["rounds_seconds"] = sum(json.loads(l)["seconds"] for l in lines)
            out[name] = row
            print(f"  default job ({name} cache): {wall:.1f} s wall", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/benchmarks/results/startup")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--only", default="vitb32,default")
    p.add_argument("--dtype", default="float32", help="comma-separated compute dtypes of the vitb32 section")
    p.add_argument("--clients", type=int, default=None, help="vitb32 cohort (default: 16 on GPU/TPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="vitb32 local steps (default: 5 on GPU/TPU, 1 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="vitb32 batch (default: 32 on GPU/TPU, 8 on CPU)")
    p.add_argument("--ks", default="12,3")
    p.add_argument("--rounds", type=int, default=None, help="vitb32 rounds at the first k (default: 6 on GPU/TPU, 1 on CPU)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per default-job process")
    p.add_argument("--config-extra", default="", help="comma-separated KEY=VALUE overrides for every section")
    p.add_argument("--cache-key", default="compile.cache_dir",
                   help="config key of the compilation cache directory ('': the code has none)")
    args = p.parse_args(argv)
    accel = jax.devices()[0].platform != "cpu"
    extra = [o for o in args.config_extra.split(",") if o]
    results = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "argv": sys.argv[1:]}
    out = Path(args.out)
    only = args.only.split(",")
    if "vitb32" in only:
        model = TINY_VIT if args.tiny else VITB32
        ks = [int(k) for k in args.ks.split(",")] if not args.tiny else [4, 2]
        for dtype in args.dtype.split(","):
            print(f"vitb32 {dtype}", flush=True)
            results[f"vitb32_{dtype}"] = vitb32(
                model, dtype, args.clients or (16 if accel else 2), args.steps or (5 if accel else 1),
                args.batch or (32 if accel else 8), ks, args.rounds or (6 if accel else 1), extra)
            _save(out, results)
    if "default" in only:
        print("default job", flush=True)
        job_extra = [f"--config.{o}" for o in extra] + (["--config.rounds=4", "--config.stage1_rounds=2"] if args.tiny else [])
        results["default"] = default_job(job_extra, args.timeout, args.cache_key)
        _save(out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
