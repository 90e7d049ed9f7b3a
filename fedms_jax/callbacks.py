"""The run loop's side effects, as callbacks: metrics lines, a progress bar, checkpoints,
preemption, start-up timing. Each sees every finished round (``RoundEnd``)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from tqdm import tqdm

from fedms_jax import compiling, distributed
from fedms_jax.checkpoint import Checkpointer
from fedms_jax.federated.types import ClientStates, Phase, ServerState

if TYPE_CHECKING:
    from fedms_jax.experiment import Experiment

PyTree = Any


@dataclasses.dataclass
class RoundEnd:
    """What callbacks see after round ``round`` (``done = round + 1`` rounds are finished)."""

    round: int
    phase: Phase
    record: dict
    server: ServerState
    clients: ClientStates

    @property
    def done(self) -> int:
        return self.round + 1


class Callback:
    """Hooks of ``run``'s loop; each is a no-op unless overridden. ``on_end`` always runs (in
    reverse order), also when a round or another callback raised. The states in a ``RoundEnd``
    are valid only during ``on_round``: the next round donates their buffers."""

    def on_start(self, exp: Experiment, start: int) -> None: ...

    def on_round(self, end: RoundEnd) -> None: ...

    def on_end(self) -> None: ...


class MetricsWriter(Callback):
    """Appends one JSON line per round to ``path`` (process 0 only); on a resume, first drops the
    lines of rounds at or after the resumed round (written after that checkpoint)."""

    def __init__(self, path: Path, primary: bool = True) -> None:
        self.path, self.primary, self.file = path, primary, None

    def on_start(self, exp, start):
        if self.primary:
            _keep_metrics_before(self.path, start)
            self.file = self.path.open("a")

    def on_round(self, end):
        if self.file is not None:
            self.file.write(json.dumps(end.record) + "\n")
            self.file.flush()

    def on_end(self):
        if self.file is not None:
            self.file.close()


class ProgressBar(Callback):
    """A tqdm bar over the rounds with the latest loss and accuracies."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.bar = enabled, None

    def on_start(self, exp, start):
        if self.enabled:
            rounds = exp.config.rounds
            self.bar = tqdm(total=rounds, initial=start, unit="round", dynamic_ncols=True)

    def on_round(self, end):
        if self.bar is not None:
            r = end.record
            self.bar.update(1)
            self.bar.set_postfix(
                stage=end.phase.stage, k=end.phase.num_active, loss=f"{r['loss']:.3f}",
                pacc=f"{r.get('personalized_accuracy', float('nan')):.3f}",
                acc=f"{r.get('accuracy', float('nan')):.3f}", s=f"{r['seconds']:.2f}",
            )

    def on_end(self):
        if self.bar is not None:
            self.bar.close()


