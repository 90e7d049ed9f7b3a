"""Splitting a dataset over clients: Dirichlet label skew, pathological shards, IID.

Every partitioner is seeded and deterministic, assigns every example to exactly one client, and
returns a list of sorted index arrays (one per client). ``split_test_like`` partitions the test
set so each client's test split follows that client's training label distribution.

A partition that cannot be made (more clients, times what each must get, than examples) is a
``PartitionError`` naming the ``data.*`` keys and their values, raised before anything is drawn.
"""
from __future__ import annotations

import heapq
import math

import numpy as np

from fedms_jax.data.dataset import DataError


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

    Vectorised over clients (the class splits are array arithmetic; the top-up keeps heaps of
    client sizes), so 100k clients over millions of examples take seconds; the partition is
    the same as drawing each client's chunks one by one.
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise PartitionError(f"data.alpha = {alpha!r}: must be a finite number > 0 (data.partition='dirichlet')")
    _check_clients(num_clients, len(labels), min_examples)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for attempt in range(max_tries):
        # Per class: its examples shuffled, and client k's chunk idx[starts[k]:starts[k] + lens[k]]
        # (np.split at the cumulative Dirichlet shares, slice semantics and all).
        draws = []
        sizes = np.zeros(num_clients, np.int64)
        for members_c in members:
            idx = rng.permutation(members_c)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            starts, lens = _split_bounds(cuts, len(idx))
            draws.append((idx, starts, lens))
            sizes += lens
        if sizes.min() >= min_examples:
            return _sorted_parts(*_gather_parts(draws, sizes))
    # Very small alpha with many clients rarely satisfies the minimum by chance: top up the
    # smallest clients with random examples taken from the largest (keeps the exact cover).
    # Each step takes the smallest and the largest client (lowest index among equals, as
    # np.argmin / np.argmax would); heaps of (size, index) and (-size, index) with stale
    # entries skipped find them without rescanning every client.
    flat, sizes = _gather_parts(draws, sizes)
    out = np.split(flat, np.cumsum(sizes)[:-1])
    size = sizes.tolist()
    low = list(zip(size, range(num_clients)))
    high = [(-n, k) for n, k in low]
    heapq.heapify(low)
    heapq.heapify(high)
    while True:
        while size[low[0][1]] != low[0][0]:
            heapq.heappop(low)
        small = low[0][1]
        if size[small] >= min_examples:
            break
        while size[high[0][1]] != -high[0][0]:
            heapq.heappop(high)
        large = high[0][1]
        move = min(min_examples - size[small], size[large] - min_examples)
        pick = rng.permutation(len(out[large]))
        out[small] = np.concatenate([out[small], out[large][pick[:move]]])
        out[large] = out[large][pick[move:]]
        size[small] += move
        size[large] -= move
        heapq.heappush(low, (size[small], small))
        heapq.heappush(low, (size[large], large))
        heapq.heappush(high, (-size[small], small))
        heapq.heappush(high, (-size[large], large))
    return _sorted_parts(np.concatenate(out), np.asarray(size, np.int64))


def _split_bounds(cuts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where ``np.split(x, cuts)`` (len(x) == n) slices: each piece is x[starts[k]:starts[k] +
    lens[k]], with Python's slice rules (negative bounds count from the end, clamped to [0, n],
    an end before its start gives an empty piece)."""
    bounds = np.concatenate([[0], np.asarray(cuts, np.int64), [n]])
    bounds = np.where(bounds < 0, bounds + n, bounds).clip(0, n)
    starts = bounds[:-1]
    return starts, np.maximum(bounds[1:] - starts, 0)


def _gather_parts(draws, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every client's chunks, in class order, laid end to end (client 0's first): the flat
    array and the per-client sizes. ``draws`` is [(idx, starts, lens)] per class."""
    offsets = np.cumsum(sizes) - sizes  # where each client's run begins in the flat array
    flat = np.empty(int(sizes.sum()), np.int64)
    for idx, starts, lens in draws:
        flat[_ranges(offsets, lens)] = idx[_ranges(starts, lens)]
        offsets = offsets + lens
    return flat, sizes


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + n) for s, n in zip(starts, lens)]) without the loop."""
    total = int(lens.sum())
    ends = np.cumsum(lens)
    return np.repeat(starts - (ends - lens), lens) + np.arange(total, dtype=np.int64)


def _sorted_parts(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """The flat client-by-client array split into the clients' parts, each sorted."""
    owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    span = int(flat.max()) + 1 if len(flat) else 1
    keys = np.sort(owner * span + flat)
    return np.split(keys - owner * span, np.cumsum(sizes)[:-1])


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
    num_clients = len(train_parts)
    train_sizes = np.array([len(p) for p in train_parts], np.int64)
    owner = np.repeat(np.arange(num_clients, dtype=np.int64), train_sizes)
    held = train_labels[np.concatenate(train_parts)]
    counts = np.bincount(owner * num_classes + held, minlength=num_clients * num_classes)
    counts = counts.reshape(num_clients, num_classes)
    draws = []
    sizes = np.zeros(num_clients, np.int64)
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
        starts, lens = _split_bounds(np.cumsum(take)[:-1], len(idx))
        draws.append((idx, starts, lens))
        sizes += lens
    return _sorted_parts(*_gather_parts(draws, sizes))


def validation_split(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's training examples split into (train, validation): a uniformly random
    ``round(fraction * n)`` of its ``n`` examples (at least 1 when n >= 2, never all of them)
    become its validation split, the rest stay for training; both sorted. The tuning protocol
    (``data.validation``) evaluates on these instead of the test split."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for p in parts:
        n = len(p)
        k = min(max(int(round(fraction * n)), 1 if n >= 2 else 0), max(n - 1, 0))
        chosen = np.zeros(n, bool)
        chosen[rng.permutation(n)[:k]] = True
        train.append(np.sort(p[~chosen]))
        val.append(np.sort(p[chosen]))
    return train, val


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
