"""The round loop: build everything from the config, sample cohorts, run rounds, evaluate, log.

One JSON line per round goes to ``WORKDIR/metrics.jsonl``: ``round, stage, active_blocks, loss,
cohort, bytes_up, bytes_down, seconds`` every round (plus training-side extras such as FedMS's
``gate_local``), and on evaluation rounds ``personalized_accuracy`` (each client's model on its
own test split, mean weighted by test size), ``personalized_min``, ``personalized_p10``,
``personalized_loss``, ``accuracy`` and ``test_loss`` (the global model on the whole test set;
absent for algorithms without one: ``local``, ``fedper``) and ``gate_local_weight`` (FedMS
stage 2: the gate's mean weight on the local expert over all test examples).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from fedms_jax import perf, sal
from fedms_jax.builders import build_expert, client_optimizer
from fedms_jax.checkpoint import Checkpointer, config_fingerprint
from fedms_jax.config import validate
from fedms_jax.data import partition
from fedms_jax.data.clients import ClientData, stack_clients
from fedms_jax.data.sources import DataError, Dataset, load_dataset, subsample
from fedms_jax.federated.algorithms import Common, make_algorithm
from fedms_jax.federated.engine import Engine, sample_cohort
from fedms_jax.federated.server import server_optimizer

PyTree = Any


def partition_clients(config: ml_collections.ConfigDict, train: Dataset, test: Dataset) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train parts by the configured partitioner; test parts following each client's labels."""
    d, seed = config.data, config.seed
    if d.partition == "dirichlet":
        parts = partition.dirichlet(train.labels, d.num_clients, d.alpha, seed, d.min_examples)
    elif d.partition == "shards":
        parts = partition.shards(train.labels, d.num_clients, d.shards_per_client, seed)
    else:
        parts = partition.iid(len(train), d.num_clients, seed)
    return parts, partition.split_test_like(train.labels, parts, test.labels, seed)


def make_run_mesh(config: ml_collections.ConfigDict):
    """The ('clients', 'model') mesh of ``config.mesh`` over every device (of every process)."""
    from fedms_jax.config import ConfigError
    from fedms_jax.federated.sharding import make_mesh

    m = config.mesh
    try:
        mesh = make_mesh(m.clients, m.model)
    except ValueError as e:
        raise ConfigError(f"config.mesh = {m.clients} x {m.model}: {e}") from None
    per_chunk = config.placement.chunk_size or config.cohort_size
    if per_chunk % mesh.shape["clients"]:
        raise ConfigError(
            f"config.cohort_size = {config.cohort_size} (chunk {per_chunk}) must be a multiple of the "
            f"{mesh.shape['clients']} devices on the 'clients' axis (mesh {dict(mesh.shape)})"
        )
    return mesh


