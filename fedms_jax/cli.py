"""``fedms-jax`` command line.

    fedms-jax run [--config FILE_OR_NAME] [--workdir DIR] [--multihost] [--config.KEY=VALUE ...]
    fedms-jax report WORKDIR [--out DIR] [--tensorboard]
    fedms-jax plan [--config FILE_OR_NAME] [--layouts 8x1:replicated,2x4:fsdp,...] [--config.KEY=VALUE ...]

Exit status: 0 done; 2 bad config or a work dir that cannot be resumed with it; 1 bad input
(missing dataset, checkpoint or hub access, malformed data); 128 + signal number when stopped by
SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedms_jax.config import ConfigError, apply_overrides, load_config, validate
from fedms_jax.data.sources import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedms-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job (default: the embedded offline config)")
    r.add_argument("--config", default="embedded", help="built-in config name or a .py file with get_config()")
    r.add_argument("--workdir", default="runs/default", help="where metrics.jsonl is written")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set)")
    rep = sub.add_parser("report", help="markdown summary and PNG plots of a run's metrics")
    rep.add_argument("workdir")
    rep.add_argument("--out", default=None, help="where to write (default: WORKDIR/report)")
    rep.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    pl = sub.add_parser("plan", help="bytes per device of each sharding layout (compiles, runs nothing)")
    pl.add_argument("--config", default="embedded")
    pl.add_argument("--layouts", default="",
                    help="comma-separated CLIENTSxMODEL:STRATEGY (default: every layout of the devices)")
    return p


def _error(message: str, status: int) -> int:
    print(f"fedms-jax: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = _parser().parse_args(rest)
    if args.command != "report":
        from fedms_jax.perf import configure_xla_cpu

        configure_xla_cpu()  # before any backend starts
    if args.command == "report":
        from fedms_jax.report import write_report

        try:
            path = write_report(args.workdir, args.out, tensorboard=args.tensorboard)
        except (FileNotFoundError, ValueError) as e:
            return _error(str(e), 1)
        print(f"report written to {path}")
        return 0
    try:
        config = validate(apply_overrides(load_config(args.config), overrides))
    except ConfigError as e:
        return _error(str(e), 2)
    if args.command == "plan":
        import jax

        from fedms_jax import plan

        try:
            layouts = [plan.Layout.parse(t) for t in args.layouts.split(",") if t.strip()]
        except ValueError as e:
            return _error(str(e), 2)
        layouts = layouts or plan.default_layouts(len(jax.devices()))
        print(f"{len(jax.devices())} {jax.devices()[0].platform} device(s); per device:")
        print(plan.table(plan.plan(config, layouts)))
        return 0
    from fedms_jax import distributed

    distributed.maybe_initialize(force=args.multihost)
    from fedms_jax.models.hf import HubUnavailableError
    from fedms_jax.run import Preempted, run  # imports jax; only after the config is known to be valid

    try:
        final = run(config, args.workdir, progress=not args.no_progress).metrics
    except ConfigError as e:
        return _error(str(e), 2)
    except Preempted as e:
        print(f"fedms-jax: {e}", file=sys.stderr)
        return 128 + e.signum
    except (FileNotFoundError, HubUnavailableError, DataError) as e:
        return _error(str(e), 1)
    print(
        "done: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
        + f"; metrics in {args.workdir}/metrics.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
