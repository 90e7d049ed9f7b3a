"""Checkpoints with orbax: every N rounds, on preemption and at the end; exact resume.

A checkpoint (``WORKDIR/checkpoints/<rounds done>/``) holds

  * ``state``: the server state and every client's persistent state (local experts, gate heads,
    personalised heads, participation counts), written with orbax's ``StandardSave``
    (asynchronously when ``checkpoint.asynchronous``: the device-to-host copy blocks, the write
    does not);
  * ``meta`` (JSON): the number of rounds done, the phase (stage, SAL level) of the next round,
    the RNG recipe (every random draw comes from a named stream ``(seed, purpose, round, client,
    ...)``, ``fedms_jax.rng``, so the seed and the round are the whole RNG state), with DP the
    accountant's ledger (its parameters and the noisy rounds so far), the package and format
    versions, and the config.

orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-write leaves no half checkpoint behind. On resume the newest checkpoint whose config agrees
on every key that changes the results is restored; a changed ``placement.*`` is allowed with a
warning (the float sums change order); an unreadable one (corrupt files) is skipped with a
warning in favour of the one before. With several processes every such decision is agreed
(``distributed.agree_all``), so all restore the same round.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fedms_jax import distributed, storage
from fedms_jax.config import Config, ConfigError, validate

PyTree = Any
FORMAT = 2  # 2: named random streams (fedms_jax.rng); format-1 runs drew other numbers
# Keys that may change between a run and its resume without changing its results.
RESUMABLE_CHANGES = ("rounds", "eval_every", "eval_clients", "eval_batch", "placement.", "checkpoint.", "data.data_dir",
                     "data.feature_cache", "compile.", "multihost.", "population.mode", "population.eval_sample",
                     "population.prefetch", "guard.", "data.max_bytes", "dp.raw_metrics")  # population.mode: the resolved mode is checked (meta "population")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedms_jax")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_fingerprint(config: Config | ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as flat ``{'a.b': value}`` (JSON types). A ConfigDict is validated first, so
    its keys left out take their defaults, as in the run it describes."""
    return json.loads(json.dumps(_flatten(validate(config).to_dict())))


