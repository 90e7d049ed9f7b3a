"""Evaluation through the placement backend: personalised (each client's model on its own test
split) and global (the global expert on the whole test set).

Both are one client-shaped function mapped with ``placement.map``: on 8 devices each device
evaluates an eighth of the clients (or of the test set). Inside a client the examples go in
batches of ``batch_size`` (``lax.map``), so a client's whole test split never has to fit at once.
The functions return per-client sums; ``run.personalized_metrics`` turns them into accuracies.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax.federated.client import featurize_branch
from fedms_jax.federated.types import EXPERTS, Phase

PyTree = Any


def batched_sums(fn: Callable, images: jax.Array, labels: jax.Array, count: jax.Array, batch_size: int) -> dict:
    """Sums of ``fn(x [b, ...], y [b], mask [b]) -> {name: per-example [b]}`` over the first
    ``count`` of one client's padded examples, ``batch_size`` at a time."""
    n = labels.shape[0]
    b = max(1, min(batch_size, n))
    nb = -(-n // b)
    pad = nb * b - n
    x = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)).reshape((nb, b) + images.shape[1:])
    y = jnp.pad(labels, (0, pad)).reshape(nb, b)
    mask = (jnp.arange(nb * b) < count).astype(jnp.float32).reshape(nb, b)

    def one(batch):
        xb, yb, mb = batch
        return {name: jnp.sum(v * mb) for name, v in fn(xb, yb, mb).items()}

    return jax.tree_util.tree_map(lambda s: s.sum(0), jax.lax.map(one, (x, y, mask)))


def _correct(scores: jax.Array, labels: jax.Array) -> jax.Array:
    return (scores.argmax(-1) == labels).astype(jnp.float32)


def personal_eval_fn(algorithm, phase: Phase, batch_size: int) -> Callable:
    """``((backbone, down), client) -> {'correct', 'nll', extras...}``, each summed over the
    client's test examples; client = {'images', 'labels', 'count', 'state'}. A prediction's
    ``experts`` extra ({name: scores}) becomes ``correct_<name>`` (each expert alone)."""
    stage, settings = algorithm.stage(phase), algorithm.settings

    def evaluate(broadcast, client):
        backbone, down = broadcast
        params, ctx = stage.client_init(down, client["state"], phase)

        def fn(x, y, mask):
            feats = stage.featurize(backbone, ctx, settings.prep(x), phase)
            log_p, extras = stage.predict(params, ctx, backbone, feats, phase)
            nll = -jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]
            experts = extras.pop(EXPERTS, {})
            per_expert = {f"correct_{name}": _correct(scores, y) for name, scores in experts.items()}
            return {"correct": _correct(log_p, y), "nll": nll, **per_expert, **extras}

        return batched_sums(fn, client["images"], client["labels"], client["count"], batch_size)

    return evaluate


def global_eval_fn(algorithm, phase: Phase, batch_size: int) -> Callable:
    """``((backbone, down), shard) -> {'correct', 'nll'}`` summed over a shard of the test set
    (shard = {'images', 'labels', 'count'}), for the model ``stage.global_predict``."""
    stage, settings = algorithm.stage(phase), algorithm.settings

    def evaluate(broadcast, shard):
        backbone, down = broadcast

        def fn(x, y, mask):
            feats = featurize_branch(settings.expert, backbone, settings.prep(x), phase)
            logits = stage.global_predict(backbone, down, feats, phase)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            return {"correct": _correct(logits, y), "nll": nll}

        return batched_sums(fn, shard["images"], shard["labels"], shard["count"], batch_size)

    return evaluate


def shard_test_set(images: jax.Array, labels: jax.Array, shards: int) -> dict:
    """The whole test set as ``shards`` equal pseudo-clients (padded; ``count`` marks the real
    examples of each), so the global evaluation is split over devices like clients are."""
    n = labels.shape[0]
    per = -(-n // shards)
    pad = per * shards - n
    return {
        "images": jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)).reshape((shards, per) + images.shape[1:]),
        "labels": jnp.pad(labels, (0, pad)).reshape(shards, per),
        "count": jnp.clip(n - per * jnp.arange(shards), 0, per).astype(jnp.int32),
    }
