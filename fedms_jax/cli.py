"""The fedms-jax command line.

    fedms-jax run [--config FILE_OR_NAME] [--workdir DIR] [--multihost] [--config.KEY=VALUE ...]
    fedms-jax report WORKDIR [--out DIR] [--tensorboard]
    fedms-jax plan [--config FILE_OR_NAME] [--layouts 8x1:replicated,2x4:fsdp,...] [--config.KEY=VALUE ...]
    fedms-jax plan --topology v5e:16x16 [--strategy fsdp,tensor] [--cohorts search] [--json PATH] [...]

Exit status: 0 done; 2 bad config or a work dir that cannot be resumed with it; 1 bad input
(missing dataset, checkpoint or hub access, malformed or oversized data, a work dir that cannot
be written, a full disk, not enough memory, a diverged run, another process of a multi-process
job lost); 128 + signal number when stopped by SIGTERM/SIGINT (after saving the round in flight,
or during start-up with nothing new saved; rerun the same command to resume). Every error is one line, ``fedms-jax: error: ...``, and a run that fails
to start leaves no work dir behind.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from typing import Sequence

import ml_collections

from fedms_jax.config import ConfigError, apply_overrides, load_config, validate
from fedms_jax.data.dataset import DataError

_FORMAT = argparse.RawDescriptionHelpFormatter  # keep the docstrings' line breaks
_OVERRIDES = """\
config overrides (run, plan):
  --config.KEY=VALUE    set a key of the config, dotted and typed like it (one argument, no
                        space), e.g. --config.rounds=3 --config.data.num_clients=50
                        --config.lora.targets=q,v; repeatable"""
_RUN = """\
Runs a job: partitions the data over the clients, trains config.rounds rounds and writes
WORKDIR/metrics.jsonl, WORKDIR/timing.json and checkpoints in WORKDIR/checkpoints; resumes from
the newest checkpoint there (the config must match it)."""
_PLAN = """\
Builds the job and compiles one round program per sharding layout; prints the bytes per device
of each. Runs nothing."""
_REPORT = """\
Writes WORKDIR/report/summary.md and PNG plots of a run's metrics (WORKDIR/metrics.jsonl)."""
# OSErrors that are the machine's state, not a bug, even without a file name.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedms-jax", description=__doc__, formatter_class=_FORMAT)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job (default: the embedded offline config)", description=_RUN,
                       epilog=_OVERRIDES, formatter_class=_FORMAT)
    r.add_argument("--config", default="embedded", help="built-in config name or a .py file with get_config()")
    r.add_argument("--workdir", default="runs/default", help="where metrics.jsonl is written")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set)")
    rep = sub.add_parser("report", help="markdown summary and PNG plots of a run's metrics", description=_REPORT,
                         formatter_class=_FORMAT)
    rep.add_argument("workdir")
    rep.add_argument("--out", default=None, help="where to write (default: WORKDIR/report)")
    rep.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    pl = sub.add_parser("plan", help="bytes per device of each sharding layout (compiles, runs nothing)",
                        description=_PLAN, epilog=_OVERRIDES, formatter_class=_FORMAT)
    pl.add_argument("--config", default="embedded", help="built-in config name or a .py file with get_config()")
    pl.add_argument("--layouts", default="",
                    help="comma-separated CLIENTSxMODEL:STRATEGY (default: every layout of the devices, or of "
                         "--topology: replicated, then fsdp and tensor with 2, 4, 8 chips on 'model')")
    pl.add_argument("--topology", default="",
                    help="compile every program of the run for a TPU topology instead, e.g. v5e:16x16, v4:2x2x2, "
                         "2xv5e:16x16 (needs the tpu extra: pip install -e '.[tpu]')")
    pl.add_argument("--strategy", default="",
                    help="with --topology and no --layouts: these strategies only (comma-separated)")
    pl.add_argument("--programs", choices=("all", "round"), default="all",
                    help="with --topology: every program of the run, or the last phase's round program only")
    pl.add_argument("--cohorts", default="",
                    help="with --topology: also compile that round program for these clients per round "
                         "(comma-separated), or 'search' for the largest that fits")
    pl.add_argument("--json", default="", help="with --topology: also write the result to this JSON file")
    pl.add_argument("--jobs", type=int, default=0,
                    help="with --topology: layouts compiled at once (threads; 0: one per CPU core)")
    return p


def _error(message: str, status: int) -> int:
    """Prints ``fedms-jax: error: MESSAGE`` as one line (a multi-line message is joined)."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"fedms-jax: error: {line}", file=sys.stderr)
    return status


def _user_os_error(e: OSError) -> bool:
    """Whether an OSError is the user's or the machine's doing (a path that is missing, not a
    directory, not writable; a full or read-only disk) rather than a bug. The messages of
    fedms_jax's own FileNotFoundErrors (hub, TFDS, checkpoints) carry no file name."""
    return isinstance(e, FileNotFoundError) or e.filename is not None or e.errno in _ENVIRONMENT_ERRNOS


