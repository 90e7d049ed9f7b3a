"""The synthetic source sized for the population, generated in blocks, bitwise as before."""
from __future__ import annotations

import numpy as np
import pytest

from fedms_jax.data import sources
from fedms_jax.data.sources import load_dataset, load_synthetic


def _old_load_synthetic(num_train=1024, num_test=256, num_classes=10, image_size=8, channels=3,
                        noise=0.35, seed=0):
    """Verbatim the one-shot generation before it was blocked (the oracle)."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0.0, 1.0, (num_classes, image_size, image_size, channels))

    def make(n: int, r: np.random.Generator) -> sources.Dataset:
        labels = r.integers(0, num_classes, n).astype(np.int32)
        x = templates[labels] + noise * r.standard_normal((n, image_size, image_size, channels))
        return sources.Dataset(
            np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8),
            labels,
            tuple(f"class_{i}" for i in range(num_classes)),
        )

    return make(num_train, np.random.default_rng(seed + 1)), make(num_test, np.random.default_rng(seed + 2))


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.images.dtype == w.images.dtype == np.uint8 and g.labels.dtype == w.labels.dtype
        assert g.images.shape == w.images.shape and g.class_names == w.class_names
        assert np.array_equal(g.images, w.images) and np.array_equal(g.labels, w.labels)


def test_standard_normal_in_pieces_is_one_draw():
    whole = np.random.default_rng(3).standard_normal((1000, 4))
    r, pieces = np.random.default_rng(3), np.empty((1000, 4))
    for a, b in [(0, 1), (1, 8), (8, 700), (700, 1000)]:
        r.standard_normal(out=pieces[a:b])
    assert np.array_equal(whole, pieces)


@pytest.mark.parametrize("seed", [0, 4])
def test_default_size_is_bitwise_the_old_generation(seed):
    want = _old_load_synthetic(seed=seed)
    _assert_same(load_synthetic(seed=seed), want)
    _assert_same(load_dataset("synthetic", seed=seed), want)
    # Populations that fit the defaults (2 * min * clients <= 1024, clients <= 128) too.
    _assert_same(load_dataset("synthetic", seed=seed, num_clients=20, min_examples=16), want)
    _assert_same(load_dataset("synthetic", seed=seed, num_clients=128, min_examples=4), want)


def test_blocks_do_not_change_the_values(monkeypatch):
    """Sizes around and across block edges, odd shapes: the same as one draw of everything."""
    monkeypatch.setattr(sources, "_SYNTHETIC_CHUNK", 100)
    for kw in [dict(num_train=100, num_test=99), dict(num_train=301, num_test=1, seed=2),
               dict(num_train=250, num_test=0, num_classes=3, image_size=5, channels=1, noise=1.5, seed=9)]:
        _assert_same(load_synthetic(**kw), _old_load_synthetic(**kw))
    monkeypatch.undo()
    kw = dict(num_train=40_000, num_test=300, seed=1)  # more than one real block
    _assert_same(load_synthetic(**kw), _old_load_synthetic(**kw))


def test_synthetic_grows_with_the_population():
    train, test = load_dataset("synthetic", num_clients=5000, min_examples=16, seed=3)
    assert len(train) == 2 * 16 * 5000 and len(test) == 2 * 5000
    for d in (train, test):
        assert d.images.dtype == np.uint8 and d.images.shape[1:] == (8, 8, 3)
        assert d.labels.dtype == np.int32 and d.num_classes == 10
        assert set(np.unique(d.labels)) == set(range(10))
    assert len(load_dataset("synthetic", num_clients=600)[0]) == 1200  # min_examples=1
    assert len(load_dataset("synthetic", num_clients=200)[1]) == 400
    # Other sources ignore the population.
    assert len(load_dataset("digits", num_clients=5000, min_examples=16)[0]) == len(load_dataset("digits")[0])
