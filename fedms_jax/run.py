"""The main job: LoRA + SAL fine-tuning of a frozen backbone, one jitted step per SAL level.

Each round runs ``client.local_steps`` gradient steps (one ``lax.scan``) at SAL level k(round)
on the training set, then evaluates; one JSON line per round goes to ``WORKDIR/metrics.jsonl``.
(The federated engine replaces the centralised round with a cohort of clients.)
"""
from __future__ import annotations

import functools
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
from fedms_jax.data.preprocess import preprocess
from fedms_jax.data.sources import load_dataset
from fedms_jax.models.expert import Expert
from fedms_jax.train import expert_loss, make_train_step

PyTree = Any


def _make_round(expert: Expert, config: ml_collections.ConfigDict, stats, k: int):
    """One round at SAL level k: scan of local steps over batches sampled from the train set."""
    optimizer = client_optimizer(config)
    step = make_train_step(expert, optimizer, k)
    size, (mean, std) = expert.spec.image_size, stats
    prep = lambda x: preprocess(x, size, mean, std, expert.spec.num_channels)

    def round_fn(backbone, trainable, images, labels, key):
        lora = sal.active_lora(trainable["lora"], k, expert.num_layers)
        active = {"lora": lora, "head": trainable["head"]}

        def body(carry, step_key):
            t, opt_state = carry
            idx = jax.random.randint(step_key, (config.client.batch_size,), 0, labels.shape[0])
            t, opt_state, loss = step(backbone, t, opt_state, prep(images[idx]), labels[idx], None)
            return (t, opt_state), loss

        keys = jax.random.split(key, config.client.local_steps)
        (active, _), losses = jax.lax.scan(body, (active, optimizer.init(active)), keys)
        new = {"lora": sal.merge_active(trainable["lora"], active["lora"]), "head": active["head"]}
        return new, losses.mean()

    return jax.jit(round_fn)


def _make_eval(expert: Expert, stats):
    size, (mean, std) = expert.spec.image_size, stats

    @jax.jit
    def evaluate(backbone, trainable, images, labels):
        x = preprocess(images, size, mean, std, expert.spec.num_channels)
        loss, logits = expert_loss(expert, expert.num_layers, backbone, trainable, x, labels)
        return loss, (logits.argmax(-1) == labels).mean()

    return evaluate


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> dict:
    """Runs the job; returns the final metrics. Writes ``workdir/metrics.jsonl``."""
    config = validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train, test = load_dataset(config.data.name, config.data.data_dir or None, seed=config.seed)
    seed = jax.random.key(config.seed)
    expert, backbone, stats = build_expert(config, train.num_classes, jax.random.fold_in(seed, 0))
    trainable = expert.init_trainable(jax.random.fold_in(seed, 1))
    schedule = sal.SALSchedule(
        expert.num_layers, config.sal.mode, config.sal.k0, config.sal.step, config.sal.every
    )
    rounds = {k: _make_round(expert, config, stats, k) for k in schedule.levels(config.rounds)}
    evaluate = _make_eval(expert, stats)
    tr_x, tr_y = jnp.asarray(train.images), jnp.asarray(train.labels)
    te_x, te_y = jnp.asarray(test.images), jnp.asarray(test.labels)
    metrics_path = workdir / "metrics.jsonl"
    record: dict = {}
    with metrics_path.open("w") as log, tqdm(range(config.rounds), disable=not progress, unit="round") as bar:
        for t in bar:
            k = schedule.num_active(t)
            start = time.perf_counter()
            trainable, loss = rounds[k](backbone, trainable, tr_x, tr_y, jax.random.fold_in(seed, 2 + t))
            loss = float(loss)
            seconds = time.perf_counter() - start
            record = {"round": t, "loss": loss, "active_blocks": k, "seconds": seconds}
            if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
                test_loss, acc = evaluate(backbone, trainable, te_x, te_y)
                record.update(test_loss=float(test_loss), accuracy=float(acc))
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{record.get('accuracy', float('nan')):.3f}", k=k, s=f"{seconds:.2f}")
    return record
