"""Evaluation through the placement backend: personalised (each client's model on its own test
split) and global (the global expert on the whole test set).

Both are one client-shaped function mapped with ``placement.map``: on 8 devices each device
evaluates an eighth of the clients (or of the test set). Inside a client the examples go in
batches of ``batch_size`` (``lax.map``), so a client's whole test split never has to fit at once.
The functions return per-client sums; ``personalized_metrics`` turns them into accuracies.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fedms_jax.federated import sharding
from fedms_jax.federated.ops import featurize_branch
from fedms_jax.federated.types import EXPERTS, Phase
from fedms_jax.models.transformer import layer_params_hook

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


# --- the engine's evaluation programs ---------------------------------------------------------
def _replicate(engine, tree: PyTree) -> PyTree:
    """Evaluation sums, gathered onto every device (a few scalars per client), so every process
    of a multi-host job can read them."""
    if not engine.placement.jitted:
        return tree
    rep = NamedSharding(engine.mesh, P())
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)


def personal_program(engine, phase: Phase) -> Callable:
    """``(server, clients, backbone, test) -> per-client sums`` of ``personal_eval_fn`` mapped
    over the clients by the engine's placement (jitted for ``Vmap``), made once per engine."""
    batch, chunk = engine.eval_batch, engine.eval_clients

    def make_body():
        fn = personal_eval_fn(engine.algorithm, phase, batch)

        def body(server, clients, backbone, test):
            down = engine.algorithm.stage(phase).broadcast(server, phase)
            per_client = {"images": test.images, "labels": test.labels, "count": test.counts, "state": clients.local}
            if engine.placement.jitted:
                backbone = sharding.for_compute(backbone, engine.mesh, engine.strategy)
            with layer_params_hook(sharding.gather_layers(engine.mesh, engine.strategy)):
                return _replicate(engine, engine.placement.map(fn, (backbone, down), per_client, chunk_size=chunk))

        return body

    return engine.program(("personal", phase, batch, chunk), make_body)


def global_program(engine, phase: Phase) -> Callable:
    """``(server, backbone, images, labels) -> summed nll and correct`` of ``global_eval_fn`` over
    the test set split into one shard per device (jitted for ``Vmap``), made once per engine."""
    batch, shards = engine.eval_batch, engine.placement.num_devices

    def make_body():
        fn = global_eval_fn(engine.algorithm, phase, batch)

        def body(server, backbone, images, labels):
            down = engine.algorithm.stage(phase).broadcast(server, phase)
            if engine.placement.jitted:
                backbone = sharding.for_compute(backbone, engine.mesh, engine.strategy)
            with layer_params_hook(sharding.gather_layers(engine.mesh, engine.strategy)):
                out = engine.placement.map(fn, (backbone, down), shard_test_set(images, labels, shards))
            return _replicate(engine, {name: v.sum() for name, v in out.items()})

        return body

    return engine.program(("global", phase, batch), make_body)


def personalized_metrics(per_client: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-client evaluation sums -> the weighted mean accuracy and loss, the minimum and 10th
    percentile of the clients' accuracies (clients with no test examples left out), the mean
    of every per-example extra (e.g. ``gate_local`` -> ``gate_local_weight``, with
    ``gate_local_std`` from ``gate_local_sq``), and for a mixture each expert's accuracy alone
    (``personalized_accuracy_global``/``_local``) and the per-client margin of the mixture
    over its best expert."""
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
        if name in ("count", "correct", "nll") or name.endswith("_sq"):
            continue
        if name.startswith("correct_"):  # one expert of a mixture alone
            out[f"personalized_accuracy_{name[len('correct_'):]}"] = float(v.sum() / count.sum())
            continue
        mean = float(v.sum() / count.sum())
        out[f"{name}_weight"] = mean
        if f"{name}_sq" in per_client:  # its spread over the test examples
            out[f"{name}_std"] = float(np.sqrt(max(per_client[f"{name}_sq"].sum() / count.sum() - mean**2, 0.0)))
    experts = [per_client[n][has] / count[has] for n in per_client if n.startswith("correct_")]
    if experts:  # per client: the mixture's accuracy minus its best expert's
        margin = acc - np.max(experts, axis=0)
        out["mixture_minus_best_expert"] = float(margin.mean())
        out["clients_mixture_at_least_best"] = float((margin >= 0).mean())
    return out
