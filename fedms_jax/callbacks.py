"""The run loop's side effects, as callbacks: metrics lines, a progress bar, checkpoints,
preemption, start-up timing. Each sees every finished round (``RoundEnd``)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from tqdm import tqdm

from fedms_jax import compiling, distributed, storage
from fedms_jax.checkpoint import Checkpointer
from fedms_jax.data.dataset import DataError
from fedms_jax.signals import SignalGuard
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
    raw: dict = dataclasses.field(default_factory=dict)  # DP: metrics from raw client data (not in record)

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

    def stopping(self, round: int) -> bool:
        """Asked after round ``round`` trained, before its evaluation: True skips the evaluation
        (the run is about to stop). Called every round, on every process."""
        return False


class MetricsWriter(Callback):
    """Appends one JSON line per round to ``path`` (process 0 only); on a resume, first drops the
    lines of rounds at or after the resumed round (written after that checkpoint) and a torn
    last line. ``sync()`` (called before each checkpoint) fsyncs the file, so the lines of every
    round a checkpoint holds survive a power loss. ``field``: which of the round's records
    (``RoundEnd.record``, or ``raw``: DP's metrics from raw client data); a record that is
    empty writes no line."""

    def __init__(self, path: Path, primary: bool = True, field: str = "record") -> None:
        self.path, self.primary, self.field, self.file = path, primary, field, None

    def on_start(self, exp, start):
        if self.primary:
            _keep_metrics_before(self.path, start)
            self.file = self.path.open("a")

    def on_round(self, end):
        record = getattr(end, self.field)
        if self.file is not None and record:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                self._failed(e)

    def sync(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
            except OSError as e:
                self._failed(e)

    def _failed(self, e: OSError):
        if storage.disk_problem(e):
            raise storage.storage_error(e, self.path, "a metrics line") from None
        raise e

    def on_end(self):
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError:  # (a line that could not be flushed was reported when written)
                pass


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
                stage=end.phase.stage, k=end.phase.num_active, loss=f"{r.get('loss', float('nan')):.3f}",
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
    population's ``orbax_state()`` with orbax, so a checkpoint orbax lists is complete.
    ``before_save``: called first (the metrics writers' ``sync``).

    Retention of the files beside orbax's goes by the steps finalized *on disk*, listed afresh
    (and those orbax still lists), never by orbax's in-memory list alone: after a failed
    asynchronous save that list drops the step before, which is still on disk and restorable."""

    def __init__(self, checkpointer: Checkpointer, meta, before_save=()) -> None:
        self.checkpointer, self.meta, self.rounds, self.saved = checkpointer, meta, 0, -1
        self.before_save = list(before_save)
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
            for sync in self.before_save:
                sync()
            written = end.clients.checkpoint(end.done)
            self._population = end.clients
            record = {"round": end.done, **({"client_states": written["clients"], "client_bytes": written["bytes"]}
                                            if written else {})}
            self.checkpointer.save(end.done, {"server": end.server, **end.clients.orbax_state()}, self.meta(end))
            # (orbax's save returns once the save before it is finalized: the disk lists it)
            end.clients.prune(self.kept(end.done))
            self.saves.append({**record, "seconds": time.perf_counter() - began})
            self.saved = end.done
        if wait:
            self.checkpointer.wait()

    def kept(self, *extra: int) -> list[int]:
        """Every step a restart may restore: finalized on disk, listed by orbax, or ``extra``
        (being written)."""
        return sorted({*self.checkpointer.restorable_steps(), *self.checkpointer.steps(), *extra})

    def on_round(self, end):
        if self.checkpointer.due(end.done) or end.done == self.rounds:
            self.save(end)

    def on_end(self):
        error = None
        try:
            self.checkpointer.wait()
        except BaseException as e:  # noqa: BLE001 - raised below, after the clean-up
            error = e
        if self._population is not None:  # every save is done or failed: the disk says what is restorable
            self._population.prune(self.checkpointer.restorable_steps())
        try:
            self.checkpointer.close()
        except BaseException:  # the same failure, again
            if error is None:
                raise
        if error is not None:
            raise error


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
    """Acts on a SIGTERM/SIGINT recorded by the run's ``signals.SignalGuard``: the round in
    flight is finished, saved (waiting for the save; its evaluation is skipped, ``stopping``)
    and ``Preempted`` is raised.

    In a job of several processes the decision is agreed after every round
    (``distributed.all_gather_ints``: one key-value exchange through the coordination service),
    so when only one process is signalled (one VM of a slice reclaimed) every process saves the
    same round, together (orbax's save is collective), and stops with the same signal number.
    """

    def __init__(self, checkpointing: Checkpointing, guard: SignalGuard) -> None:
        self.checkpointing, self.guard = checkpointing, guard
        self._agreed: dict[int, list[int]] = {}

    def _agree(self, t: int, when: str) -> list[int]:
        caught = self.guard.caught
        return distributed.all_gather_ints(f"preempt/{t}/{when}", caught[0] if caught else 0)

    def stopping(self, t: int) -> bool:
        self._agreed = {t: self._agree(t, "trained")}
        return any(self._agreed[t])

    def on_round(self, end):
        signums = self._agreed.get(end.round)
        if not signums or not any(signums):  # (a signal during the evaluation)
            signums = self._agree(end.round, "evaluated")
        signum = next((s for s in signums if s), 0)
        if signum:
            self.checkpointing.save(end, wait=True)
            caught = tuple(p for p, s in enumerate(signums) if s) if len(signums) > 1 else ()
            raise Preempted(signum, end.done, self.checkpointing.checkpointer.directory, caught)


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
        try:
            tmp.write_text(json.dumps(out, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk: timing is not worth failing a run for, nor a second message
            tmp.unlink(missing_ok=True)
            if not storage.disk_problem(e):
                raise


def _keep_metrics_before(path: Path, start: int) -> None:
    """Drops the metric lines of rounds >= start (written after the checkpoint we resume from)
    and a torn last line, by writing a new file and renaming it over the old one."""
    if not path.exists():
        return
    try:
        records = storage.read_jsonl(path)
    except ValueError as e:
        raise DataError(f"{e}: cannot resume its metrics; repair or remove the line") from None
    lines = [json.dumps(r) for r in records if r.get("round", -1) < start]
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(l + "\n" for l in lines))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and storage.disk_problem(e):
            raise storage.storage_error(e, path, "the metrics") from None
        raise
