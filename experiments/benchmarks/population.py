"""Populations beyond device memory (``population.mode``): memory, speed and checkpoints against
the population's size, the streamed mode's cost per round, and a preempted 100,000-client run.

    python experiments/benchmarks/population.py --out experiments/benchmarks/results/population
    python experiments/benchmarks/population.py --out /tmp/pop --quick     # small sizes, a minute

Sections (each writes ``<out>/<section>.json`` as soon as it is done; ``RESULTS.md`` quotes them):

* ``overhead``: the embedded setting (FedMS on digits, 20 clients, 8 per round), the same rounds
  with every client on the device, streamed with one padded size (the device mode's: the same
  program, plus gathering, transferring and writing back the cohort) and streamed with the
  default buckets. Rounds at one fixed phase of each stage, the modes interleaved in blocks so
  the machine's drift hits all of them; medians of seconds per round (the loop's wall time: run,
  read the metrics, queue the write-back) and their ratios to the device mode.
* ``scale``: FedMS on the synthetic source (which grows with the population) at 1k / 10k / 100k
  clients, streamed, and device at 1k / 10k (100k would need the bytes shown): one fresh process
  per run (``run.run``, 6 rounds: 3 of stage 1, 3 of stage 2, a checkpoint every 2 rounds,
  evaluation after the last), its peak RSS (``ru_maxrss``), the most bytes of live device arrays
  after a round, build seconds, median seconds per round of each stage, and each checkpoint's
  seconds, client states and bytes (``timing.json``).
* ``sigterm``: the 100k streamed run again from the command line, SIGTERM after its round 3, then
  the same command to resume: exit 143, and every metric line, the server state and every client
  state bitwise equal to the uninterrupted ``scale`` run.
* ``dinov2``: a DINOv2-S/14-shaped model (``experiments/configs/fmnist_dinov2.py``: 12 blocks of
  384, LoRA rank 8 on q and v, adamw, 56 px; random weights, or ``--pretrained DIR``) over 10,000
  stateful FedMS clients of synthetic data: peak RSS, per-client state bytes, what the device
  mode would need, seconds per round.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"[{name}] {json.dumps(result)[:400]}", flush=True)


# --- overhead ------------------------------------------------------------------------------------
def overhead(rounds: int, block: int) -> dict:
    import jax

    from fedms_jax.config import resolve
    from fedms_jax.run import build

    variants = {"device": ["population.mode=device"],
                "streamed, one size": ["population.mode=streamed", "population.buckets=1"],
                "streamed": ["population.mode=streamed"]}
    # Many rounds at fixed phases (no eval, so nothing else is timed); the prefetch runs to the end.
    fixed = ["compile.ahead=false", "rounds=1000", "stage1_rounds=12"]
    exps = {name: build(resolve("embedded", o + fixed)) for name, o in variants.items()}
    config = next(iter(exps.values())).config
    last = config.rounds - 1  # stage 2 at the schedule's top level
    out = {"setting": "embedded (FedMS, digits, 20 clients, cohort 8)", "rounds_per_variant": rounds, "block": block,
           "padded_sizes": {n: list(e.sizes) or [int(e.engine.data.images.shape[1])] for n, e in exps.items()}}
    for stage_name, phase in (("stage 1", exps["device"].algorithm.phase(config.stage1_rounds - 1)),
                              ("stage 2", exps["device"].algorithm.phase(last))):
        states = {n: e.init_states() for n, e in exps.items()}
        times: dict[str, list[float]] = {n: [] for n in exps}
        t = 0

        def one(name, t):
            exp = exps[name]
            server, clients = states[name]
            began = time.perf_counter()
            if exp.streamed:
                server, metrics = clients.run_round(server, t, phase, exp.cohort(t))
                float(metrics["loss"])
                clients.finish_round()
            else:
                server, clients, metrics = exp.engine.run_round(server, clients, t, phase, exp.cohort(t))
                float(metrics["loss"])
            states[name] = (server, clients)
            return time.perf_counter() - began

        for name in exps:  # compile, and fill the prefetch pipeline
            for w in range(2):
                one(name, w)
        t = 2
        while min(len(v) for v in times.values()) < rounds:
            for name in exps:  # the same rounds (cohorts) for every variant, block by block
                for i in range(block):
                    times[name].append(one(name, t + i))
            t += block
        med = {n: float(np.median(v)) for n, v in times.items()}
        out[stage_name] = {"phase": [phase.stage, phase.num_active], "median_s": med,
                           "ratio_to_device": {n: med[n] / med["device"] for n in med},
                           "p25_p75_s": {n: [float(np.percentile(v, 25)), float(np.percentile(v, 75))] for n, v in times.items()}}
        for n, (_, clients) in states.items():
            if exps[n].streamed:
                clients.close()
        jax.clear_caches()
    return out


# --- one run in a fresh process (scale, dinov2) --------------------------------------------------
def worker(args) -> None:
    """Runs ``run.run`` on ``args.overrides`` in ``args.workdir`` and prints one JSON line."""
    import jax

    from fedms_jax.config import resolve
    from fedms_jax.run import Callback, run

    class DeviceBytes(Callback):
        """The most bytes of live device arrays seen after a round."""

        def __init__(self):
            self.peak = 0

        def on_round(self, end):
            self.peak = max(self.peak, sum(x.nbytes for x in jax.live_arrays()))

    config = resolve(args.config, args.overrides)
    began = time.perf_counter()
    device = DeviceBytes()
    result = run(config, args.workdir, progress=False, callbacks=[device])
    total = time.perf_counter() - began
    exp = result.experiment
    timing = json.loads((Path(args.workdir) / "timing.json").read_text())
    lines = [json.loads(l) for l in (Path(args.workdir) / "metrics.jsonl").read_text().splitlines()]
    per_stage = {}
    for stage in (1, 2):
        s = [l["seconds"] for l in lines if l["stage"] == stage][1:]  # the first waits for its compile
        per_stage[f"stage{stage}_s_per_round"] = float(np.median(s)) if s else None
    _, one = jax.eval_shape(lambda k: exp.algorithm.init(k, 1), jax.random.key(0))
    state_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(one)))
    inputs = exp.train_clients.inputs if exp.streamed else exp.engine.data.images
    out = {
        "mode": exp.mode, "clients": config.data.num_clients, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_gb": device.peak / 2**30, "build_s": timing["build_s"], "total_s": total, **per_stage,
        "state_bytes_per_client": state_bytes, "all_states_gb": state_bytes * config.data.num_clients / 2**30,
        "train_examples": int(len(exp.train)), "data_host_gb": inputs.nbytes / 2**30,
        "padded_sizes": list(exp.sizes), "checkpoints": timing["checkpoints"],
        "written_clients": int(len(result.clients.store.written_ids())) if exp.streamed else None,
        "evaluated_clients": result.metrics.get("personalized_clients"),
        "personalized_accuracy": result.metrics.get("personalized_accuracy"), "accuracy": result.metrics.get("accuracy"),
    }
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(config: str, overrides: list[str], workdir: Path, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--workdir", str(workdir), *overrides]
    began = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: {p.stderr[-2000:]}", "wall_s": time.perf_counter() - began}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - began}


def _fedms(n: int, mode: str) -> list[str]:
    return ["data.name=synthetic", f"data.num_clients={n}", "rounds=6", "stage1_rounds=3", f"population.mode={mode}",
            "checkpoint.every=2", "eval_every=6"]


def scale(out: Path, sizes: list[int], device_sizes: list[int], timeout: int) -> dict:
    result = {"runs": []}
    for mode, ns in (("streamed", sizes), ("device", device_sizes)):
        for n in ns:
            workdir = out / "runs" / f"{mode}_{n}"
            if workdir.exists():
                subprocess.run(["rm", "-rf", str(workdir)], check=True)
            r = _spawn("embedded", _fedms(n, mode), workdir, timeout)
            result["runs"].append({"mode": mode, "clients": n, **r})
            _write(out, "scale", result)
    return result


# --- sigterm -------------------------------------------------------------------------------------
def sigterm(out: Path, n: int, after_round: int, timeout: int) -> dict:
    """The ``scale`` run at n clients, streamed, preempted and resumed from the command line."""
    reference = out / "runs" / f"streamed_{n}"
    workdir = out / "runs" / f"sigterm_{n}"
    if workdir.exists():
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
    cmd = ["fedms-jax", "run", "--workdir", str(workdir), "--no-progress", *[f"--config.{o}" for o in _fedms(n, "streamed")]]
    metrics = workdir / "metrics.jsonl"
    began = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while p.poll() is None and time.perf_counter() - began < timeout:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_round + 1:
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    _, err = p.communicate(timeout=timeout)
    first = {"exit": p.returncode, "stderr_tail": err.strip().splitlines()[-1:] if err.strip() else [],
             "lines_before_resume": len(metrics.read_text().splitlines())}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    second = {"exit": r.returncode, "stdout_tail": r.stdout.strip().splitlines()[-1:]}
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in path.read_text().splitlines()]
    same_metrics = strip(metrics) == strip(reference / "metrics.jsonl")
    return {"clients": n, "signal_after_round": after_round, "first": first, "resume": second,
            "metrics_equal": same_metrics, **_same_states(reference, workdir)}


def _same_states(a: Path, b: Path) -> dict:
    """Whether the final server state (orbax) and every client state (the newest manifest's
    deltas) of two streamed work dirs are bitwise equal."""
    import jax
    import orbax.checkpoint as ocp

    from fedms_jax.federated.store import ClientCheckpoints

    step = max(int(p.name) for p in (a / "checkpoints").iterdir() if p.name.isdigit())
    load = lambda d: ocp.StandardCheckpointer().restore((d / "checkpoints" / str(step) / "state").absolute())
    sa, sb = load(a), load(b)
    server_equal = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                       zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb)))

    def clients(d: Path) -> dict:
        ck = ClientCheckpoints(d / "client_checkpoints")
        with np.load(ck.manifest_path(step)) as m:
            ids, steps = m["ids"], m["steps"]
        rows = {}
        for s in np.unique(steps):
            with np.load(ck.delta_path(int(s))) as z:
                keep = np.isin(z["ids"], ids[steps == s])
                for i, c in enumerate(z["ids"][keep]):
                    rows[int(c)] = [z[k][keep][i] for k in sorted(z.files) if k.startswith("leaf_")]
        return rows

    ca, cb = clients(a), clients(b)
    clients_equal = ca.keys() == cb.keys() and all(
        all(np.array_equal(x, y) for x, y in zip(ca[c], cb[c])) for c in ca)
    return {"step": step, "server_equal": bool(server_equal), "clients_written": len(ca), "clients_equal": bool(clients_equal)}


def dinov2(out: Path, n: int, pretrained: str, timeout: int) -> dict:
    overrides = ["data.name=synthetic", "data.train_examples=0", "data.test_examples=0", f"data.num_clients={n}",
                 "rounds=4", "stage1_rounds=2", "sal.every=2", "eval_every=4", "checkpoint.every=2"]
    if pretrained:
        overrides.append(f"model.pretrained={pretrained}")
    workdir = out / "runs" / f"dinov2_{n}"
    if workdir.exists():
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
    return {"config": "experiments/configs/fmnist_dinov2.py", "overrides": overrides,
            **_spawn(str(ROOT / "experiments/configs/fmnist_dinov2.py"), overrides, workdir, timeout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/benchmarks/results/population")
    ap.add_argument("--quick", action="store_true", help="small sizes (checks the script, not the targets)")
    ap.add_argument("--sections", default="overhead,scale,sigterm,dinov2")
    ap.add_argument("--pretrained", default="", help="dinov2: a DINOv2-S/14 checkpoint directory (default: random weights)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="embedded", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    from fedms_jax.perf import configure_xla_cpu

    configure_xla_cpu()  # as the command line does (the sigterm section compares a run with it)
    if args.worker:
        args.overrides = rest
        return worker(args)
    sections = args.sections.split(",")
    q = args.quick
    if "overhead" in sections:
        _write(args.out, "overhead", overhead(rounds=4 if q else 30, block=2 if q else 5))
    big = 2000 if q else 100_000
    if "scale" in sections:
        scale(args.out, [500, big] if q else [1000, 10_000, 100_000], [500] if q else [1000, 10_000], timeout=3000)
    if "sigterm" in sections:
        _write(args.out, "sigterm", sigterm(args.out, big, after_round=3, timeout=3000))
    if "dinov2" in sections:
        _write(args.out, "dinov2", dinov2(args.out, 300 if q else 10_000, args.pretrained, timeout=3000))


if __name__ == "__main__":
    main()
