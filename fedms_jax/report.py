"""``fedms-jax report WORKDIR``: a run's metrics as a markdown summary and PNG plots.

Writes into ``WORKDIR/report/`` (or ``--out``): ``summary.md`` (final and best accuracies,
rounds per stage and SAL level, bytes communicated, time), ``accuracy.png`` (personalised and
global accuracy vs round), ``loss.png`` (training and test loss), ``bytes.png`` (cumulative MB
up and down), ``active_blocks.png`` (SAL level and stage), and with ``--tensorboard`` TensorBoard
event files (``tensorboardX``, no TensorFlow needed) with every numeric metric per round.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedms_jax.storage import read_jsonl


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    if not Path(workdir).is_dir():
        raise FileNotFoundError(f"work dir {str(workdir)!r} does not exist")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {str(workdir)!r} a fedms-jax run's work dir?")
    lines = read_jsonl(path)  # a torn last line (kill -9, power loss) is dropped with a warning
    if not lines:
        raise ValueError(f"{path} is empty: the run has not finished a round yet")
    return lines


def _series(lines: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(l["round"] + 1, l[key]) for l in lines if l.get(key) is not None]
    return (np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts], np.float64)) if pts else (np.zeros(0), np.zeros(0))


def summary(lines: list[dict]) -> str:
    last = lines[-1]
    rows = ["| metric | value |", "|---|---|"]

    def add(name: str, value: Any, spec: str = ".4f") -> None:
        rows.append(f"| {name} | {format(value, spec) if isinstance(value, float) else value} |")

    add("rounds", len(lines))
    for key, name in [("personalized_accuracy", "personalised accuracy"), ("personalized_p10", "personalised accuracy, 10th percentile"),
                      ("personalized_min", "personalised accuracy, worst client"), ("accuracy", "global accuracy"),
                      ("test_loss", "global test loss"), ("gate_local_weight", "gate weight on the local expert")]:
        rounds, values = _series(lines, key)
        if len(values):
            add(f"final {name}", float(values[-1]))
            if key.endswith("accuracy"):
                add(f"best {name} (round)", f"{values.max():.4f} ({int(rounds[values.argmax()])})")
    if "loss" in last:  # (under DP it is computed from raw client data: not in metrics.jsonl)
        add("final training loss", float(last["loss"]))
    up = sum(l["bytes_up"] for l in lines) / 1e6
    down = sum(l["bytes_down"] for l in lines) / 1e6
    add("MB uploaded / downloaded (all clients)", f"{up:.2f} / {down:.2f}")
    excluded = sum(l.get("excluded_clients", 0) for l in lines)
    add("client updates excluded (non-finite or empty)", int(excluded))
    seconds = [l["seconds"] for l in lines]
    add("seconds, total / median per round", f"{sum(seconds):.1f} / {np.median(seconds):.3f}")
    stages: dict[tuple, int] = {}
    for l in lines:
        key = (l.get("stage", 1), l["active_blocks"])
        stages[key] = stages.get(key, 0) + 1
    add("rounds per (stage, active blocks)", ", ".join(f"{s}/{k}: {n}" for (s, k), n in stages.items()))
    return "\n".join(rows)


def plots(lines: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, series: list[tuple[str, np.ndarray, np.ndarray]], ylabel: str, step: bool = False) -> str | None:
        series = [s for s in series if len(s[1])]
        if not series:
            return None
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, x, y in series:
            (ax.step if step else ax.plot)(x, y, label=label, **({"where": "post"} if step else {}))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    rounds = np.asarray([l["round"] + 1 for l in lines])
    cum = lambda key: np.cumsum([l[key] for l in lines]) / 1e6
    made = [
        figure("accuracy.png", [("personalised", *_series(lines, "personalized_accuracy")),
                                ("global", *_series(lines, "accuracy"))], "accuracy"),
        figure("loss.png", [("training", *_series(lines, "loss")), ("global test", *_series(lines, "test_loss")),
                            ("personalised test", *_series(lines, "personalized_loss"))], "loss"),
        figure("bytes.png", [("up", rounds, cum("bytes_up")), ("down", rounds, cum("bytes_down"))],
               "MB communicated (cumulative, all clients)"),
        figure("active_blocks.png", [("active blocks k", *_series(lines, "active_blocks")),
                                     ("stage", *_series(lines, "stage"))], "k / stage", step=True),
    ]
    return [m for m in made if m]


def write_tensorboard(lines: list[dict], out: Path) -> Path:
    """Every numeric metric as a scalar per round (step = round + 1)."""
    from tensorboardX import SummaryWriter

    directory = out / "tensorboard"
    with SummaryWriter(str(directory)) as writer:
        for l in lines:
            for key, value in l.items():
                if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, global_step=l["round"] + 1)
    return directory


def write_report(workdir: str | Path, out: str | Path | None = None, *, tensorboard: bool = False) -> Path:
    """Writes the report of the run in ``workdir``; returns the report directory."""
    lines = read_metrics(workdir)
    out = Path(out) if out else Path(workdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plots(lines, out)
    md = [f"# Run report: {Path(workdir).absolute()}", "", summary(lines), ""]
    md += [f"![{name}]({name})" for name in images]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    if tensorboard:
        write_tensorboard(lines, out)
    return out
