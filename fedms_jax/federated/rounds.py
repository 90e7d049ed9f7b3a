"""The round program: cohort sampling, one jitted function per phase, evaluation programs.

A round is ``(server state, client states, round index, cohort ids) -> (new states, metrics)``
(``Engine.run_round``):

1. gather the cohort's data, persistent states and keys (``Engine.gather``);
2. ``down = stage.broadcast(server, phase)``;
3. ``placement.map_reduce(client_update, (backbone, down), cohort)`` -> per-unit means and
   totals, new client states, metrics (``federated.client``, ``federated.placement``);
4. ``stage.server_update`` (``federated.server``), scatter the states back.

With the ``Vmap`` backend that is one ``jax.jit`` program per distinct ``Phase`` (the only
static argument; the round index is traced), cached on the engine, so a run compiles once per
phase and never per round. The backbone and the data are arguments, never closed-over
constants (XLA would embed them in the program).

Randomness: client c in round t uses ``fold_in(fold_in(key(seed), t), c)``, and the cohort of
round t is drawn from ``(seed, t)``, so results do not depend on devices, chunking or resumes.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.data.clients import ClientData
from fedms_jax.federated import evaluation, sharding
from fedms_jax.federated.client import client_update
from fedms_jax.federated.placement import Placement, replicated
from fedms_jax.federated.types import ClientOutput, ClientStates, Phase, ServerState, tree_where

PyTree = Any
EXCLUDED = "excluded"


def sample_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform without replacement, seeded by (seed, round): a resumed run draws the same."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort_size must be in [1, {num_clients}], got {cohort_size}")
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, cohort_size, replace=False)).astype(np.int32)


def client_keys(seed_key: jax.Array, round_index: jax.Array, cohort_ids: jax.Array) -> jax.Array:
    rk = jax.random.fold_in(seed_key, round_index)
    return jax.vmap(lambda c: jax.random.fold_in(rk, c))(cohort_ids)


def _all_finite(tree: PyTree) -> jax.Array:
    flags = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.ones((), bool)


def guard(update: Callable) -> Callable:
    """A client whose upload, new state or metrics hold NaN/Inf, or that has no examples, gets
    weight 0 in every unit and a zero upload (so it cannot poison a mean), keeps its old state,
    and is counted in the round's ``excluded_clients``."""

    def guarded(broadcast, client):
        out = update(broadcast, client)
        ok = (client["count"] > 0) & _all_finite((out.upload, out.state, out.metrics))
        return ClientOutput(
            upload=jax.tree_util.tree_map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out.upload),
            weight=jax.tree_util.tree_map(lambda w: jnp.where(ok, w, 0.0), out.weight),
            state=tree_where(ok, out.state, client["state"]),
            metrics={
                **jax.tree_util.tree_map(lambda m: jnp.where(ok, m, 0.0), out.metrics),
                EXCLUDED: 1.0 - ok.astype(jnp.float32),
            },
        )

    return guarded


