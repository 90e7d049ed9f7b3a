"""Client side: one client's round (local training with ``lax.scan`` over steps) for any stage.

``client_update(stage, phase, settings)`` is the function every placement backend maps over a
cohort: ``(broadcast, client) -> ClientOutput``. It asks the stage for the local problem
(``client_init``), trains its params on ``stage.loss`` over ``Batch``es of ``Features`` (from
``stage.featurize``), and asks the stage what to upload and keep (``client_final``).

What a client's local training does, beyond the loss (all static per stage and settings):

* **batches**: ``settings.epochs = E > 0`` makes E passes over the client's training examples
  without replacement (a fresh permutation per epoch, padding never drawn, the last partial
  batch masked); otherwise ``settings.local_steps`` batches drawn with replacement.
* **a held-out slice** (``stage.holdout``): that fraction of each client's examples never
  enters ``batch`` in that round; each step also draws ``batch.held`` from it (FedMS's gate
  trains there). The client's examples are in a fixed random order (the same every round); the
  slice is its first ``h`` positions, or with ``stage.rotate_holdout`` the ``h`` positions
  starting at ``participation * h`` (cyclically), so it moves by ``h`` each time the client
  trains: every example is in the training part within two participations and in the held-out
  part once every ``ceil(count / h)`` participations.
* **the client's own statistics** (``stage.observe``): a stage may read the client's training
  labels before the round (FedMS's label prior) and keep what it learns in the client state.
* **segments** (``stage.segments``): consecutive parts of the round's steps that each train
  only some of the params' top-level entries (FedRep: the head, then the body).
* **a depth** (``client['depth']``, ``sal.budget_mode = deadline``): the client trains only the
  top ``depth`` of the block units its level makes active; the others keep their values and
  optimizer states, and are uploaded with weight 0 (``depth_mask``). Their gradients are still
  computed (the vmapped program is the level's): the saving is simulated time, not simulator time.
* **persistent optimizer state** (``stage.persistent``): the optimizer state of those top-level
  entries lives in the client state (``state['opt'][entry][unit]``, one state per unit so an
  SAL level change keeps the units' moments) instead of starting fresh every round.

The client optimizer runs per unit (head, each block's LoRA, ...); the optimizers used here
(SGD, momentum, AdamW) are per-leaf, so this is the same update as one state over the tree.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax import rng, sal
from fedms_jax.rng import Stream
from fedms_jax.federated.ops import init_opt_states, masked_mean
from fedms_jax.federated.protocol import Batch
from fedms_jax.federated.types import ClientOutput, Phase, join_units, split_units, tree_where

PyTree = Any
OPT = "opt"  # the client-state entry holding persistent optimizer states


def uniform_ints(key: jax.Array, shape: tuple[int, ...], count: jax.Array) -> jax.Array:
    """int32 indices of ``shape``, uniform with replacement from ``[0, count)`` (count >= 1; 0
    draws zeros): 32 random bits modulo count, biased by at most count / 2^32. One hash per
    call, where ``jax.random.randint`` runs several: its code was a large part of a round
    program and of its compile time (about 0.3 s of XLA:CPU time per call site)."""
    bits = jax.random.bits(key, shape, jnp.uint32)
    return (bits % jnp.maximum(count, 1).astype(jnp.uint32)).astype(jnp.int32)


def random_order(key: jax.Array, count: jax.Array, size: int) -> jax.Array:
    """A permutation [size] of ``[0, size)`` whose first ``count`` entries are a uniformly random
    order of ``[0, count)`` (the real examples), padding positions after them."""
    u = jax.random.uniform(key, (size,))
    return jnp.argsort(jnp.where(jnp.arange(size) < count, u, 2.0)).astype(jnp.int32)


def holdout_size(count: jax.Array, fraction: float) -> jax.Array:
    """Held-out examples of a client with ``count`` examples: ``floor(fraction * count)``, at
    least 1 when it has 2 or more examples, never all of them."""
    if fraction == 0:
        return jnp.zeros((), jnp.int32)
    h = jnp.floor(fraction * count.astype(jnp.float32)).astype(jnp.int32)
    return jnp.clip(h, jnp.minimum(1, count - 1), jnp.maximum(count - 1, 0))


def num_steps(settings, max_examples: int) -> int:
    """Local steps per round for clients padded to ``max_examples`` (static)."""
    if settings.epochs:
        return settings.epochs * -(-max_examples // settings.batch_size)
    return settings.local_steps


def caches_frozen(max_examples: int, steps: int, batch_size: int) -> bool:
    """Whether running the frozen part once over a client's ``max_examples`` padded examples is
    no more work than running it on every step's batch."""
    return max_examples <= steps * batch_size


