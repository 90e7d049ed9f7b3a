"""The round loop: build everything from the config, sample cohorts, run rounds, evaluate, log.

One JSON line per round goes to ``WORKDIR/metrics.jsonl``: ``round, stage, active_blocks, loss,
cohort, bytes_up, bytes_down, seconds`` every round (plus training-side extras such as FedMS's
``gate_local``), and on evaluation rounds ``personalized_accuracy`` (each client's model on its
own test split, mean weighted by test size; over a seeded sample of ``personalized_clients``
clients when the population is large, ``population.eval_sample``), ``personalized_min``,
``personalized_p10``, ``personalized_loss``, ``accuracy`` and ``test_loss`` (the global model on the whole test set;
absent for algorithms without one: ``local``, ``fedper``) and ``gate_local_weight`` (FedMS
stage 2: the gate's mean weight on the local expert over all test examples). With budget tiers
(``sal.budgets``) the cohort is drawn tier-major by ``budgets.ResourceModel``, ``bytes_*`` sum
each tier's clients at its level ``min(k, b)``, and ``loss_b<b>`` is the loss of the tier of
budget b. With DP (``dp.*``): ``epsilon`` (at ``dp.delta`` after the noisy aggregates so far;
null without noise), ``dp_rounds``, ``dp_noise_multiplier``, ``dp_update_norm`` (mean norm of
the uploads before clipping) and ``dp_clipped`` (the fraction clipped). Epsilon covers what the
server releases (the aggregates, hence the models); the metrics themselves are computed from the
clients' raw data and are not privatised.
"""
from __future__ import annotations
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedms_jax import compiling, distributed, rng
from fedms_jax.callbacks import (  # noqa: F401  (Callback, Preempted, RoundEnd: the loop's public API)
    Callback, Checkpointing, MetricsWriter, Preempted, Preemption, ProgressBar, RoundEnd, StartupTiming,
)
from fedms_jax.checkpoint import Checkpointer, config_fingerprint
from fedms_jax.config import Config, ConfigError, validate
from fedms_jax.data import partition
from fedms_jax.experiment import Experiment, build, make_run_mesh  # noqa: F401  (run.build: the public API)
from fedms_jax.federated import accounting, population
from fedms_jax.federated.types import ClientStates, ServerState

PyTree = Any


def _population_summary(exp: Experiment) -> str:
    """One line about a large population (``partition.summary`` prints a line per client)."""
    sizes = np.array([len(p) for p in exp.parts])
    line = (f"{len(sizes)} clients, {sizes.sum()} examples; per client min {sizes.min()}, median "
            f"{int(np.median(sizes))}, max {sizes.max()}; population mode {exp.mode}")
    if exp.sizes:  # streamed
        line += f" (padded sizes {list(exp.sizes)})"
    if exp.eval_ids is not None:
        line += f"; personalised evaluation over {len(exp.eval_ids)} sampled clients"
    return line


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, eq=False)
class RunResult:
    """metrics: the last metrics line; server/clients: the final states (a streamed population:
    the ``population.Streamed`` itself, ``population.Device.final``); experiment: ``build``'s."""

    metrics: dict
    server: ServerState
    clients: ClientStates | population.Streamed
    experiment: Experiment


def train_loop(exp: Experiment, server: ServerState, clients, start: int, callbacks: list[Callback],
               ledger: dict | None = None):
    """Rounds ``start .. config.rounds - 1``: sample, run, evaluate when due, hand each round's
    record to the callbacks. ``clients``: the population (``federated.population``: ``Device``
    or ``Streamed``). ``ledger``: the DP accountant's ledger of the checkpoint resumed from
    (checked against the rounds before ``start``). -> (last record, server)."""
    config, engine, algorithm = exp.config, exp.engine, exp.algorithm
    # A round's bytes depend only on the phase (the trees' shapes; with budgets each tier's
    # level): computed once per phase.
    like = exp.states_like()[1]
    bytes_per_phase = {p: accounting.round_bytes(engine, server, like, p, config.cohort_size)
                       for p in algorithm.phases(config.rounds)}
    # DP: each round that uploads something releases one noisy aggregate (what the accountant composes).
    releases = lambda t: sum(bytes_per_phase[algorithm.phase(r)][1] > 0 for r in range(t))
    if ledger is not None:
        now = {**exp.accountant.as_dict(), "rounds": releases(start)} if exp.accountant is not None else {}
        changed = sorted(k for k in set(ledger) | set(now) if ledger.get(k) != now.get(k))
        if changed:  # e.g. another dp-accounting calibrated another noise multiplier
            k = changed[0]
            raise ConfigError(f"the checkpoint's DP ledger has {k} = {ledger.get(k)!r}, this run {now.get(k)!r}: "
                              "refusing to resume with another mechanism or a wrong epsilon")
    record: dict = {}
    with contextlib.ExitStack() as stack:  # every on_end runs, in reverse, even if one raises
        for cb in callbacks:
            stack.callback(cb.on_end)
            cb.on_start(exp, start)
        for t in range(start, config.rounds):
            phase = algorithm.phase(t)
            cohort = exp.cohort(t)
            start_time = time.perf_counter()
            server, metrics = clients.run_round(server, t, phase, cohort)
            metrics = {name: float(v) for name, v in metrics.items()}  # host sync ends the timing
            clients.finish_round()  # streamed: the cohort's new states to the host, their write queued
            seconds = time.perf_counter() - start_time
            down, up = bytes_per_phase[phase]
            record = {
                "round": t, "stage": phase.stage, "active_blocks": phase.num_active, "loss": metrics.pop("loss"),
                "cohort": len(cohort), "bytes_up": up, "bytes_down": down,
                "seconds": seconds, **metrics,
            }
            if exp.accountant is not None:
                record["dp_noise_multiplier"] = exp.accountant.noise_multiplier
                record["dp_rounds"] = releases(t + 1)
                eps = exp.accountant.epsilon(releases(t + 1))
                record["epsilon"] = eps if np.isfinite(eps) else None  # None: no noise, no guarantee
            if exp.evaluates(t):
                record.update(exp.evaluate(server, clients, phase))
            end = RoundEnd(t, phase, record, server, clients)
            for cb in callbacks:
                cb.on_round(end)
    return record, server


