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
null without noise), ``dp_rounds``, ``dp_noise_multiplier`` and ``dp_noise`` (``secret``, or
that the noise is reproducible from the config and epsilon no guarantee). Epsilon covers what
the server releases (the aggregates, hence the models, and what is computed from them and the
test set alone: ``accuracy``, ``test_loss``); every metric computed from the clients' raw data
(``loss``, the personalised metrics, ``dp_update_norm``, ``dp_clipped``, ...) is not covered,
so under DP it is left out of ``metrics.jsonl`` and written to ``metrics_not_private.jsonl``
only with ``dp.raw_metrics`` (``RELEASED`` lists what stays). With a system model (``system.*``,
``fedms_jax.system``) each line also has the round in simulated time: ``sim_round_s``,
``sim_clock_s`` and who took part (``sim_contributed``, ``sim_dropped``, ``sim_late``, ...;
docs/systems.md); ``loss`` is then null in a round to which no client contributed.

A run stops with ``Diverged`` (exit 1) when the server state is not finite after a round, or
after ``guard.max_bad_rounds`` consecutive rounds in which every client was excluded; the
diverged round is never checkpointed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedms_jax import compiling, distributed, rng, storage
from fedms_jax.callbacks import (  # noqa: F401  (Callback, Preempted, RoundEnd: the loop's public API)
    Callback, Checkpointing, MetricsWriter, Preempted, Preemption, ProgressBar, RoundEnd, StartupTiming,
)
from fedms_jax.checkpoint import Checkpointer, config_fingerprint
from fedms_jax.config import Config, ConfigError, validate
from fedms_jax.data import partition
from fedms_jax.experiment import Experiment, build, make_run_mesh  # noqa: F401  (run.build: the public API)
from fedms_jax.federated import accounting, population
from fedms_jax.federated.guards import SERVER_FINITE
from fedms_jax.federated.types import ClientStates, ServerState, server_of
from fedms_jax.signals import Interrupted, SignalGuard  # noqa: F401  (Interrupted: the CLI's)

# What a metrics line under DP holds: what epsilon covers (the released aggregates and what is
# computed from them and the test set alone) and the run's bookkeeping.
RELEASED = ("round", "stage", "active_blocks", "cohort", "bytes_up", "bytes_down", "seconds", "epsilon",
            "dp_rounds", "dp_noise_multiplier", "dp_noise")
RELEASED_EVALUATION = ("accuracy", "test_loss")  # the global model on the test set (not with data.validation)
REPRODUCIBLE_NOISE = "reproducible from config.seed: epsilon is not a guarantee"

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


class Diverged(Exception):
    """The run diverged (a non-finite server state, or every client excluded for
    ``guard.max_bad_rounds`` rounds); the message names the round and the last checkpoint."""

    def __init__(self, round_index: int, algorithm: str, why: str) -> None:
        self.round, self.algorithm, self.why = round_index, algorithm, why
        super().__init__(f"round {round_index} of {algorithm} diverged: {why}")


def released(record: dict, config: Config) -> tuple[dict, dict]:
    """Under DP, a round's record split into (what epsilon covers, the metrics from raw client
    data); without DP, (record, {})."""
    if not config.dp.enabled:
        return record, {}
    keep = RELEASED + (RELEASED_EVALUATION if config.data.validation == 0 else ())
    public = {k: v for k, v in record.items() if k in keep}
    raw = {k: v for k, v in record.items() if k not in keep}
    return public, ({"round": record["round"], **raw} if raw else {})


