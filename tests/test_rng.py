"""Named random streams: every key a run derives is distinct from every other one."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax import rng
from fedms_jax.federated.client import dropout_key
from fedms_jax.rng import Stream


def _run_keys(seed: int, rounds: int, clients: int, steps: int, epochs: int, depth: int) -> dict[str, tuple]:
    """Every key a run of ``rounds`` x ``clients`` derives (named), as raw key data."""
    keys: dict[str, jax.Array] = {}
    for name in ("BACKBONE", "INIT"):  # init keys are split by the models (split(k)[i] = fold_in(k, i))
        k = rng.key(seed, Stream[name])
        keys[name] = k
        for i, child in enumerate(jax.random.split(k, depth)):
            keys[f"{name}/split{i}"] = child
            for j, grandchild in enumerate(jax.random.split(child, 2)):
                keys[f"{name}/split{i}/{j}"] = grandchild
    ids = jnp.arange(clients)
    for t in range(rounds):
        keys[f"dp_noise/{t}"] = rng.key(seed, Stream.DP_NOISE, t)
        for c, k in enumerate(rng.client_keys(seed, t, ids)):
            keys[f"round{t}/client{c}"] = k
            keys[f"round{t}/client{c}/batch"] = rng.sub(k, Stream.CLIENT_BATCH)
            keys[f"round{t}/client{c}/holdout"] = rng.sub(k, Stream.CLIENT_HOLDOUT)
            for e in range(epochs):
                keys[f"round{t}/client{c}/epoch{e}"] = rng.sub(k, Stream.CLIENT_EPOCH, e)
            for i in range(steps):
                keys[f"round{t}/client{c}/dropout{i}"] = dropout_key(k, i)
    for c, k in enumerate(rng.split_keys(seed, ids)):
        keys[f"split/client{c}"] = k
    return {name: tuple(np.asarray(jax.random.key_data(k)).tolist()) for name, k in keys.items()}


def test_every_derived_key_of_a_run_is_distinct():
    keys = _run_keys(seed=0, rounds=5, clients=6, steps=6, epochs=3, depth=12)
    by_value: dict[tuple, list[str]] = {}
    for name, value in keys.items():
        by_value.setdefault(value, []).append(name)
    clashes = [names for names in by_value.values() if len(names) > 1]
    assert not clashes, clashes[:5]
    assert len(keys) == 2 * (1 + 12 + 24) + 5 * (1 + 6 * (3 + 3 + 6)) + 6  # 445 keys


def test_stream_tags_are_distinct_and_far_from_split_indices():
    base = jax.random.key(0)
    # split's children are fold_in's small indices; every stream tag is far above them.
    assert np.array_equal(jax.random.key_data(jax.random.split(base, 3)[2]), jax.random.key_data(jax.random.fold_in(base, 2)))
    assert min(int(s) for s in Stream) > 1 << 24
    assert len({int(s) for s in Stream}) == len(Stream)


def test_numpy_streams_differ_per_purpose_and_path():
    seeds = {(s.name, path): rng.numpy_seed(7, s, *path)
             for s in Stream for path in [(), (0,), (1,), (0, 0), (0, 1)]}
    assert len(set(seeds.values())) == len(seeds)
    first = {(name, path): rng.numpy(7, Stream[name], *path).integers(1 << 62) for name, path in seeds}
    assert len(set(first.values())) == len(first)
    # Reproducible: the same coordinates give the same stream.
    np.testing.assert_array_equal(rng.numpy(7, Stream.COHORT, 3).permutation(50), rng.numpy(7, Stream.COHORT, 3).permutation(50))


def test_client_keys_do_not_depend_on_the_cohort_or_its_order():
    a = rng.client_keys(3, 4, jnp.array([5, 1, 9]))
    b = rng.client_keys(3, 4, jnp.array([9, 2, 5]))
    data = lambda k: np.asarray(jax.random.key_data(k))
    np.testing.assert_array_equal(data(a[0]), data(b[2]))
    np.testing.assert_array_equal(data(a[2]), data(b[0]))
    for t, c in itertools.product(range(2), range(2)):  # traced round index gives the same key
        traced = jax.jit(lambda t: rng.client_keys(3, t, jnp.array([c])))(t)
        np.testing.assert_array_equal(data(traced[0]), data(rng.key(3, Stream.ROUND, t, c)))
