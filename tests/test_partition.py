"""Partitioners: deterministic, exhaustive, and skewed as alpha says."""
from __future__ import annotations

import numpy as np
import pytest

from fedms_jax.data import partition
from fedms_jax.data.clients import stack_clients
from fedms_jax.data.sources import load_digits

LABELS = np.random.default_rng(0).integers(0, 10, 5000)


def _hist(parts, labels=LABELS):
    return np.stack([np.bincount(labels[p], minlength=10) for p in parts]).astype(float)


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


@pytest.mark.parametrize("make", [
    lambda s: partition.dirichlet(LABELS, 20, 0.3, s, min_examples=10),
    lambda s: partition.shards(LABELS, 20, 2, s),
    lambda s: partition.iid(len(LABELS), 20, s),
])
def test_deterministic_and_exact_cover(make):
    a, b, c = make(1), make(1), make(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    _assert_exact_cover(a, len(LABELS))


def test_dirichlet_alpha_controls_skew():
    global_mix = np.bincount(LABELS, minlength=10) / len(LABELS)
    big = _hist(partition.dirichlet(LABELS, 10, 1000.0, 0))
    big /= big.sum(1, keepdims=True)
    assert np.abs(big - global_mix).max() < 0.05  # every client ~ the global class mix
    small = _hist(partition.dirichlet(LABELS, 10, 0.05, 0, min_examples=5))
    top_share = (small.max(1) / small.sum(1)).mean()
    classes_held = (small > 0).sum(1).mean()
    assert top_share > 0.6 and classes_held < 5  # few dominant classes per client


def test_dirichlet_min_examples_guaranteed_or_clear_error():
    parts = partition.dirichlet(LABELS, 50, 0.1, 0, min_examples=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ValueError, match="num_clients=100 x min_examples=60"):
        partition.dirichlet(LABELS, 100, 0.1, 0, min_examples=60)


def test_shards_give_few_classes():
    h = _hist(partition.shards(LABELS, 20, 2, 0))
    assert ((h > 0).sum(1) <= 4).all()


def test_test_split_follows_train_distribution():
    train, test = load_digits()
    parts = partition.dirichlet(train.labels, 10, 0.3, 0, min_examples=10)
    tparts = partition.split_test_like(train.labels, parts, test.labels, 0)
    _assert_exact_cover(tparts, len(test))
    tr = _hist(parts, train.labels)
    te = _hist(tparts, test.labels)
    # A class a client never trained on never appears in its test split...
    assert (te[tr == 0] == 0).all()
    # ...and the distributions agree closely (test counts are ~1/4 of train counts).
    p_tr = tr / tr.sum(1, keepdims=True)
    p_te = te / np.maximum(te.sum(1, keepdims=True), 1)
    assert np.abs(p_tr - p_te).sum(1).mean() < 0.25
    text = partition.summary(train.labels, parts)
    assert "client" in text and f"total {len(train)} examples" in text


def test_stack_clients_pads():
    train, _ = load_digits()
    parts = [np.array([0, 5, 9]), np.array([3])]
    cd = stack_clients(train, parts)
    assert cd.images.shape == (2, 3, 8, 8, 1) and cd.images.dtype == np.uint8
    assert list(cd.counts) == [3, 1]
    np.testing.assert_array_equal(cd.images[0, 1], train.images[5])
    assert (cd.images[1, 1:] == 0).all() and cd.labels[1, 0] == train.labels[3]


def test_tfds_source_with_mock_data():
    """The TFDS path (tfds.data_source, no TensorFlow) on TFDS's mock data."""
    import tensorflow_datasets as tfds

    from fedms_jax.data.sources import load_dataset

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        train, test = load_dataset("mnist")
    assert train.images.shape == (12, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and train.num_classes == 10 and len(test) == 12


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
    from fedms_jax.data.sources import load_tfds

    with pytest.raises(FileNotFoundError, match="'mnist' split 'train' is not prepared"):
        load_tfds("mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'no_such_dataset' is not a TFDS dataset"):
        load_tfds("no_such_dataset", data_dir=str(tmp_path))


# --- The vectorised dirichlet / split_test_like against the original loop code -------------
# _old_dirichlet and _old_split_test_like are verbatim copies of the implementations before
# they were vectorised (100k-client populations), kept as oracles; the only addition is the
# _TOPPED_UP record of whether the top-up loop ran, so the tests can check they cover it.

_TOPPED_UP: list[bool] = []


def _old_dirichlet(labels, num_clients, alpha, seed, min_examples=1, max_tries=20):
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
            _TOPPED_UP.append(False)
            return [np.sort(p) for p in out]
    _TOPPED_UP.append(True)
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


def _old_split_test_like(train_labels, train_parts, test_labels, seed):
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


def _assert_same_parts(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)


# (labels, num_clients, alpha, min_examples, max_tries, top-up path expected)
_ORACLE_CASES = [
    (LABELS, 20, 0.3, 10, 20, False),
    (LABELS, 10, 1000.0, 1, 20, False),
    (LABELS, 50, 0.1, 20, 20, None),
    (LABELS, 10, 0.05, 5, 20, None),
    # Small alpha, many clients, a large minimum: the top-up loop, with many ties in size
    # (lots of empty clients, several equally large ones).
    (LABELS, 200, 0.05, 20, 20, True),
    (LABELS, 500, 0.01, 10, 3, True),
    (LABELS, 250, 0.02, 20, 1, True),  # 250 x 20 = every example: all clients end at exactly 20
    (LABELS[:300], 100, 0.1, 3, 1, True),
    # Sparse, non-contiguous class ids in int32; a single class; a single client.
    ((LABELS[:2000] % 3 * 5).astype(np.int32), 60, 0.2, 8, 2, True),
    (np.zeros(400, np.int64), 40, 0.5, 10, 2, None),
    (LABELS[:100], 1, 0.3, 100, 20, False),
]


@pytest.mark.parametrize("case", range(len(_ORACLE_CASES)))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_dirichlet_and_test_split_match_the_original_loops(case, seed):
    labels, k, alpha, min_examples, tries, topped_up = _ORACLE_CASES[case]
    _TOPPED_UP.clear()
    want = _old_dirichlet(labels, k, alpha, seed, min_examples, tries)
    got = partition.dirichlet(labels, k, alpha, seed, min_examples, tries)
    _assert_same_parts(got, want)
    if topped_up is not None:
        assert _TOPPED_UP == [topped_up]
    assert min(len(p) for p in got) >= min_examples
    _assert_exact_cover(got, len(labels))
    # Test labels with a class no client trained on (dealt evenly) and, second, classes missing.
    test_labels = np.random.default_rng(seed).integers(0, int(labels.max()) + 2, 701).astype(labels.dtype)
    for tl in (test_labels, test_labels[test_labels % 2 == 0]):
        _assert_same_parts(
            partition.split_test_like(labels, got, tl, seed + 3), _old_split_test_like(labels, want, tl, seed + 3)
        )


def test_dirichlet_random_cases_match_the_original_loops():
    rng = np.random.default_rng(123)
    hit_top_up = 0
    for case in range(60):
        n = int(rng.integers(20, 1500))
        labels = rng.integers(0, int(rng.integers(1, 11)), n)
        k = int(rng.integers(1, min(n, 150) + 1))
        min_examples = int(rng.integers(1, n // k + 1))
        alpha = float(rng.choice([0.01, 0.05, 0.2, 1.0, 50.0]))
        tries = int(rng.choice([1, 2, 20]))
        _TOPPED_UP.clear()
        want = _old_dirichlet(labels, k, alpha, case, min_examples, tries)
        _assert_same_parts(partition.dirichlet(labels, k, alpha, case, min_examples, tries), want)
        hit_top_up += _TOPPED_UP[0]
    assert 10 <= hit_top_up <= 50  # both paths exercised


def test_dirichlet_many_clients_is_exact():
    """20,000 clients (640k examples, alpha 0.3, min 16: the top-up path at scale). (Its speed
    is measured in experiments/benchmarks/RESULTS.md's population section, not asserted.)"""
    labels = np.random.default_rng(5).integers(0, 10, 640_000)
    parts = partition.dirichlet(labels, 20_000, 0.3, 11, min_examples=16)
    test_labels = np.random.default_rng(6).integers(0, 10, 40_000)
    tparts = partition.split_test_like(labels, parts, test_labels, 12)
    assert len(parts) == 20_000 and min(len(p) for p in parts) >= 16
    _assert_exact_cover(parts, len(labels))
    assert all(np.all(np.diff(p) > 0) for p in parts[:1000])
    assert len(tparts) == 20_000
    _assert_exact_cover(tparts, len(test_labels))