def train_loop(exp: Experiment, server: ServerState, clients, start: int, callbacks: list[Callback],
               ledger: dict | None = None):
    """Rounds ``start .. config.rounds - 1``: sample, run, evaluate when due (unless a callback
    is ``stopping``), hand each round's record to the callbacks. ``clients``: the population
    (``federated.population``: ``Device`` or ``Streamed``). ``ledger``: the DP accountant's
    ledger of the checkpoint resumed from (checked against the rounds before ``start``).
    Raises ``Diverged`` before any callback sees a diverged round. -> (last record, server)."""
    config, engine, algorithm = exp.config, exp.engine, exp.algorithm
    # A round's bytes depend only on the phase (the trees' shapes; with budgets each tier's
    # level): computed once per phase.
    like = exp.states_like()[1]
    bytes_per_phase = {p: accounting.round_bytes(engine, server_of(server), like, p, config.cohort_size)
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
    bad = 0  # consecutive rounds with every client excluded
    with contextlib.ExitStack() as stack:  # every on_end runs, in reverse, even if one raises
        for cb in callbacks:
            stack.callback(cb.on_end)
            cb.on_start(exp, start)
        for t in range(start, config.rounds):
            phase = algorithm.phase(t)
            cohort = exp.cohort(t)
            start_time = time.perf_counter()
            inputs = exp.round_inputs(t)
            server, metrics = clients.run_round(server, t, phase, cohort, **inputs)
            metrics = {name: float(v) for name, v in metrics.items()}  # host sync ends the timing
            if not metrics.pop(SERVER_FINITE, 1.0):
                raise Diverged(t, algorithm.name, "the server state is not finite after its update "
                                                  f"(loss {metrics.get('loss')}; lower server.lr or client.lr)")
            taking_part = int((inputs["depth"] > 0).sum()) if "depth" in inputs else len(cohort)
            if taking_part:  # a round nobody took part in says nothing about divergence
                bad = bad + 1 if metrics.get("excluded_clients", 0) >= taking_part else 0
            if bad >= config.guard.max_bad_rounds:
                raise Diverged(t, algorithm.name, f"every client's update was non-finite in {bad} consecutive rounds "
                                                  "(guard.max_bad_rounds)")
            clients.finish_round()  # streamed: the cohort's new states to the host, their write queued
            seconds = time.perf_counter() - start_time
            down, up = bytes_per_phase[phase]
            record = {
                "round": t, "stage": phase.stage, "active_blocks": phase.num_active, "loss": metrics.pop("loss"),
                "cohort": len(cohort), "bytes_up": up, "bytes_down": down,
                "seconds": seconds, **metrics,
            }
            if exp.system is not None:  # the round in simulated time (``system.Plan``)
                record.update(exp.timeline.plan(t).record)
                if not taking_part:  # nobody's update arrived: no loss to report
                    record["loss"] = None
            if exp.accountant is not None:
                record["dp_noise_multiplier"] = exp.accountant.noise_multiplier
                record["dp_rounds"] = releases(t + 1)
                eps = exp.accountant.epsilon(releases(t + 1))
                record["epsilon"] = eps if np.isfinite(eps) else None  # None: no noise, no guarantee
                record["dp_noise"] = "secret" if exp.secret_noise else REPRODUCIBLE_NOISE
            stopping = [cb.stopping(t) for cb in callbacks]  # every one asked (they may agree across processes)
            # (the last round's evaluation is the run's result: kept even when stopping)
            if exp.evaluates(t) and (not any(stopping) or t + 1 == config.rounds):
                record.update(exp.evaluate(server, clients, phase))
            record, raw = released(record, config)
            end = RoundEnd(t, phase, record, server, clients, raw)
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
    began = time.perf_counter()
    # First, before anything slow: until the rounds begin a signal stops the run at once
    # (``signals.Interrupted``, cleaning up on the way out); the handlers stay until the final
    # save is on disk.
    with SignalGuard() as guard:
        config = validate(config)
        workdir = Path(workdir)
        compiling.configure_cache(config.compile.cache, config.compile.cache_dir)
        compile_log = compiling.CompileLog().__enter__()
        try:
            return _run(config, workdir, progress=progress, mesh=mesh, callbacks=callbacks, began=began,
                        compile_log=compile_log, guard=guard)
        except (jax.errors.JaxRuntimeError, ValueError, distributed.PeerLost) as e:
            lost = e if isinstance(e, distributed.PeerLost) else distributed.lost_peer_error(e)
            if lost is None:
                raise
            if guard.caught and not guard.deferring:
                # A signal in start-up (this process's or forwarded from another) while a
                # collective waited for a process that had already stopped for it: the same
                # ending as theirs, through jax.distributed's shutdown barrier where they wait.
                raise Interrupted(guard.caught[0]) from None
            if lost is e:
                raise
            raise lost from e
        finally:
            compile_log.__exit__()


def _run(config: Config, workdir: Path, *, progress: bool, mesh, callbacks, began: float,
         compile_log: compiling.CompileLog, guard: SignalGuard) -> RunResult:
    guard.check()
    exp = build(config, mesh=mesh, log=_log_stderr if jax.process_index() == 0 else None)
    guard.check()
    try:
        return _run_built(exp, workdir, progress=progress, callbacks=callbacks, began=began, compile_log=compile_log,
                          guard=guard)
    finally:
        exp.engine.executables.close()  # compiles not yet started are not needed any more


def _run_built(exp: Experiment, workdir: Path, *, progress: bool, callbacks, began: float,
               compile_log: compiling.CompileLog, guard: SignalGuard) -> RunResult:
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
    guard.check()
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
    writers = [MetricsWriter(workdir / "metrics.jsonl", primary)]
    if config.dp.enabled and config.dp.raw_metrics:  # what epsilon does not cover, clearly apart
        writers.append(MetricsWriter(workdir / "metrics_not_private.jsonl", primary, field="raw"))
    checkpointing = Checkpointing(checkpointer, meta, before_save=[w.sync for w in writers])
    # Preemption goes last: every other callback sees the round before it saves and stops the run.
    timing = StartupTiming(workdir / "timing.json", primary, began, built, compile_log, checkpointing.saves)
    loop_callbacks = [*writers, ProgressBar(progress and primary),
                      checkpointing, timing, *callbacks, Preemption(checkpointing, guard)]
    guard.defer()  # from here a signal is acted on after the round in flight
    try:
        record, server = train_loop(exp, server, clients, start, loop_callbacks, ledger=ledger)
    except Diverged as e:
        kept = checkpointer.restorable_steps()  # (every save has been waited for)
        last = f"the last checkpoint, after round {kept[-1]}, is in {checkpointer.directory}" if kept else "no checkpoint"
        raise Diverged(e.round, e.algorithm, f"{e.why}; {last}") from None
    finally:
        clients.stop()  # streamed: every write done; the store stays readable
    if not record and start:  # nothing left to run: report the last line written
        lines = storage.read_jsonl(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
        record = lines[-1] if lines else {}
    return RunResult(record, server_of(server), clients.final(), exp)