def uses_cache(settings, max_examples: int) -> bool:
    """Whether a client with ``max_examples`` padded examples featurizes once per round."""
    return settings.cache_frozen and caches_frozen(max_examples, num_steps(settings, max_examples), settings.batch_size)


def depth_mask(units, depth: jax.Array | None) -> dict[str, jax.Array]:
    """{block unit: whether a client of ``depth`` trains it} over the block units among ``units``
    (the top ``depth`` of them by block index); {} without a depth or blocks."""
    blocks = {u: sal.block_index(u) for u in units if sal.block_index(u) is not None}
    if depth is None or not blocks:
        return {}
    top = max(blocks.values())
    return {u: b > top - depth for u, b in blocks.items()}


def dropout_key(key: jax.Array, i: jax.Array) -> jax.Array:
    """Step i's dropout key."""
    return rng.sub(key, Stream.CLIENT_DROPOUT, i)


class Sampler:
    """Which examples step ``i`` of a round reads, for one client (all static shapes).

    ``order`` [max_n]: the client's examples in a fixed random order (seeded by its split key,
    the same every round); ``held`` of them, from position ``offset`` on (cyclically over the
    ``count`` real ones), are its held-out slice, the ``count - held`` after them its training
    examples. ``offset`` is 0, or ``participation * held`` with ``rotate`` (the slice moves by
    its size each round the client trains). Without a held-out slice the order is the identity.

    The round's draws are made once, before the steps, from streams of the client's round key:
    every step's batch with replacement (``CLIENT_BATCH``, [steps, B]), or one order per epoch
    (``CLIENT_EPOCH``, [E, max_n]), and every step's held-out batch (``CLIENT_HOLDOUT``); a step
    reads its row. (Drawing inside the step loop put a hash per draw into the loop body.)
    """

    def __init__(self, settings, holdout: float, count: jax.Array, max_n: int, key: jax.Array, split_key: jax.Array,
                 participation: jax.Array | None = None, rotate: bool = False):
        self.b, self.epochs, self.max_n, self.key = settings.batch_size, settings.epochs, max_n, key
        self.count = count
        self.held = holdout_size(count, holdout)
        self.train = count - self.held
        self.has_held = holdout > 0
        self.order = random_order(split_key, count, max_n) if self.has_held else None
        self.offset = jnp.zeros((), jnp.int32)
        if self.has_held and rotate:
            p = jnp.zeros((), jnp.int32) if participation is None else participation.astype(jnp.int32)
            self.offset = (p * self.held) % jnp.maximum(count, 1)
        self.per_epoch = -(-max_n // self.b)
        steps = num_steps(settings, max_n)
        if self.epochs:
            keys = jax.vmap(lambda e: rng.sub(key, Stream.CLIENT_EPOCH, e))(jnp.arange(self.epochs))
            perms = jax.vmap(lambda k: random_order(k, self.train, max_n))(keys)
            self._orders = jnp.pad(perms, ((0, 0), (0, self.per_epoch * self.b - max_n)))  # [E, per_epoch * B]
        else:
            self._draws = uniform_ints(rng.sub(key, Stream.CLIENT_BATCH), (steps, self.b), self.train)  # [steps, B]
        if self.has_held:
            self._held_draws = uniform_ints(rng.sub(key, Stream.CLIENT_HOLDOUT), (steps, self.b), self.held)

    def _pick(self, positions: jax.Array, offset: jax.Array) -> jax.Array:
        if self.order is None:
            return positions
        return self.order[(self.offset + offset + positions) % jnp.maximum(self.count, 1)]

    def batch(self, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Step i's training batch -> (indices [B], mask [B] float32)."""
        if not self.epochs:
            return self._pick(self._draws[i], self.held), jnp.ones((self.b,), jnp.float32)
        epoch, j = i // self.per_epoch, i % self.per_epoch
        pos = jax.lax.dynamic_slice(self._orders[epoch], (j * self.b,), (self.b,))
        mask = (j * self.b + jnp.arange(self.b)) < self.train
        return self._pick(jnp.where(mask, pos, 0), self.held), mask.astype(jnp.float32)

    def held_batch(self, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Step i's held-out batch (with replacement) -> (indices [B], mask [B]); mask 0 when the
        client has no held-out example."""
        idx = self._pick(self._held_draws[i], 0)
        return idx, jnp.broadcast_to(self.held > 0, (self.b,)).astype(jnp.float32)


def segment_steps(stage, steps: int) -> list[tuple[tuple[str, ...] | None, int]]:
    """The round's ``steps`` split into the stage's segments: [(entries trained, steps)];
    [(None, steps)] (everything) without segments. Every segment gets at least one step."""
    if not stage.segments:
        return [(None, steps)]
    counts, left = [], steps
    for n, (_, share) in enumerate(stage.segments):
        last = n == len(stage.segments) - 1
        c = left if last else max(1, min(left - (len(stage.segments) - 1 - n), round(share * steps)))
        counts.append(c)
        left -= c
    return [(keys, c) for (keys, _), c in zip(stage.segments, counts)]


def local_train(
    stage, phase: Phase, settings, backbone: PyTree, params: PyTree, ctx: PyTree,
    client: dict, carried_opt: PyTree | None = None,
) -> tuple[PyTree, dict, jax.Array, dict]:
    """One round of local optimisation of ``stage.loss`` -> (params, opt states, mean loss, mean aux).

    ``params`` ({entry: tree}) is what the client differentiates and updates; ``ctx`` the loss's
    fixed inputs. client: {'images' [max_n, ...], 'labels' [max_n], 'count', 'key',
    'split_key'}. The round's draws come from the streams of ``key`` (see ``Sampler``, ``fedms_jax.rng``). When the
    client holds no more examples than its steps would process (static, ``uses_cache``),
    ``stage.featurize`` runs once over all of them and each step gathers its batch from the
    result; otherwise it runs on every step's batch. A step whose batch is all padding (epochs)
    leaves params and optimizer state unchanged.
    """
    optimizer = settings.client_optimizer
    images, labels = client["images"], client["labels"]
    max_n = images.shape[0]
    steps = num_steps(settings, max_n)
    sampler = Sampler(settings, stage.holdout, client["count"], max_n, client["key"], client["split_key"],
                      client.get("participation"), stage.rotate_holdout)
    if uses_cache(settings, max_n):
        frozen = stage.featurize(backbone, ctx, settings.prep(images), phase)
        feats_of = lambda idx: jax.tree_util.tree_map(lambda f: f[idx], frozen)
    else:
        feats_of = lambda idx: stage.featurize(backbone, ctx, settings.prep(images[idx]), phase)

    def make_batch(i):
        idx, mask = sampler.batch(i)
        held = None
        if sampler.has_held:
            h_idx, h_mask = sampler.held_batch(i)
            held = Batch(feats_of(h_idx), labels[h_idx], h_mask)
        return Batch(feats_of(idx), labels[idx], mask, held)

    opt_states = init_opt_states(optimizer, params, carried_opt)
    factors = dict(stage.lr_factors)
    losses, auxes, reals, start = [], [], [], 0
    for keys, count in segment_steps(stage, steps):
        keys = tuple(params) if keys is None else keys
        fixed = {e: v for e, v in params.items() if e not in keys}

        def loss_fn(trained, batch, rng):
            return stage.loss({**fixed, **trained}, ctx, backbone, batch, rng, phase)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(carry, i):
            trained, opt = carry
            batch = make_batch(i)
            rng = dropout_key(client["key"], i) if settings.use_rng else None
            (loss, aux), grads = grad_fn(trained, batch, rng)
            scale = settings.lr_scale(i - start, count) if settings.lr_scale is not None else None
            new_p, new_opt = {}, {}
            for e in trained:
                units_p, units_g = split_units(trained[e]), split_units(grads[e])
                new_units, new_opt[e] = {}, {}
                factor = factors.get(e)
                trains = depth_mask(units_p, client.get("depth"))
                for u, p in units_p.items():
                    upd, new_opt[e][u] = optimizer.update(units_g[u], opt[e][u], p)
                    if scale is not None:
                        upd = jax.tree_util.tree_map(lambda x: x * scale, upd)
                    if factor is not None:
                        upd = jax.tree_util.tree_map(lambda x: x * factor, upd)
                    new_units[u] = optax.apply_updates(p, upd)
                    if u in trains:  # below the client's depth: no step at all
                        new_units[u] = tree_where(trains[u], new_units[u], p)
                        new_opt[e][u] = tree_where(trains[u], new_opt[e][u], opt[e][u])
                new_p[e] = _join_one(trained[e], new_units)
            real = batch.mask.sum() > 0
            if settings.epochs:  # an all-padding batch is no step at all
                keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(real, a, b), new, old)
                new_p, new_opt = keep(new_p, trained), keep(new_opt, opt)
            return (new_p, new_opt), (loss, aux, real.astype(jnp.float32))

        trained0 = {e: params[e] for e in keys}
        opt0 = {e: opt_states[e] for e in keys}
        (trained, opt), (loss, aux, real) = jax.lax.scan(step, (trained0, opt0), jnp.arange(start, start + count))
        params = {**params, **trained}
        opt_states = {**opt_states, **opt}
        losses.append(loss)
        auxes.append(aux)
        reals.append(real)
        start += count
    # Means over the steps that read a real example (epochs: trailing all-padding steps don't count).
    real = jnp.concatenate(reals)
    mean = lambda xs: masked_mean(jnp.concatenate(xs), real)
    aux = jax.tree_util.tree_map(lambda *xs: mean(xs), *auxes)
    return params, opt_states, mean(losses), aux


def _join_one(like: PyTree, units: dict) -> PyTree:
    """Units back into the form of ``like`` (a trainable tree, or a module with plain units)."""
    return join_units(units) if "lora" in like else units


def client_update(stage, phase: Phase, settings) -> Callable[[PyTree, PyTree], ClientOutput]:
    """One client's round at ``phase``: ``(backbone, down), client -> ClientOutput``.

    client: {'images', 'labels', 'count', 'key', 'split_key', 'state'[, 'participation']} of one
    client. Every unit the client uploads is weighted by its example count. Entries in
    ``stage.persistent`` keep their optimizer state in ``state['opt']``. A stage's ``observe``
    sees the client's labels first (and may keep statistics of them in its state).
    """

    def update(broadcast, client):
        backbone, down = broadcast
        state = client["state"]
        if stage.observe is not None:
            real = (jnp.arange(client["labels"].shape[0]) < client["count"]).astype(jnp.float32)
            state = stage.observe(state, client["labels"], real)
        params, ctx = stage.client_init(down, state, phase)
        carried = state[OPT] if stage.persistent else None
        new, opt, loss, aux = local_train(stage, phase, settings, backbone, params, ctx, client, carried)
        upload, new_state = stage.client_final(down, state, params, new, phase)
        if stage.persistent:
            # Entries of another stage's (e.g. the gate head's, in stage 1) pass through unchanged.
            new_state = {**new_state, OPT: {**state[OPT], **{e: {**state[OPT][e], **opt[e]} for e in stage.persistent}}}
        upload = split_units(upload)
        count = client["count"].astype(jnp.float32)
        trains = depth_mask(upload, client.get("depth"))  # a unit it did not train weighs 0
        weight = {name: count * trains[name] if name in trains else count for name in upload}
        return ClientOutput(upload, weight, new_state, {"loss": loss, **aux})

    return update


