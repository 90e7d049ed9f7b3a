"""Fault-injection campaign: kill -9, SIGTERM and full disks at seeded random moments.

    python experiments/faults.py --out experiments/results/faults [--seed 0] [--jobs 2] [--plan MODE:FAULT:N,...]

Each trial runs one small job through the CLI (``fedms-jax run``; 6 rounds of FedMS, a
checkpoint every 2 rounds, asynchronous saves, ``keep=2``) in a fresh work dir and injects one
fault at a moment drawn from ``(seed, trial)``, uniform over the first 90% of the uninterrupted
job's wall time, so faults land in start-up (build, compile, restore), in rounds, in
asynchronous saves and in the streamed client store's write-back:

* ``sigterm``: SIGTERM to the job (with two processes: to one of them, drawn);
* ``kill9``: SIGKILL to the job (two processes: to one; the other must end by itself);
* ``disk_full``: the work dir is a real tmpfs, filled to the last byte by a ballast file.

Modes: the device population and the streamed one in one process, the device population in two
processes (gloo, ``jax.distributed``). Then the ballast is removed and the same command is run
again. A trial passes when

1. the faulted job ended as promised: exit 0 (the fault came after the last save), 143 after
   saving or during start-up with nothing saved (SIGTERM; -15 when it came before the
   interpreter reached fedms_jax's first line), 1 with exactly one ``fedms-jax: error:`` line
   and no traceback (a full disk; the peer of a killed process), or -9 (killed). The peer of a
   killed process may instead be aborted by XLA's coordination service (-6, "Terminating
   process because the JAX distributed service detected fatal errors") when the service notices
   the loss before a collective or an agreement does: jaxlib's hook for that
   (``missed_heartbeat_callback``) fails with ``std::bad_cast`` when given a Python function,
   so no Python code can turn it into an error line. Such trials are counted in the table's
   "XLA aborts" column; they pass when nothing was lost and the rerun is bitwise;
2. no restorable step was lost: the newest checkpoint finalized on disk just before the fault
   is still restorable after it, or a newer one is (``lost`` counts the trials where not);
3. the rerun exits 0 and its final metrics line (all but ``seconds``) and its final server
   state are bitwise those of the uninterrupted job of the same mode.

Writes ``results.json`` (every trial) and ``RESULTS.md`` (the table by mode and fault).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = [
    "data.name=synthetic", "data.num_clients=8", "data.min_examples=8", "data.alpha=0.5",
    "cohort_size=8", "model.image_size=8", "model.patch_size=4", "model.hidden=32",
    "model.layers=2", "model.heads=4", "model.mlp_dim=64", "lora.rank=4",
    "client.batch_size=8", "client.optimizer=sgd", "client.lr=0.1", "sal.k0=1", "sal.every=1",
]
JOB = ["algorithm=fedms", "rounds=6", "stage1_rounds=3", "client.local_steps=20", "checkpoint.every=2",
       "checkpoint.keep=2", "checkpoint.asynchronous=true"]
MODES = {  # name -> (overrides, processes)
    "device-1p": (["population.mode=device"], 1),
    "streamed-1p": (["population.mode=streamed", "data.num_clients=16", "cohort_size=4"], 1),
    "device-2p": (["population.mode=device"], 2),
}
PLAN = [  # (mode, fault, trials) in the default campaign: 52 trials
    ("device-1p", "sigterm", 7), ("device-1p", "kill9", 7), ("device-1p", "disk_full", 4),
    ("streamed-1p", "sigterm", 7), ("streamed-1p", "kill9", 7), ("streamed-1p", "disk_full", 4),
    ("device-2p", "sigterm", 8), ("device-2p", "kill9", 8),
]


_XLA_ABORT = "JAX distributed service detected fatal errors"
XLA_ABORTED = "-6 (aborted by XLA's coordination service)"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: Path, mode: str) -> list[subprocess.Popen]:
    overrides, processes = MODES[mode]
    cmd = [sys.executable, "-m", "fedms_jax.cli", "run", "--workdir", str(workdir), "--no-progress",
           *[f"--config.{o}" for o in (*TINY, *JOB, *overrides)]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if processes == 1:
        return [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port, procs = _port(), []
    for i in range(processes):
        e = {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
             "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(cmd + ["--config.multihost.timeout_s=30"], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout: float = 600) -> tuple[list[int], list[str]]:
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=timeout)[1])
        except subprocess.TimeoutExpired:
            p.kill()
            errs.append(p.communicate()[1] + "\n<campaign: killed after the timeout>")
    return [p.returncode for p in procs], errs


def finalized(workdir: Path) -> list[int]:
    """Steps orbax finalized (it renames a step's temporary directory to its number when done)."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def server_state(workdir: Path, step: int) -> np.ndarray:
    """The server state of a checkpoint as one flat float64 vector (numpy, whatever wrote it)."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir.absolute() / "checkpoints" / str(step) / "state"
    ck = ocp.PyTreeCheckpointer()
    tree = ck.metadata(path).item_metadata.tree
    restored = ck.restore(path, restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree_util.tree_leaves(restored["server"])])


def last_line(workdir: Path) -> dict:
    from fedms_jax.storage import read_jsonl

    return {k: v for k, v in read_jsonl(workdir / "metrics.jsonl")[-1].items() if k != "seconds"}


def where(workdir: Path) -> str:
    """What the job was doing, as far as its work dir shows, when the fault came."""
    ck = workdir / "checkpoints"
    if ck.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in ck.iterdir()):
        return "asynchronous save"
    if not (workdir / "metrics.jsonl").exists():
        return "start-up"
    return "rounds"


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256m"):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Fills the file system of ``path`` to its last byte (a ballast file, blocks allocated)."""
    s = os.statvfs(path)
    with open(path / "ballast", "ab") as f, contextlib.suppress(OSError):
        os.posix_fallocate(f.fileno(), 0, s.f_bavail * s.f_frsize)
    with open(path / "ballast2", "ab") as f, contextlib.suppress(OSError):  # what the first left
        f.write(b"\0" * (1 << 20))


def reference(root: Path, mode: str) -> dict:
    work = root / f"reference-{mode}"
    shutil.rmtree(work, ignore_errors=True)
    for _ in range(2):  # the second with every program in the compilation cache, as the trials run
        shutil.rmtree(work, ignore_errors=True)
        began = time.perf_counter()
        codes, errs = _finish(_start(work, mode))
        if any(codes):
            raise SystemExit(f"the uninterrupted {mode} job failed: {codes}\n{errs[0][-3000:]}")
    return {"seconds": time.perf_counter() - began, "line": last_line(work), "state": server_state(work, 6)}


def outcome_ok(fault: str, codes: list[int], errs: list[str]) -> tuple[bool, str]:
    """Whether every process ended as the fault allows (see the module docstring)."""
    notes = []
    ok = True
    for code, err in zip(codes, errs):
        errors = [l for l in err.splitlines() if l.startswith("fedms-jax: error:")]
        if code == 0:
            notes.append("0")
        elif code == 128 + signal.SIGTERM and fault == "sigterm":
            ok &= "fedms-jax: caught SIGTERM" in err and "Traceback" not in err
            notes.append("143")
        elif code == -signal.SIGTERM and fault == "sigterm" and not err.strip():  # before Python ran fedms_jax
            notes.append("-15 (interpreter start-up)")
        elif code == -signal.SIGKILL and fault == "kill9":
            notes.append("-9")
        elif code == -signal.SIGABRT and fault == "kill9" and _XLA_ABORT in err:
            notes.append(XLA_ABORTED)  # the peer of a killed process: see the module docstring
        elif code == 1 and fault in ("disk_full", "kill9"):
            ok &= len(errors) == 1 and "Traceback" not in err
            notes.append("1: " + (errors[0][len("fedms-jax: error: "):][:120] if errors else "<no error line>"))
        else:
            ok = False
            notes.append(f"{code}: {err.strip().splitlines()[-1][:160] if err.strip() else ''}")
    return ok, " | ".join(notes)


def trial(root: Path, mode: str, fault: str, index: int, seed: int, ref: dict) -> dict:
    rng = np.random.default_rng([seed, index])
    at = float(rng.uniform(0.0, 0.9) * ref["seconds"])  # (the last tenth: the job is usually done)
    victim = int(rng.integers(0, MODES[mode][1]))
    base = Path(tempfile.mkdtemp(prefix=f"fault-{index}-", dir=root))
    record = {"trial": index, "mode": mode, "fault": fault, "at_s": round(at, 2), "victim": victim}
    with (tmpfs(base / "disk") if fault == "disk_full" else contextlib.nullcontext(base)) as disk:
        work = disk / "w"
        procs = _start(work, mode)
        deadline = time.perf_counter() + at
        while time.perf_counter() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        before = finalized(work)
        record["where"] = where(work) if all(p.poll() is None for p in procs) else "after the end"
        if all(p.poll() is None for p in procs):
            if fault == "sigterm":
                procs[victim].send_signal(signal.SIGTERM)
            elif fault == "kill9":
                procs[victim].kill()
            else:
                fill(disk)
        codes, errs = _finish(procs)
        record["faulted_exit"] = codes
        record["ended_as_promised"], record["ending"] = outcome_ok(fault, codes, errs)
        if not record["ended_as_promised"]:
            record["stderr_tail"] = [e[-1500:] for e in errs]
        # (the whole stderr was searched: XLA writes its message before a long stack trace)
        after = finalized(work)
        record["finalized_before"], record["finalized_after"] = before, after
        record["lost"] = bool(before) and max(after, default=-1) < max(before)
        for name in ("ballast", "ballast2"):
            with contextlib.suppress(FileNotFoundError):
                (disk / name).unlink()
        again_codes, again_errs = _finish(_start(work, mode))
        record["rerun_exit"] = again_codes
        bitwise = False
        if not any(again_codes):
            bitwise = last_line(work) == ref["line"] and np.array_equal(server_state(work, 6), ref["state"])
        else:
            record["rerun_error"] = again_errs[0].strip().splitlines()[-1][:300] if again_errs[0].strip() else ""
        record["bitwise"] = bitwise
        record["passed"] = record["ended_as_promised"] and not record["lost"] and bitwise
    shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(record), flush=True)
    return record