class Engine:
    """Runs rounds and evaluations of an algorithm over stacked client data.

    Args:
      algorithm: the federated algorithm (``algorithms.Algorithm``).
      backbone: the frozen backbone params (laid out by ``strategy`` on ``mesh``).
      data: the clients' training data (``ClientData``; placed replicated here).
      seed: the run's seed.
      placement: ``placement.Vmap`` (one jitted round) or ``placement.Sequential``; its mesh
        (default: every device on 'clients') is where the backbone, data and states live.
      strategy: how the backbone is laid out over the 'model' axis (``sharding.RULES``).
      eval_clients: clients evaluated at once (vmapped) in personalised evaluation.
      eval_batch: examples per evaluation batch inside a client (and per global-test batch).
    """

    def __init__(
        self, algorithm, backbone: PyTree, data: ClientData, *, seed: int, placement: Placement,
        strategy: str = "replicated", eval_clients: int = 8, eval_batch: int = 256,
    ) -> None:
        self.algorithm = algorithm
        self.placement = placement
        mesh = placement.mesh if placement.mesh is not None else sharding.make_mesh()
        self.mesh = mesh
        self.strategy = strategy
        self.backbone = jax.device_put(backbone, sharding.shardings(backbone, mesh, strategy))
        self.data = jax.device_put(data, replicated(mesh))
        self.seed = seed
        self.seed_key = jax.random.key(seed)
        self.eval_clients = eval_clients
        self.eval_batch = eval_batch
        self.num_traces = 0  # how many round programs were traced (= compiled)
        self._programs: dict[tuple, Callable] = {}  # (kind, phase, ...) -> program or client fn

    def _cached(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        if key not in self._programs:
            self._programs[key] = make()
        return self._programs[key]

    def place(self, tree: PyTree) -> PyTree:
        """Commits server/client states to the mesh (replicated), as the round's outputs are, so
        the first round and every later one see the same input shardings (no recompile)."""
        return jax.device_put(tree, replicated(self.mesh))

    @property
    def compiled_phases(self) -> list[Phase]:
        """The phases whose round program was jitted (none for the sequential backend)."""
        return [key[1] for key in self._programs if key[0] == "round"] if self.placement.jitted else []

    # --- training ---------------------------------------------------------------------------
    def client_fn(self, phase: Phase) -> Callable:
        """The guarded ``client_update`` of the phase's stage (one per phase, per engine)."""
        return self._cached(("client", phase), lambda: guard(
            client_update(self.algorithm.stage(phase), phase, self.algorithm.settings)))

    def gather(self, data: ClientData, clients: ClientStates, cohort_ids: jax.Array, round_index: jax.Array) -> PyTree:
        """One round's per-client inputs [cohort, ...]: id, images, labels, count, key, state."""
        take = lambda x: x[cohort_ids]
        return {
            "id": cohort_ids,
            "images": take(data.images),
            "labels": take(data.labels),
            "count": take(data.counts),
            "key": client_keys(self.seed_key, round_index, cohort_ids),
            "state": jax.tree_util.tree_map(take, clients.local),
        }

    def _round(self, server, clients, round_index, cohort_ids, backbone, data, *, phase):
        stage = self.algorithm.stage(phase)
        if self.placement.jitted:
            self.num_traces += 1
            backbone = sharding.constrain(backbone, self.mesh, self.strategy)
        cohort = self.gather(data, clients, cohort_ids, round_index)
        broadcast = (backbone, stage.broadcast(server, phase))
        mean, totals, states, metrics = self.placement.map_reduce(self.client_fn(phase), broadcast, cohort)
        server = stage.server_update(server, mean, totals, phase)
        excluded = metrics.pop(EXCLUDED)
        clients = ClientStates(
            participation=clients.participation.at[cohort_ids].add(1 - excluded.astype(jnp.int32)),
            local=jax.tree_util.tree_map(lambda all_, new: all_.at[cohort_ids].set(new), clients.local, states),
        )
        weights = cohort["count"].astype(jnp.float32) * (1.0 - excluded)
        out = {name: jnp.sum(v * weights) / jnp.maximum(weights.sum(), 1.0) for name, v in metrics.items()}
        out["excluded_clients"] = excluded.sum()
        return server, clients, out

    def round_fn(self, phase: Phase) -> Callable:
        """The round at ``phase``: jitted (donating the states) for ``Vmap``; for ``Sequential`` a
        Python function driving one jitted client at a time."""
        body = lambda s, c, t, ids, b, d: self._round(s, c, t, ids, b, d, phase=phase)
        return self._cached(("round", phase), lambda: jax.jit(body, donate_argnums=(0, 1)) if self.placement.jitted else body)

    def run_round(
        self, server: ServerState, clients: ClientStates, round_index: int, phase: Phase, cohort_ids: np.ndarray
    ) -> tuple[ServerState, ClientStates, dict]:
        """One round at ``phase`` (``algorithm.phase(round_index)``) over ``cohort_ids``."""
        ids = jnp.asarray(cohort_ids, jnp.int32)
        t = jnp.asarray(round_index, jnp.int32)
        return self.round_fn(phase)(server, clients, t, ids, self.backbone, self.data)

    # --- evaluation -------------------------------------------------------------------------
    def _program(self, key: tuple, make_body: Callable[[], Callable]) -> Callable:
        """The evaluation program ``key`` (everything read at trace time is in it), made once."""
        def make():
            body = make_body()
            return jax.jit(body) if self.placement.jitted else body

        return self._cached(key, make)

    def _replicate(self, tree: PyTree) -> PyTree:
        """Evaluation sums, gathered onto every device (a few scalars per client), so every
        process of a multi-host job can read them."""
        if not self.placement.jitted:
            return tree
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, replicated(self.mesh)), tree)

    def evaluate_clients(self, server: ServerState, clients: ClientStates, phase: Phase, test: ClientData) -> dict[str, np.ndarray]:
        """Every client's personalised model on its own test split (``test``: padded per-client
        test data [clients, max_t, ...]). Returns per-client arrays [clients]: ``count``,
        ``correct``, ``nll`` (summed) and the sum of every per-example extra (e.g. ``gate_local``)."""
        batch, chunk = self.eval_batch, self.eval_clients

        def make_body():
            fn = evaluation.personal_eval_fn(self.algorithm, phase, batch)

            def body(server, clients, backbone, test):
                down = self.algorithm.stage(phase).broadcast(server, phase)
                per_client = {"images": test.images, "labels": test.labels, "count": test.counts, "state": clients.local}
                return self._replicate(self.placement.map(fn, (backbone, down), per_client, chunk_size=chunk))

            return body

        out = self._program(("personal", phase, batch, chunk), make_body)(server, clients, self.backbone, test)
        return {"count": np.asarray(test.counts), **{name: np.asarray(v) for name, v in out.items()}}

    def evaluate_global(self, server: ServerState, phase: Phase, images: jax.Array, labels: jax.Array) -> tuple[float, float]:
        """The global model on a whole test set, split over the devices: -> (mean loss, accuracy)."""
        if not self.algorithm.has_global_model:
            raise TypeError(f"algorithm {self.algorithm.name!r} has no global model")
        batch, shards = self.eval_batch, self.placement.num_devices

        def make_body():
            fn = evaluation.global_eval_fn(self.algorithm, phase, batch)

            def body(server, backbone, images, labels):
                down = self.algorithm.stage(phase).broadcast(server, phase)
                out = self.placement.map(fn, (backbone, down), evaluation.shard_test_set(images, labels, shards))
                return self._replicate({name: v.sum() for name, v in out.items()})

            return body

        out = self._program(("global", phase, batch), make_body)(server, self.backbone, images, labels)
        n = labels.shape[0]
        return float(out["nll"]) / n, float(out["correct"]) / n