def run(config: Config, workdir: str | Path, *, progress: bool = True, mesh=None,
        callbacks: list[Callback] = ()) -> RunResult:
    """Runs ``config.rounds`` rounds, resuming from the newest checkpoint in ``workdir``.

    The loop's side effects are callbacks: metrics lines, a progress bar, periodic checkpoints
    and preemption (on SIGTERM/SIGINT the round in flight finishes, a checkpoint is written and
    ``Preempted`` is raised; the CLI exits with 128 + signal number); ``callbacks`` run after
    the metrics writer, the progress bar and checkpointing, before the preemption check.
    """
    config = validate(config)
    workdir = Path(workdir)
    began = time.perf_counter()
    compiling.configure_cache(config.compile.cache, config.compile.cache_dir)
    compile_log = compiling.CompileLog().__enter__()
    try:
        return _run(config, workdir, progress=progress, mesh=mesh, callbacks=callbacks, began=began,
                    compile_log=compile_log)
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        lost = distributed.lost_peer_error(e)
        if lost is None:
            raise
        raise lost from e
    finally:
        compile_log.__exit__()


def _run(config: Config, workdir: Path, *, progress: bool, mesh, callbacks, began: float,
         compile_log: compiling.CompileLog) -> RunResult:
    exp = build(config, mesh=mesh, log=_log_stderr if jax.process_index() == 0 else None)
    try:
        return _run_built(exp, workdir, progress=progress, callbacks=callbacks, began=began, compile_log=compile_log)
    finally:
        exp.engine.executables.close()  # compiles not yet started are not needed any more


def _run_built(exp: Experiment, workdir: Path, *, progress: bool, callbacks, began: float,
               compile_log: compiling.CompileLog) -> RunResult:
    config = exp.config
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir / "checkpoints", every=ck.every, keep=ck.keep, asynchronous=ck.asynchronous)
    if config.compile.ahead:
        # Every program the rounds will need, in the order they need them, from the states'
        # shapes alone: the compile threads start while the states are initialised and restored.
        resume_at = min(max(checkpointer.steps(), default=0), config.rounds)
        exp.engine.compile_ahead(exp.programs(*exp.states_like(), resume_at))
    server, clients = exp.init_states(workdir)
    clients = exp.population(clients)
    built = time.perf_counter()
    primary = jax.process_index() == 0
    start, ledger = 0, None
    restored = checkpointer.restore_latest({"server": server, **clients.orbax_state()}, config, population=exp.mode)
    if restored is not None:
        start, state, saved_meta = restored
        ledger = saved_meta.get("dp")
        server = exp.engine.place(state["server"])
        clients.restore(start, state)
    if progress and primary:
        print(partition.summary(exp.train.labels, exp.parts, exp.train.num_classes) if len(exp.parts) <= 100
              else _population_summary(exp))
        if restored is not None:
            print(f"resuming {workdir} after round {start} of {config.rounds}")
    meta = lambda end: {
        "config": config_fingerprint(config),
        "next_phase": list(dataclasses.astuple(exp.algorithm.phase(min(end.done, config.rounds - 1)))),
        "rng": {"seed": config.seed, "recipe": rng.RECIPE},
        "population": exp.mode,
        # DP: the accountant's ledger (its parameters and the noisy aggregates released so far)
        **({"dp": {**exp.accountant.as_dict(), "rounds": end.record["dp_rounds"]}} if exp.accountant is not None else {}),
    }
    checkpointing = Checkpointing(checkpointer, meta)
    # Preemption goes last: every other callback sees the round before it saves and stops the run.
    timing = StartupTiming(workdir / "timing.json", primary, began, built, compile_log, checkpointing.saves)
    loop_callbacks = [MetricsWriter(workdir / "metrics.jsonl", primary), ProgressBar(progress and primary),
                      checkpointing, timing, *callbacks, Preemption(checkpointing)]
    try:
        record, server = train_loop(exp, server, clients, start, loop_callbacks, ledger=ledger)
    finally:
        clients.stop()  # streamed: every write done; the store stays readable
    if not record and start:  # nothing left to run: report the last line written
        lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
        record = json.loads(lines[-1]) if lines else {}
    return RunResult(record, server, clients.final(), exp)
