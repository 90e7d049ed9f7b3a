"""Named random streams: every random draw of a run comes from ``(seed, stream, *path)``.

A JAX key is ``fold_in(... fold_in(fold_in(key(seed), stream), path[0]) ..., path[-1])`` and
a numpy generator is seeded by a hash of ``(stream, len(path), seed, *path)``, so two draws
for different purposes never share a stream, whatever the round and client numbers are, and a
draw depends only on its own coordinates: not on the devices, the chunk size, the cohort's
order or a resume. The streams:

==============  =================================  =========================================
stream          path                               draws
==============  =================================  =========================================
BACKBONE        ()                                 a random backbone (no ``model.pretrained``)
INIT            ()                                 the initial trainable, server and client states
ROUND           (round, client)                    a client's key in a round; its sub-streams
                                                   ``CLIENT_*`` are folded into it
SPLIT           (client,)                          the client's fixed held-out split
DP_NOISE        (round,)                           the server's Gaussian noise (``dp.*``)
DATA            ()                                 synthetic/embedded data, train/test split (numpy)
SUBSAMPLE       (0 train | 1 test,)                ``data.train_examples``/``test_examples`` (numpy)
PARTITION       ()                                 the clients' training examples (numpy)
TEST_SPLIT      ()                                 the clients' test examples (numpy)
COHORT          (round,)                           a round's uniform cohort (numpy)
BUDGET          (0,) tiers | (1, round) draws      budget tiers (``fedms_jax.budgets``, numpy)
EVAL_SAMPLE     ()                                 the clients of a sampled personalised
                                                   evaluation (``population.eval_sample``, numpy)
VALIDATION      ()                                 the clients' validation splits carved from
                                                   their training data (``data.validation``, numpy)
SYSTEM          (0,) speeds | (1,) bandwidths |    the system model (``fedms_jax.system``, numpy):
                (2, round) availability |          devices drawn once; per round who is
                (3, round) selection |             available, who is selected among them and
                (4, round) dropouts |              who drops out (and when); FedBuff: per
                (6, start) FedBuff selection |     client start j, who starts and whether
                (7, start) FedBuff dropouts        (and when) it drops out
==============  =================================  =========================================

Inside a client's round key (``ROUND``): ``CLIENT_BATCH`` (batches drawn with replacement),
``CLIENT_EPOCH`` then the epoch (an epoch's order), ``CLIENT_HOLDOUT`` (held-out batches),
``CLIENT_DROPOUT`` then the step (dropout). Tags are four ASCII letters read as an integer,
far from the small integers ``jax.random.split`` derives its children with (with the default
partitionable threefry, ``split(k)[i] == fold_in(k, i)``), so a library's own splits inside a
stream cannot land on another stream either. ``tests/test_rng.py`` enumerates a run's keys.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import jax


def _tag(name: str) -> int:
    return int.from_bytes(name.encode("ascii"), "big")


class Stream(enum.IntEnum):
    """Purposes of the random draws (see the module docstring)."""

    BACKBONE = _tag("BKBN")
    INIT = _tag("INIT")
    ROUND = _tag("ROUN")
    SPLIT = _tag("SPLT")
    DP_NOISE = _tag("DPNZ")
    DATA = _tag("DATA")
    SUBSAMPLE = _tag("SUBS")
    PARTITION = _tag("PART")
    TEST_SPLIT = _tag("TSPL")
    COHORT = _tag("COHO")
    BUDGET = _tag("BUDG")
    EVAL_SAMPLE = _tag("EVSM")
    VALIDATION = _tag("VALI")
    CLIENT_BATCH = _tag("BATC")
    CLIENT_EPOCH = _tag("EPOC")
    CLIENT_HOLDOUT = _tag("HOLD")
    CLIENT_DROPOUT = _tag("DROP")
    SYSTEM = _tag("SYST")


RECIPE = "fold_in(key(seed), stream, *path); numpy: SeedSequence([stream, len(path), seed, *path])"


def key(seed: int, stream: Stream, *path) -> jax.Array:
    """The JAX key of ``(seed, stream, *path)``; path entries may be traced int scalars."""
    import jax  # here, not at the top: fedms_jax.config (no jax) imports the numpy streams

    k = jax.random.fold_in(jax.random.key(seed), int(stream))
    for p in path:
        k = jax.random.fold_in(k, p)
    return k


def secret_key_data(bits: int | None = None) -> np.ndarray:
    """Key data (uint32 [2]) of a secret drawn from the OS (``secrets``), for the DP noise: kept
    in memory only, passed to programs as an argument. ``bits``: a given 64-bit secret (tests)."""
    import secrets

    bits = secrets.randbits(64) if bits is None else int(bits)
    return np.array([(bits >> 32) & 0xFFFFFFFF, bits & 0xFFFFFFFF], np.uint32)


def secret_key(data: jax.Array, stream: Stream, *path) -> jax.Array:
    """The JAX key of ``(secret, stream, *path)`` from secret key data (``secret_key_data``;
    may be traced)."""
    import jax

    k = jax.random.fold_in(jax.random.wrap_key_data(data, impl="threefry2x32"), int(stream))
    for p in path:
        k = jax.random.fold_in(k, p)
    return k


def sub(parent: jax.Array, stream: Stream, *path) -> jax.Array:
    """A sub-stream of ``parent`` (a client's round key): ``fold_in(parent, stream, *path)``."""
    import jax

    k = jax.random.fold_in(parent, int(stream))
    for p in path:
        k = jax.random.fold_in(k, p)
    return k


def client_keys(seed: int, round_index: jax.Array, client_ids: jax.Array) -> jax.Array:
    """Round ``round_index``'s keys of ``client_ids`` [m] -> [m] keys ``(seed, ROUND, t, c)``."""
    import jax
    import jax.numpy as jnp

    rk = key(seed, Stream.ROUND, round_index)
    return jax.vmap(lambda c: jax.random.fold_in(rk, c))(jnp.asarray(client_ids))


def split_keys(seed: int, client_ids: jax.Array) -> jax.Array:
    """The clients' held-out split keys ``(seed, SPLIT, c)`` [m] (the same every round)."""
    import jax
    import jax.numpy as jnp

    sk = key(seed, Stream.SPLIT)
    return jax.vmap(lambda c: jax.random.fold_in(sk, c))(jnp.asarray(client_ids))


def numpy_seed(seed: int, stream: Stream, *path: int) -> int:
    """A 64-bit integer seed for ``np.random.default_rng`` of ``(seed, stream, *path)``."""
    entropy = [int(stream), len(path), int(seed), *(int(p) for p in path)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def numpy(seed: int, stream: Stream, *path: int) -> np.random.Generator:
    """The numpy generator of ``(seed, stream, *path)``."""
    return np.random.default_rng(numpy_seed(seed, stream, *path))