def table(records: list[dict], refs: dict, args) -> str:
    lines = [
        "# Fault-injection campaign",
        "",
        f"`python experiments/faults.py --out {args.out} --seed {args.seed} --jobs {args.jobs}`"
        + (f" `--plan {args.plan}`" if args.plan else ""),
        "",
        "One small FedMS job per trial (6 rounds, a checkpoint every 2, asynchronous saves, keep=2) "
        "through the CLI, one fault at a seeded random moment of the uninterrupted job's wall time, then the same "
        "command again. *Ended as promised*: exit 0, 143 after saving, -9, or 1 with exactly one error line and no "
        "traceback (or, for the peer of a killed process, an abort by XLA's coordination service: counted under "
        "*XLA aborts*, see `experiments/faults.py`). *Lost*: the newest step finalized before the fault is not restorable after it and no newer one "
        "is. *Bitwise*: the rerun's final metrics line (all but `seconds`) and final server state equal the "
        "uninterrupted job's. Reference wall times: "
        + ", ".join(f"{m} {r['seconds']:.1f} s" for m, r in refs.items()) + ".",
        "",
        "| mode | fault | trials | ended as promised | XLA aborts | steps lost | resumed bitwise | where the faults landed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for r in records:
        groups.setdefault((r["mode"], r["fault"]), []).append(r)
    for (mode, fault), rs in groups.items():
        places: dict = {}
        for r in rs:
            places[r["where"]] = places.get(r["where"], 0) + 1
        lines.append(f"| {mode} | {fault} | {len(rs)} | {sum(r['ended_as_promised'] for r in rs)} | "
                     f"{sum(XLA_ABORTED in r['ending'] for r in rs)} | {sum(r['lost'] for r in rs)} | "
                     f"{sum(r['bitwise'] for r in rs)} | "
                     + ", ".join(f"{k} {v}" for k, v in sorted(places.items())) + " |")
    n = len(records)
    lines += ["", f"**{n} trials: {sum(r['passed'] for r in records)} passed; restorable steps lost: "
                  f"{sum(r['lost'] for r in records)}; resumed bitwise: {sum(r['bitwise'] for r in records)}; peers aborted "
                  f"by XLA: {sum(XLA_ABORTED in r['ending'] for r in records)}.**"]
    failed = [r for r in records if not r["passed"]]
    if failed:
        lines += ["", "Trials that did not pass:", ""]
        lines += [f"- trial {r['trial']} ({r['mode']}, {r['fault']} at {r['at_s']} s, {r['where']}): exit "
                  f"{r['faulted_exit']} ({r['ending']}), rerun {r['rerun_exit']} {r.get('rerun_error', '')}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="trials run at once")
    p.add_argument("--plan", default="", help="MODE:FAULT:N,... instead of the default 52 trials")
    args = p.parse_args()
    plan = [(m, f, int(n)) for m, f, n in (x.split(":") for x in args.plan.split(","))] if args.plan else PLAN
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fedms_faults_"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "xla_cache"))  # shared by every job
    try:
        refs = {mode: reference(root, mode) for mode in dict.fromkeys(m for m, _, _ in plan)}
        jobs = [(mode, fault) for mode, fault, n in plan for _ in range(n)]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            records = list(pool.map(lambda a: trial(root, a[1][0], a[1][1], a[0], args.seed, refs[a[1][0]]),
                                    enumerate(jobs)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    text = table(records, refs, args)
    (out / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
