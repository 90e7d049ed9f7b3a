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