def config_changes(saved: dict[str, Any], config: Config | ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that matters and differs.

    A key the checkpoint lacks (added to the package after it was written) counts as unchanged
    when it holds its built-in default: that run behaved as the default does."""
    now = config_fingerprint(config)
    defaults = config_fingerprint(Config())
    keys = sorted(set(saved) | set(now))
    # dp.target_epsilon calibrates the noise for config.rounds rounds: other rounds, other noise.
    calibrated = now.get("dp.target_epsilon", 0) > 0
    matters = lambda k: (k == "rounds" and calibrated) or not any(
        k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)
    added_at_default = lambda k: k not in saved and k in defaults and now.get(k) == defaults[k]
    return [
        (k, saved.get(k, "<absent>"), now.get(k, "<absent>"))
        for k in keys if matters(k) and saved.get(k) != now.get(k) and not added_at_default(k)
    ]


def placement_changes(saved: dict[str, Any], config: Config | ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for each ``placement.*`` key that differs: allowed on resume (the
    same computation), but chunking and the sequential backend add the clients' contributions
    in another order, so the floats differ in their last bits."""
    now = config_fingerprint(config)
    return [(k, saved.get(k, "<absent>"), v) for k, v in sorted(now.items())
            if k.startswith("placement.") and k in saved and saved[k] != v]


class Checkpointer:
    """Saves and restores ``{'server': ServerState, 'clients': ClientStates}`` under a work dir.

    Args:
      directory: ``WORKDIR/checkpoints``.
      every: save after every ``every`` rounds (0 = only on preemption and at the end).
      keep: how many of the newest checkpoints to keep.
      asynchronous: let orbax write in the background.
    """

    def __init__(self, directory: str | Path, *, every: int, keep: int, asynchronous: bool = True) -> None:
        self.directory = Path(directory).absolute()
        self.every = every
        # cleanup_tmp_directories: the half-written steps of a run killed mid-save go at start.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True, cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        for logger in ("absl", "asyncio", "concurrent.futures"):  # orbax's background threads log them: we raise them, in one line
            storage.quiet_disk_errors(logger)

    def steps(self) -> list[int]:
        """The steps orbax's manager lists (in memory: after a failed save it may omit steps that
        are still on disk; ``restorable_steps`` lists the disk)."""
        return sorted(self.manager.all_steps())

    def restorable_steps(self) -> list[int]:
        """The finalized steps on disk now, listed afresh (what a restart could restore)."""
        if not self.directory.is_dir():
            return []
        return sorted(ocp.utils.checkpoint_steps(self.directory))

    def due(self, rounds_done: int) -> bool:
        return self.every > 0 and rounds_done % self.every == 0

    def save(self, rounds_done: int, state: PyTree, meta: dict, *, wait: bool = False) -> None:
        meta = {**meta, "rounds_done": rounds_done, "format": FORMAT, "fedms_jax": _version()}
        self._check_space(rounds_done, state)
        try:
            self.manager.save(
                rounds_done,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - a full disk is named; anything else re-raised
            self._raise_storage(e, f"the checkpoint of round {rounds_done}")
            raise
        if wait:
            self.wait()

    def wait(self) -> None:
        """Blocks until every save in flight is on disk; a save that failed for lack of space
        raises ``StorageError`` (naming the directory and the steps still restorable)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._raise_storage(e, "a checkpoint")
            raise

    def _step_bytes(self, step: int) -> int:
        return sum(f.stat().st_size for f in (self.directory / str(step)).rglob("*") if f.is_file())

    def _check_space(self, rounds_done: int, state: PyTree) -> None:
        """Refuses a save the disk has no room for, before orbax starts writing (a save that
        fails half-way leaves its background writes to fail one by one): it needs about what
        the newest step on disk took (+20%), or, for the first, the state's bytes."""
        kept = self.restorable_steps()
        if kept:
            needed = int(1.2 * self._step_bytes(kept[-1]))
        else:
            needed = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(state)) + (16 << 10)
        free = storage.free_bytes(self.directory)
        if free < needed:
            raise storage.StorageError(
                f"cannot write the checkpoint of round {rounds_done} to {self.directory}: the disk is full "
                f"({storage.human(free)} free; it needs about {storage.human(needed)}); restorable: "
                f"{'rounds ' + ', '.join(map(str, kept)) if kept else 'none'}")

    def _raise_storage(self, e: Exception, what: str) -> None:
        if storage.disk_problem(e):
            kept = self.restorable_steps()
            # what a checkpoint needs: about as much as the newest one on disk
            size = self._step_bytes(kept[-1]) if kept else None
            error = storage.storage_error(e, self.directory, what, size)
            raise storage.StorageError(f"{error}; restorable: {'rounds ' + ', '.join(map(str, kept)) if kept else 'none'}"
                                       ) from None

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, like: PyTree, config: Config, population: str = "device") -> tuple[int, PyTree, dict] | None:
        """The newest readable checkpoint as (rounds done, state, meta), or None if there is none.

        ``like``: states of the right structure, shapes, dtypes and shardings (a fresh init).
        ``population``: the run's resolved ``population.mode``; a checkpoint of the other mode
        (the server state alone with incremental client files, or every client's state) is
        refused with a ConfigError.
        Raises ConfigError if the newest readable checkpoint was written with a different config
        (naming the key) or by an incompatible format version.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        unreadable: list[int] = []

        def skip(step: int, e: Exception) -> None:
            warnings.warn(f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: {e}); "
                          "falling back to the one before", stacklevel=3)
            unreadable.append(step)

        steps = self.steps()
        newest = distributed.all_gather_ints("restore/newest", max(steps, default=-1))
        if len(set(newest)) > 1:
            raise ConfigError(f"the processes see different checkpoints in {self.directory} (newest per process: "
                              f"{newest}): the work dir must be one shared file system")
        for step in reversed(steps):
            # Every process decides the same (one unreadable copy anywhere skips the step
            # everywhere), else they would restore different rounds and their collectives deadlock.
            error = None
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
                error = e
            if not distributed.agree_all(f"restore/meta/{step}", error is None):
                skip(step, error or RuntimeError("unreadable on another process"))
                continue
            if meta.get("format") != FORMAT:
                raise ConfigError(
                    f"work dir {self.directory.parent} was written by fedms_jax {meta.get('fedms_jax')} "
                    f"(checkpoint format {meta.get('format')}); this is {_version()} (format {FORMAT}): "
                    "use a new --workdir"
                )
            changes = config_changes(meta["config"], config)
            if changes:
                key, was, now = changes[0]
                raise ConfigError(
                    f"config.{key} = {now!r} differs from the checkpoint in {self.directory} ({was!r}): "
                    "refusing to resume a different experiment; use a new --workdir or the old value"
                )
            saved_mode = meta.get("population", "device")
            if saved_mode != population:
                raise ConfigError(
                    f"config.population.mode = {config.population.mode!r} runs this population {population}, but the "
                    f"checkpoint in {self.directory} was written {saved_mode}: set population.mode={saved_mode} to resume")
            for key, was, now in placement_changes(meta["config"], config):
                warnings.warn(
                    f"config.{key} = {now!r} differs from the checkpoint's ({was!r}): resuming, but the clients' "
                    "float sums are taken in another order, so the results are no longer bitwise equal to "
                    "an uninterrupted run", stacklevel=2)
            error = None
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
            except Exception as e:  # noqa: BLE001
                error = e
            if not distributed.agree_all(f"restore/state/{step}", error is None):
                skip(step, error or RuntimeError("unreadable on another process"))
                continue
            self._set_aside(unreadable)
            return step, restored["state"], meta
        self._set_aside(unreadable)
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints to ``WORKDIR/checkpoints_unreadable/`` (kept for a look,
        out of the way of the rounds that will be saved again). Process 0 moves them once every
        process is done reading (every process reaches this point with the same ``steps``, by
        the agreements above), and the others look at the directory again only after the move."""
        if not steps:
            return
        distributed.all_gather_ints(f"set_aside/before/{max(steps)}", 0)
        if jax.process_index() == 0:
            aside = self.directory.parent / "checkpoints_unreadable"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{int(time.time())}"
                shutil.move(str(self.directory / str(step)), str(target))
                warnings.warn(f"moved the unreadable checkpoint to {target}", stacklevel=3)
        distributed.all_gather_ints(f"set_aside/after/{max(steps)}", 0)
        self.manager.reload()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