class Checkpointing(Callback):
    """Saves the states every ``checkpoint.every`` rounds and after the last one. The clients
    are a population (``federated.population``): what it writes beside the orbax checkpoint
    (a streamed population's changed clients) is written first, then the server state and the
    population's ``orbax_state()`` with orbax, so a checkpoint orbax lists is complete."""

    def __init__(self, checkpointer: Checkpointer, meta) -> None:
        self.checkpointer, self.meta, self.rounds, self.saved = checkpointer, meta, 0, -1
        # per save: the round, the seconds the loop waited (orbax writes in the background when
        # asynchronous), and streamed, the client states written and their bytes
        self.saves: list[dict] = []
        self._population = None

    def on_start(self, exp, start):
        self.rounds = exp.config.rounds

    def save(self, end: RoundEnd, *, wait: bool = False) -> None:
        """Saves after ``end`` (once: a second call for the same round only waits, if asked)."""
        if end.done != self.saved:
            began = time.perf_counter()
            # (Asynchronous orbax lists a new step, and stops listing the ones it will delete,
            # before the new one is on disk: the steps that may still be restored are these.)
            kept = self.checkpointer.steps()
            written = end.clients.checkpoint(end.done)
            record = {"round": end.done, **({"client_states": written["clients"], "client_bytes": written["bytes"]}
                                            if written else {})}
            self.checkpointer.save(end.done, {"server": end.server, **end.clients.orbax_state()}, self.meta(end))
            end.clients.prune([*kept, end.done])  # files beside orbax's no step it may still restore needs
            self._population = end.clients
            self.saves.append({**record, "seconds": time.perf_counter() - began})
            self.saved = end.done
        if wait:
            self.checkpointer.wait()

    def on_round(self, end):
        if self.checkpointer.due(end.done) or end.done == self.rounds:
            self.save(end)

    def on_end(self):
        self.checkpointer.wait()
        if self._population is not None:  # every save is on disk: the older steps orbax dropped are gone
            self._population.prune(self.checkpointer.steps())
        self.checkpointer.close()


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; exit with ``128 + signum``."""

    def __init__(self, signum: int, rounds_done: int, directory: Path, processes: tuple[int, ...] = ()) -> None:
        self.signum, self.rounds_done, self.directory = signum, rounds_done, directory
        name = signal.Signals(signum).name
        where = f" (on process {', '.join(map(str, processes))})" if processes else ""
        super().__init__(
            f"caught {name}{where}: saved the state after round {rounds_done} to {directory}; "
            "rerun the same command to resume"
        )


class Preemption(Callback):
    """Records SIGTERM/SIGINT instead of dying; after the round in flight, saves a checkpoint
    (waiting for it) and raises ``Preempted``.

    In a job of several processes the decision is agreed after every round
    (``distributed.all_gather_ints``: one key-value exchange through the coordination service),
    so when only one process is signalled (one VM of a slice reclaimed) every process saves the
    same round, together (orbax's save is collective), and stops with the same signal number.
    """

    def __init__(self, checkpointing: Checkpointing, signums=(signal.SIGTERM, signal.SIGINT)) -> None:
        self.checkpointing, self.signums = checkpointing, signums
        self.caught: list[int] = []
        self._previous: dict = {}

    def on_start(self, exp, start):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, lambda signum, frame: self.caught.append(signum)) for s in self.signums}

    def on_round(self, end):
        signums = distributed.all_gather_ints(f"preempt/{end.round}", self.caught[0] if self.caught else 0)
        signum = next((s for s in signums if s), 0)
        if signum:
            self.checkpointing.save(end, wait=True)
            caught = tuple(p for p, s in enumerate(signums) if s) if len(signums) > 1 else ()
            raise Preempted(signum, end.done, self.checkpointing.checkpointer.directory, caught)

    def on_end(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StartupTiming(Callback):
    """Writes ``timing.json`` (process 0) at the end of a run: seconds to build, to the end of the
    first round, in all; XLA compilations and persistent-cache hits (``compiling.CompileLog``);
    and per program its lower and compile seconds, whether it was compiled ahead, and how long
    the rounds waited for it; each checkpoint save (``Checkpointing.saves``); the population's
    mode, padded sizes and evaluated clients."""

    def __init__(self, path: Path, primary: bool, began: float, built: float, log: compiling.CompileLog,
                 saves: list[dict] | None = None) -> None:
        self.path, self.primary, self.began, self.built, self.log = path, primary, began, built, log
        self.saves = saves if saves is not None else []
        self.exp: Experiment | None = None
        self.first_round: float | None = None
        self.rounds = 0

    def on_start(self, exp, start):
        self.exp = exp

    def on_round(self, end):
        if self.first_round is None:
            self.first_round = time.perf_counter() - self.began
        self.rounds += 1

    def on_end(self):
        if not self.primary or self.exp is None:
            return
        c = self.exp.config.compile
        out = {
            "build_s": self.built - self.began,
            "first_round_done_s": self.first_round,
            "total_s": time.perf_counter() - self.began,
            "rounds": self.rounds,
            **self.log.snapshot(),
            "ahead": c.ahead, "threads": self.exp.engine.executables.threads,
            "cache_dir": jax.config.jax_compilation_cache_dir,
            "programs": self.exp.engine.executables.report(),
            "checkpoints": self.saves,
            "population": {"mode": self.exp.mode, "clients": self.exp.config.data.num_clients,
                           "padded_sizes": list(self.exp.sizes),
                           "evaluated_clients": int(self.exp.client_test.counts.shape[0])},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, self.path)


def _keep_metrics_before(path: Path, start: int) -> None:
    """Drops the metric lines of rounds >= start (written after the checkpoint we resume from),
    by writing a new file and renaming it over the old one."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["round"] < start]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    os.replace(tmp, path)