def _os_message(e: OSError) -> str:
    if e.filename is None or type(e).__module__ != "builtins" or e.strerror is None:
        return str(e)  # fedms_jax's own message (or a subclass's)
    names = repr(os.fsdecode(e.filename)) + (f" -> {os.fsdecode(e.filename2)!r}" if e.filename2 else "")
    return f"{names}: {e.strerror}"


def _load(name: str) -> ml_collections.ConfigDict:
    """``load_config`` with the errors of a broken config file as ConfigErrors."""
    try:
        config = load_config(name)
    except SyntaxError as e:  # also IndentationError and undecodable source
        where = f"{e.filename!r} line {e.lineno}" if e.filename else repr(name)
        raise ConfigError(f"config file {where}: {type(e).__name__}: {e.msg}") from None
    except OSError as e:  # unreadable file, a directory named *.py, ...
        raise ConfigError(f"--config {name!r} cannot be read: {_os_message(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of --config {name!r} returned a {type(config).__name__}, "
                          "not an ml_collections.ConfigDict")
    return config


def _path_problem(path: str, what: str) -> str | None:
    """Why ``path`` cannot be (created and) written as a directory, or None. Creates nothing."""
    if os.path.lexists(path) and not os.path.exists(path):
        return f"{what} {path!r} is a broken symbolic link"
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{what} {path!r} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{what} {path!r} is not writable"
        return None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{what} {path!r} cannot be created: {parent!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{what} {path!r} cannot be created: {parent!r} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from fedms_jax.signals import Interrupted, SignalGuard

    try:
        # From the first line: a SIGTERM/SIGINT while jax is imported or the job starts up ends it
        # with 128 + signum and nothing written (``run`` installs its own, saving, handler).
        argv = list(sys.argv[1:] if argv is None else argv)
        with SignalGuard() as guard:
            if os.environ.get("JAX_COORDINATOR_ADDRESS") or "--multihost" in argv:
                guard.hold()  # until the processes are connected (``_main`` releases it)
            return _main(argv)
    except Interrupted as e:
        print(f"fedms-jax: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # (a SIGINT outside the main thread's handler)
        print("fedms-jax: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: list[str]) -> int:
    overrides, rest = [], []
    for i, a in enumerate(argv):
        if not a.startswith("--config."):
            rest.append(a)
            continue
        item = a[len("--config."):]
        if "=" not in item:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-"):
                return _error(f"{a} {nxt}: write {a}={nxt} (one argument, no space)", 2)
            return _error(f"{a} needs a value: write {a}=VALUE", 2)
        overrides.append(item)
    args = _parser().parse_args(rest)
    if args.command == "report":
        return _report(args, overrides)
    from fedms_jax.perf import configure_xla_cpu

    configure_xla_cpu()  # before any backend starts
    try:
        config = validate(apply_overrides(_load(args.config), overrides))
    except ConfigError as e:
        return _error(str(e), 2)
    if args.command == "plan":
        return _plan(args, config)
    problem = _path_problem(args.workdir, "--workdir")
    if problem:
        return _error(problem, 1)
    from fedms_jax import distributed

    try:
        distributed.maybe_initialize(force=args.multihost, timeout_s=config.multihost.timeout_s)
    except ValueError as e:  # incomplete JAX_* environment
        return _error(str(e), 2)
    from fedms_jax.run import Interrupted, Preempted, run  # imports jax; only after the config is valid

    from fedms_jax import signals

    try:
        with distributed.forward_startup_signals():
            if signals.active() is not None and signals.active().deferring:
                signals.active().release()  # a signal held while connecting: told to all, raised
            final = run(config, args.workdir, progress=not args.no_progress).metrics
    except (Preempted, Interrupted) as e:
        print(f"fedms-jax: {e}", file=sys.stderr)
        return 128 + e.signum
    except distributed.PeerLost as e:
        _error(f"{e}; rerun the job to resume from its last checkpoint", 1)
        # Leaving normally would wait in jax.distributed's shutdown barrier for the dead process
        # (until the heartbeat timeout, then abort): the job is over, stop now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except Exception as e:  # noqa: BLE001 - re-raised unless the user caused it
        return _user_error(e)
    print(
        "done: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
        + f"; metrics in {args.workdir}/metrics.jsonl"
    )
    return 0


def _user_error(e: Exception) -> int:
    """The exit status after printing the one-line error of ``e`` if a user caused it (bad
    config 2; bad input, checkpoint, hub access or file system 1); otherwise re-raises ``e``
    (a bug keeps its traceback)."""
    from fedms_jax.models.hf import CheckpointError, HubUnavailableError
    from fedms_jax.run import Diverged
    from fedms_jax.storage import MemoryLimitError, StorageError

    if isinstance(e, ConfigError):
        return _error(str(e), 2)
    if isinstance(e, (HubUnavailableError, CheckpointError, DataError, StorageError, MemoryLimitError, Diverged)):
        return _error(str(e), 1)
    if isinstance(e, OSError) and _user_os_error(e):
        return _error(_os_message(e), 1)
    raise e


def _report(args: argparse.Namespace, overrides: list[str]) -> int:
    from fedms_jax.report import write_report

    if overrides:
        return _error(f"report takes no --config.KEY=VALUE (got --config.{overrides[0]}); they apply to run and plan", 2)
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        return _error(f"work dir {args.workdir!r} is not a directory", 1)
    out = args.out or os.path.join(args.workdir, "report")
    # (once there is a run to report on: a missing metrics.jsonl is the first thing to say)
    ran = os.path.isfile(os.path.join(args.workdir, "metrics.jsonl"))
    problem = _path_problem(out, "--out" if args.out else "report dir") if ran else None
    if problem:
        return _error(problem, 1)
    try:
        path = write_report(args.workdir, args.out, tensorboard=args.tensorboard)
    except (FileNotFoundError, ValueError) as e:  # no such run; metrics.jsonl empty or not JSON
        return _error(str(e), 1)
    except OSError as e:
        if not _user_os_error(e):
            raise
        return _error(_os_message(e), 1)
    print(f"report written to {path}")
    return 0


def _plan(args: argparse.Namespace, config) -> int:
    if args.topology:
        return _plan_topology(args, config)
    import jax

    from fedms_jax import plan
    try:
        layouts = [plan.Layout.parse(t) for t in args.layouts.split(",") if t.strip()]
    except ValueError as e:
        return _error(str(e), 2)
    layouts = layouts or plan.default_layouts(len(jax.devices()))
    try:
        rows = plan.plan(config, layouts)
    except Exception as e:  # noqa: BLE001 - re-raised unless the user caused it
        return _user_error(e)
    print(f"{len(jax.devices())} {jax.devices()[0].platform} device(s); per device:")
    print(plan.table(rows))
    return 0


def _plan_topology(args: argparse.Namespace, config) -> int:
    """``plan --topology``: every check on the arguments before anything is built or compiled."""
    import json

    import jax
    from jax._src import xla_bridge

    from fedms_jax import tpu

    if not xla_bridge.backends_are_initialized() and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the host computes on its CPU; TPUs are only compiled for
    tpu.quiet_libtpu()

    from fedms_jax import plan, tpu_plan
    from fedms_jax.federated import sharding

    try:
        tpu.parse_name(args.topology)
        layouts = [plan.Layout.parse(t) for t in args.layouts.split(",") if t.strip()]
    except ValueError as e:
        return _error(str(e), 2)
    try:
        cohorts = [] if args.cohorts in ("", "search") else [int(c) for c in args.cohorts.split(",") if c.strip()]
    except ValueError:
        cohorts = [0]
    if args.jobs < 0:
        return _error(f"--jobs {args.jobs}: must be >= 0 (0: one per CPU core)", 2)
    if any(c < 1 for c in cohorts):
        return _error(f"--cohorts {args.cohorts!r}: write positive clients per round, comma-separated, or 'search'", 2)
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    bad = [s for s in strategies if s not in sharding.STRATEGIES]
    if bad:
        return _error(f"--strategy {bad[0]!r}: must be among {list(sharding.STRATEGIES)}", 2)
    json_problem = _path_problem(os.path.dirname(os.path.abspath(args.json)) or ".", "--json") if args.json else None
    if json_problem:
        return _error(json_problem, 1)
    try:
        topo = tpu.topology(args.topology)
        if not layouts:
            layouts = [lay for lay in tpu_plan.default_layouts(len(topo.devices))
                       if not strategies or lay.strategy in strategies]
        result = tpu_plan.plan_topology(config, args.topology, layouts, programs=args.programs, cohorts=cohorts,
                                        search=args.cohorts == "search", jobs=args.jobs,
                                        log=lambda line: print(line, file=sys.stderr, flush=True))
    except tpu.TopologyError as e:
        return _error(str(e), 2 if tpu.available() else 1)
    except Exception as e:  # noqa: BLE001 - re-raised unless the user caused it
        return _user_error(e)
    print(tpu_plan.table(result))
    if args.json:
        from fedms_jax.storage import atomic_file

        with atomic_file(args.json, "the plan") as f:
            f.write(json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
