"""Splitting a dataset over clients: Dirichlet label skew, pathological shards, IID.

Every partitioner is seeded and deterministic, assigns every example to exactly one client, and
returns a list of sorted index arrays (one per client). ``split_test_like`` partitions the test
set so each client's test split follows that client's training label distribution.

A partition that cannot be made (more clients, times what each must get, than examples) is a
``PartitionError`` naming the ``data.*`` keys and their values, raised before anything is drawn.
"""
from __future__ import annotations

import math

import numpy as np

from fedms_jax.data.sources import DataError


class PartitionError(DataError):
    """The configured partition cannot be made from the training set (a ``DataError``, so a
    ``ValueError`` too): too many clients for its examples, or a bad partition parameter."""


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    _check_clients(num_clients, num_examples, partition="iid")
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_examples: int = 1,
    max_tries: int = 20,
) -> list[np.ndarray]:
    """Label skew: for each class, client shares ~ Dirichlet(alpha) (pfl-research / Hsu et al.).

    Small alpha concentrates each client on few classes; large alpha approaches the global mix.
    Draws are repeated (same seeded stream, up to ``max_tries``) until every client holds
    ``min_examples``; failing that, the smallest clients are topped up with random examples
    from the largest, so the minimum is guaranteed whenever ``clients * min <= examples``.
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise PartitionError(f"data.alpha = {alpha!r}: must be a finite number > 0 (data.partition='dirichlet')")
    _check_clients(num_clients, len(labels), min_examples)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for attempt in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_examples:
            return [np.sort(p) for p in out]
    # Very small alpha with many clients rarely satisfies the minimum by chance: top up the
    # smallest clients with random examples taken from the largest (keeps the exact cover).
    while True:
        sizes = np.array([len(p) for p in out])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_examples:
            return [np.sort(p) for p in out]
        large = int(np.argmax(sizes))
        move = min(min_examples - sizes[small], sizes[large] - min_examples)
        pick = rng.permutation(len(out[large]))
        out[small] = np.concatenate([out[small], out[large][pick[:move]]])
        out[large] = out[large][pick[move:]]


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into ``num_clients * c`` shards,
    deal ``c`` random shards to each client."""
    if classes_per_client < 1:
        raise PartitionError(f"data.shards_per_client = {classes_per_client!r}: must be >= 1")
    _check_clients(num_clients, len(labels), partition="shards")
    n_shards = num_clients * classes_per_client
    if n_shards > len(labels):
        raise PartitionError(
            f"data.num_clients = {num_clients} clients x data.shards_per_client = {classes_per_client} "
            f"shards each = {n_shards} shards, but the training set has {len(labels)} examples (at "
            f"least one per shard): lower data.num_clients or data.shards_per_client"
        )
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def split_test_like(
    train_labels: np.ndarray,
    train_parts: list[np.ndarray],
    test_labels: np.ndarray,
    seed: int,
) -> list[np.ndarray]:
    """Partitions the test set so client i's test labels follow its train label distribution.

    Each class's test examples are dealt to clients in proportion to how many training examples
    of that class each client holds (largest-remainder rounding), so every test example is used
    exactly once.
    """
    rng = np.random.default_rng(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    counts = np.stack([np.bincount(train_labels[p], minlength=num_classes) for p in train_parts])
    out: list[list[np.ndarray]] = [[] for _ in train_parts]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(test_labels == c))
        weights = counts[:, c].astype(np.float64)
        if len(idx) == 0:
            continue
        if weights.sum() == 0:
            weights = np.ones_like(weights)
        exact = weights / weights.sum() * len(idx)
        take = np.floor(exact).astype(int)
        short = len(idx) - take.sum()
        take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
        for client, chunk in enumerate(np.split(idx, np.cumsum(take)[:-1])):
            out[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in out]


def summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None) -> str:
    """A printable table: examples and classes held per client."""
    num_classes = num_classes or int(labels.max()) + 1
    lines = [f"{'client':>6} {'examples':>8} {'classes':>7}  top classes (count)"]
    for i, p in enumerate(parts):
        hist = np.bincount(labels[p], minlength=num_classes)
        top = np.argsort(-hist)[:3]
        tops = ", ".join(f"{c}({hist[c]})" for c in top if hist[c])
        lines.append(f"{i:>6} {len(p):>8} {int((hist > 0).sum()):>7}  {tops}")
    sizes = np.array([len(p) for p in parts])
    lines.append(f"total {sizes.sum()} examples; per client min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}")
    return "\n".join(lines)


def _check_clients(num_clients: int, num_examples: int, min_examples: int = 1, partition: str = "dirichlet") -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise PartitionError(f"data.num_clients = {num_clients!r}: must be a positive integer")
    if partition == "dirichlet":
        if isinstance(min_examples, bool) or not isinstance(min_examples, (int, np.integer)) or min_examples < 1:
            raise PartitionError(f"data.min_examples = {min_examples!r}: must be a positive integer")
        if num_clients * min_examples > num_examples:
            # "num_clients=N x min_examples=M": the short form tests and users grep for.
            raise PartitionError(
                f"data.num_clients={num_clients} x min_examples={min_examples}: {num_clients} clients need "
                f"at least data.min_examples = {min_examples} examples each ({num_clients * min_examples} in "
                f"all), but the training set has {num_examples}: lower data.num_clients or data.min_examples"
            )
    elif num_clients > num_examples:
        raise PartitionError(
            f"data.num_clients = {num_clients} clients need at least one example each "
            f"(data.partition={partition!r}), but the training set has {num_examples}: lower data.num_clients"
        )