def build(
    config: ml_collections.ConfigDict, *, mesh=None, datasets: tuple[Dataset, Dataset] | None = None
) -> dict:
    """Everything a run needs, from a validated config (no compilation happens here).

    ``datasets``: (train, test) to use instead of loading ``config.data.name`` (benchmarks pass
    synthetic data at the model's resolution).
    """
    if datasets is None:
        datasets = load_dataset(config.data.name, config.data.data_dir or None, seed=config.seed,
                                image_size=config.data.image_size)
    train, test = datasets
    # Distinct streams for the two subsets (and from the partition's, which uses the bare seed).
    train = subsample(train, config.data.train_examples, seed=[config.seed, 1])
    test = subsample(test, config.data.test_examples, seed=[config.seed, 2])
    parts, test_parts = partition_clients(config, train, test)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"client(s) {empty[:10]} have no training examples under data.partition="
            f"{config.data.partition!r} with data.num_clients={config.data.num_clients} "
            f"({len(train)} examples): use fewer clients or another partition"
        )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"train images are {train.images.shape[1:]} but test images {test.images.shape[1:]}")
    seed_key = jax.random.key(config.seed)
    built = build_expert(config, train.class_names, jax.random.fold_in(seed_key, 0))
    expert = built.expert
    tuned = expert.tune_head
    common = Common(
        expert=expert,
        stats=built.stats,
        schedule=sal.SALSchedule(expert.num_layers, config.sal.mode, config.sal.k0, config.sal.step, config.sal.every),
        client_optimizer=client_optimizer(config),
        server_optimizer=server_optimizer(config.server.optimizer, config.server.lr),
        local_steps=config.client.local_steps,
        batch_size=config.client.batch_size,
        init_head=built.head if tuned else None,
        frozen_head=None if tuned else built.head,
        cache_frozen=config.client.cache_frozen,
    )
    algorithm = make_algorithm(config, common)
    if mesh is None:
        mesh = make_run_mesh(config)
    spec = expert.spec
    tokens = (spec.image_size // spec.patch_size) ** 2 + 1
    enc = spec.encoder
    chunk = config.placement.chunk_size or perf.auto_chunk_size(
        config.cohort_size, mesh.shape["clients"],
        perf.activation_bytes(config.client.batch_size, tokens, enc.hidden_size, enc.mlp_dim, enc.num_heads,
                              jnp.dtype(config.model.dtype).itemsize),
        mesh.devices.flat[0].platform,
    )
    engine = Engine(
        algorithm, built.backbone, stack_clients(train, parts), seed=config.seed,
        backend=config.placement.backend, chunk_size=chunk, mesh=mesh,
        strategy=config.mesh.strategy, eval_clients=config.eval_clients,
    )
    server, clients = engine.place(algorithm.init(jax.random.fold_in(seed_key, 1), config.data.num_clients))
    return dict(
        train=train, test=test, parts=parts, test_parts=test_parts, expert=expert, stats=built.stats,
        algorithm=algorithm, engine=engine, server=server, clients=clients,
        client_test=jax.device_put(stack_clients(test, test_parts)),
    )


def personalized_metrics(per_client: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-client evaluation sums -> the weighted mean accuracy and loss, the minimum and 10th
    percentile of the clients' accuracies (clients with no test examples left out), and the mean
    of every per-example extra (e.g. ``gate_local`` -> ``gate_local_weight``)."""
    count = per_client["count"].astype(np.float64)
    has = count > 0
    acc = per_client["correct"][has] / count[has]
    out = {
        "personalized_accuracy": float(per_client["correct"].sum() / count.sum()),
        "personalized_min": float(acc.min()),
        "personalized_p10": float(np.percentile(acc, 10)),
        "personalized_loss": float(per_client["nll"].sum() / count.sum()),
    }
    for name, v in per_client.items():
        if name not in ("count", "correct", "nll"):
            out[f"{name}_weight"] = float(v.sum() / count.sum())
    return out


def evaluate(b: dict, server, clients, phase) -> dict[str, float]:
    """Personalised (every client, own test split) and global (whole test set) evaluation."""
    engine, algorithm = b["engine"], b["algorithm"]
    out = personalized_metrics(engine.evaluate_clients(server, clients, phase, b["client_test"]))
    if algorithm.has_global_model:
        loss, acc = engine.evaluate_global(server, phase, b["test_images"], b["test_labels"])
        out.update(test_loss=loss, accuracy=acc)
    return out


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; exit with ``128 + signum``."""

    def __init__(self, signum: int, rounds_done: int, directory: Path) -> None:
        self.signum, self.rounds_done, self.directory = signum, rounds_done, directory
        name = signal.Signals(signum).name
        super().__init__(
            f"caught {name}: saved the state after round {rounds_done} to {directory}; "
            "rerun the same command to resume"
        )


@contextlib.contextmanager
def _catch_signals(signums=(signal.SIGTERM, signal.SIGINT)):
    """Records SIGTERM/SIGINT instead of dying, so the round in flight can finish and be saved."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signums}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _keep_metrics_before(path: Path, start: int) -> None:
    """Drops the metric lines of rounds >= start (written after the checkpoint we resume from),
    by writing a new file and renaming it over the old one."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["round"] < start]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True, mesh=None) -> dict:
    """Runs ``config.rounds`` rounds, resuming from the newest checkpoint in ``workdir``.

    Returns the last metrics line, the final states, the engine and ``build``'s objects. On
    SIGTERM/SIGINT the round in flight finishes, a checkpoint is written and ``Preempted`` is
    raised (the CLI exits with 128 + signal number).
    """
    config = validate(config)
    workdir = Path(workdir)
    b = build(config, mesh=mesh)
    engine, algorithm = b["engine"], b["algorithm"]
    server, clients = b["server"], b["clients"]
    primary = jax.process_index() == 0
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir / "checkpoints", every=ck.every, keep=ck.keep, asynchronous=ck.asynchronous)
    start = 0
    restored = checkpointer.restore_latest({"server": server, "clients": clients}, config)
    if restored is not None:
        start, state, _ = restored
        server, clients = state["server"], state["clients"]
    if progress and primary:
        print(partition.summary(b["train"].labels, b["parts"], b["train"].num_classes))
        if restored is not None:
            print(f"resuming {workdir} after round {start} of {config.rounds}")
    b["test_images"], b["test_labels"] = jnp.asarray(b["test"].images), jnp.asarray(b["test"].labels)
    # Bytes per client depend only on the phase (the trees' shapes): computed once per phase.
    bytes_per_phase = {p: engine.bytes_per_client(server, clients, p) for p in algorithm.phases(config.rounds)}
    metrics_path = workdir / "metrics.jsonl"
    if primary:
        _keep_metrics_before(metrics_path, start)
    record: dict = {}
    if start and metrics_path.exists():
        lines = metrics_path.read_text().splitlines()
        record = json.loads(lines[-1]) if lines else {}
    meta = lambda done: {
        "config": config_fingerprint(config),
        "next_phase": list(dataclasses.astuple(algorithm.phase(min(done, config.rounds - 1)))),
        "rng": {"seed": config.seed, "recipe": "fold_in(fold_in(key(seed), round), client)"},
    }
    log = metrics_path.open("a") if primary else open(os.devnull, "w")
    with log, _catch_signals() as caught, tqdm(
        range(start, config.rounds), initial=start, total=config.rounds,
        disable=not progress or not primary, unit="round", dynamic_ncols=True,
    ) as bar:
        for t in bar:
            phase = algorithm.phase(t)
            cohort = sample_cohort(config.seed, t, config.data.num_clients, config.cohort_size)
            start_time = time.perf_counter()
            server, clients, metrics = engine.run_round(server, clients, t, phase, cohort)
            metrics = {name: float(v) for name, v in metrics.items()}  # host sync ends the timing
            seconds = time.perf_counter() - start_time
            down, up = bytes_per_phase[phase]
            record = {
                "round": t, "stage": phase.stage, "active_blocks": phase.num_active, "loss": metrics.pop("loss"),
                "cohort": len(cohort), "bytes_up": up * len(cohort), "bytes_down": down * len(cohort),
                "seconds": seconds,
            }
            record.update({name: v for name, v in metrics.items() if name != "total_weight"})
            if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                record.update(evaluate(b, server, clients, phase))
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(
                stage=phase.stage, k=phase.num_active, loss=f"{record['loss']:.3f}",
                pacc=f"{record.get('personalized_accuracy', float('nan')):.3f}",
                acc=f"{record.get('accuracy', float('nan')):.3f}", s=f"{seconds:.2f}",
            )
            done = t + 1
            state = {"server": server, "clients": clients}
            if caught:
                checkpointer.save(done, state, meta(done), wait=True)
                checkpointer.close()
                raise Preempted(caught[0], done, checkpointer.directory)
            if checkpointer.due(done) or done == config.rounds:
                checkpointer.save(done, state, meta(done))
    checkpointer.close()
    return {"metrics": record, "server": server, "clients": clients, "engine": engine, "build": b}
