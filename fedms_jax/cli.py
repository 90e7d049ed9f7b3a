"""``fedms-jax`` command line: ``fedms-jax run [--config FILE_OR_NAME] [--workdir DIR] [--config.KEY=VALUE ...]``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedms_jax.config import ConfigError, apply_overrides, load_config, validate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedms-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job (default: the embedded offline config)")
    r.add_argument("--config", default="embedded", help="built-in config name or a .py file with get_config()")
    r.add_argument("--workdir", default="runs/default", help="where metrics.jsonl is written")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = _parser().parse_args(rest)
    try:
        config = validate(apply_overrides(load_config(args.config), overrides))
    except ConfigError as e:
        print(f"fedms-jax: error: {e}", file=sys.stderr)
        return 2
    from fedms_jax.run import run  # imports jax; only after the config is known to be valid

    final = run(config, args.workdir, progress=not args.no_progress)["metrics"]
    print(
        "done: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
        + f"; metrics in {args.workdir}/metrics.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
