"""The round loop: build everything from the config, sample cohorts, run rounds, evaluate, log.

One JSON line per round goes to ``WORKDIR/metrics.jsonl`` (round, loss, accuracy, test_loss,
active_blocks, cohort, bytes_up, bytes_down, seconds).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from fedms_jax import sal
from fedms_jax.builders import build_expert, client_optimizer
from fedms_jax.config import validate
from fedms_jax.data import partition
from fedms_jax.data.clients import stack_clients
from fedms_jax.data.sources import Dataset, load_dataset
from fedms_jax.federated.algorithms.fedavg import FedAvg
from fedms_jax.federated.engine import Engine, make_evaluator, sample_cohort
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


def build(config: ml_collections.ConfigDict, *, mesh=None) -> dict:
    """Everything a run needs, from a validated config (no compilation happens here)."""
    train, test = load_dataset(config.data.name, config.data.data_dir or None, seed=config.seed)
    parts, test_parts = partition_clients(config, train, test)
    seed_key = jax.random.key(config.seed)
    expert, backbone, stats = build_expert(config, train.num_classes, jax.random.fold_in(seed_key, 0))
    algorithm = FedAvg(
        expert,
        client_optimizer(config),
        server_optimizer(config.server.optimizer, config.server.lr),
        config.client.local_steps,
        config.client.batch_size,
        stats,
    )
    engine = Engine(
        algorithm, backbone, stack_clients(train, parts), seed=config.seed,
        backend=config.placement.backend, chunk_size=config.placement.chunk_size or None, mesh=mesh,
    )
    server, clients = engine.place(algorithm.init(jax.random.fold_in(seed_key, 1), config.data.num_clients))
    schedule = sal.SALSchedule(expert.num_layers, config.sal.mode, config.sal.k0, config.sal.step, config.sal.every)
    return dict(
        train=train, test=test, parts=parts, test_parts=test_parts, expert=expert, stats=stats,
        algorithm=algorithm, engine=engine, server=server, clients=clients, schedule=schedule,
    )


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True, mesh=None) -> dict:
    """Runs ``config.rounds`` rounds; returns the last metrics line and the final states."""
    config = validate(config)
    workdir = Path(workdir)
    b = build(config, mesh=mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    if progress:
        print(partition.summary(b["train"].labels, b["parts"], b["train"].num_classes))
    engine, algorithm, schedule = b["engine"], b["algorithm"], b["schedule"]
    server, clients = b["server"], b["clients"]
    evaluate = make_evaluator(b["expert"], b["stats"])
    test_x, test_y = jnp.asarray(b["test"].images), jnp.asarray(b["test"].labels)
    # Bytes per client depend only on k (the active units' shapes): computed once per level.
    bytes_per_k = {k: algorithm.bytes_per_client(server, k) for k in schedule.levels(config.rounds)}
    record: dict = {}
    with (workdir / "metrics.jsonl").open("w") as log, tqdm(
        range(config.rounds), disable=not progress, unit="round", dynamic_ncols=True
    ) as bar:
        for t in bar:
            k = schedule.num_active(t)
            cohort = sample_cohort(config.seed, t, config.data.num_clients, config.cohort_size)
            start = time.perf_counter()
            server, clients, metrics = engine.run_round(server, clients, t, k, cohort)
            loss = float(metrics["loss"])  # the host sync that ends the round's timing
            seconds = time.perf_counter() - start
            down, up = bytes_per_k[k]
            record = {
                "round": t, "loss": loss, "active_blocks": k, "cohort": len(cohort),
                "bytes_up": up * len(cohort), "bytes_down": down * len(cohort), "seconds": seconds,
            }
            if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                test_loss, acc = evaluate(engine.backbone, server.trainable, test_x, test_y)
                record.update(test_loss=float(test_loss), accuracy=float(acc))
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{record.get('accuracy', float('nan')):.3f}", k=k, s=f"{seconds:.2f}")
    return {"metrics": record, "server": server, "clients": clients, "engine": engine}
