"""The round engine: cohort sampling, one jitted function per round and SAL level, evaluation.

A round is ``(server state, client states, round index, cohort ids) -> (new states, metrics)``:
broadcast the active part of the server state, run every cohort client (``placement``), average
the uploads weighted by example count, apply the server optimizer, scatter the clients' new
persistent state back into the stacked client states. With the ``vmap`` backend that is one
``jax.jit`` program per distinct SAL level k (k is the only static argument; the round index is
traced), cached, so a run compiles once per k and never per round.

Randomness: client c in round t uses ``fold_in(fold_in(key(seed), t), c)``, and the cohort of
round t is drawn from ``(seed, t)``, so results do not depend on devices, chunking or resumes.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedms_jax.data.clients import ClientData
from fedms_jax.federated import placement, sharding
from fedms_jax.federated.placement import ClientOutput
from fedms_jax.federated.server import tree_bytes
from fedms_jax.train import cross_entropy

if TYPE_CHECKING:
    from fedms_jax.federated.algorithms.base import Algorithm, Phase

PyTree = Any


@flax.struct.dataclass
class ServerState:
    """trainable: the full tree (all blocks); opt_state: one server-optimizer state per unit."""

    trainable: PyTree
    opt_state: PyTree


@flax.struct.dataclass
class ClientStates:
    """Persistent per-client state, stacked: leading axis = client id.

    participation: int32 [num_clients], rounds each client has trained in.
    local: algorithm-specific state (e.g. FedMS local experts); ``{}`` when there is none.
    """

    participation: jax.Array
    local: PyTree


EXCLUDED = "excluded"


def _all_finite(tree: PyTree) -> jax.Array:
    flags = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.ones((), bool)


def _where(flag: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def _flops(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def sample_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform without replacement, seeded by (seed, round): a resumed run draws the same."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort_size must be in [1, {num_clients}], got {cohort_size}")
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, cohort_size, replace=False)).astype(np.int32)


def client_keys(seed_key: jax.Array, round_index: jax.Array, cohort_ids: jax.Array) -> jax.Array:
    rk = jax.random.fold_in(seed_key, round_index)
    return jax.vmap(lambda c: jax.random.fold_in(rk, c))(cohort_ids)


class Engine:
    """Runs rounds of an algorithm over stacked client data.

    Args:
      algorithm: the federated algorithm.
      backbone: the frozen backbone params (replicated on every device).
      data: the clients' training data (``ClientData``; placed replicated here).
      seed: the run's seed.
      backend: 'vmap' (one jitted round, sharded over ``mesh``) or 'sequential'.
      chunk_size: clients per vmapped chunk (None = whole cohort at once).
      mesh: a ('clients', 'model') mesh (default: all devices on 'clients').
      strategy: how the backbone is laid out over the 'model' axis (``sharding.RULES``).
      eval_clients: clients evaluated at once (vmapped) in personalised evaluation.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        backbone: PyTree,
        data: ClientData,
        *,
        seed: int,
        backend: str = "vmap",
        chunk_size: int | None = None,
        mesh: Mesh | None = None,
        strategy: str = "replicated",
        eval_clients: int = 8,
    ) -> None:
        if backend not in ("vmap", "sequential"):
            raise ValueError(f"placement.backend must be 'vmap' or 'sequential', got {backend!r}")
        self.algorithm = algorithm
        self.backend = backend
        self.chunk_size = chunk_size or None
        self.mesh = mesh if mesh is not None else placement.make_mesh()
        self.strategy = strategy
        rep = placement.replicated(self.mesh)
        self.backbone = jax.device_put(backbone, sharding.shardings(backbone, self.mesh, strategy))
        self.data = jax.device_put(data, rep)
        self.seed = seed
        self.seed_key = jax.random.key(seed)
        self.num_traces = 0  # how many round programs were traced (= compiled)
        self.eval_clients = eval_clients
        self._rounds: dict[Phase, Callable] = {}
        self._evals: dict[tuple, Callable] = {}
        self._guarded: dict[Phase, Callable] = {}

    def place(self, tree: PyTree) -> PyTree:
        """Commits server/client states to the mesh (replicated), as the round's outputs are, so
        the first round and every later one see the same input shardings (no recompile)."""
        return jax.device_put(tree, placement.replicated(self.mesh))

    def _gather(self, data: ClientData, clients: ClientStates, cohort_ids: jax.Array, round_index: jax.Array) -> PyTree:
        take = lambda x: x[cohort_ids]
        return {
            "id": cohort_ids,
            "images": take(data.images),
            "labels": take(data.labels),
            "count": take(data.counts),
            "key": client_keys(self.seed_key, round_index, cohort_ids),
            "state": jax.tree_util.tree_map(take, clients.local),
        }

    def _round(self, server, clients, round_index, cohort_ids, backbone, data, *, phase, sequential=False):
        algo = self.algorithm
        if not sequential:
            backbone = sharding.constrain(backbone, self.mesh, self.strategy)
        per_client = self._gather(data, clients, cohort_ids, round_index)
        broadcast = (backbone, algo.broadcast(server, phase))
        fn = self.guarded_client_fn(phase)
        if sequential:
            mean, total, states, metrics = placement.map_reduce_sequential(fn, broadcast, per_client)
        else:
            self.num_traces += 1
            mean, total, states, metrics = placement.map_reduce(
                fn, broadcast, per_client, mesh=self.mesh, chunk_size=self.chunk_size
            )
        # A round where every client was excluded leaves the server as it was (even FedAdam).
        server = _where(total > 0, algo.server_update(server, mean, phase), server)
        excluded = metrics.pop(EXCLUDED)
        clients = ClientStates(
            participation=clients.participation.at[cohort_ids].add(1 - excluded.astype(jnp.int32)),
            local=jax.tree_util.tree_map(lambda all_, new: all_.at[cohort_ids].set(new), clients.local, states),
        )
        weights = per_client["count"].astype(jnp.float32) * (1.0 - excluded)
        out = {name: jnp.sum(v * weights) / jnp.maximum(weights.sum(), 1.0) for name, v in metrics.items()}
        out["total_weight"] = total
        out["excluded_clients"] = excluded.sum()
        return server, clients, out

    def guarded_client_fn(self, phase: Phase) -> Callable:
        """The algorithm's client function, guarded: a client whose upload, new state or metrics
        hold NaN/Inf, or that has no examples, gets weight 0 and a zero upload (so it cannot
        poison the weighted mean), keeps its old state, and is counted in ``excluded_clients``."""
        if phase not in self._guarded:
            fn = self.algorithm.client_fn(phase)

            def guarded(broadcast, client):
                out = fn(broadcast, client)
                ok = (client["count"] > 0) & _all_finite((out.upload, out.state, out.metrics))
                return ClientOutput(
                    upload=jax.tree_util.tree_map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out.upload),
                    weight=jnp.where(ok, out.weight, 0.0),
                    state=_where(ok, out.state, client["state"]),
                    metrics={
                        **jax.tree_util.tree_map(lambda m: jnp.where(ok, m, 0.0), out.metrics),
                        EXCLUDED: 1.0 - ok.astype(jnp.float32),
                    },
                )

            self._guarded[phase] = guarded
        return self._guarded[phase]

    def round_fn(self, phase: Phase) -> Callable:
        """The compiled round for a phase (stage, SAL level k), cached."""
        if phase not in self._rounds:
            # The backbone and the data are arguments, not closed-over constants: XLA would
            # otherwise embed them in the program.
            body = lambda s, c, t, ids, b, d: self._round(s, c, t, ids, b, d, phase=phase)
            self._rounds[phase] = jax.jit(body, donate_argnums=(0, 1))
        return self._rounds[phase]

    def run_round(
        self, server: ServerState, clients: ClientStates, round_index: int, phase: Phase, cohort_ids: np.ndarray
    ) -> tuple[ServerState, ClientStates, dict]:
        """One round at ``phase`` (``algorithm.phase(round_index)``) over ``cohort_ids``."""
        ids = jnp.asarray(cohort_ids, jnp.int32)
        t = jnp.asarray(round_index, jnp.int32)
        if self.backend == "sequential":
            return self._round(server, clients, t, ids, self.backbone, self.data, phase=phase, sequential=True)
        return self.round_fn(phase)(server, clients, t, ids, self.backbone, self.data)

    # --- accounting ------------------------------------------------------------------------
    def _one_client(self, server: ServerState, clients: ClientStates, phase: Phase):
        """Abstract shapes of one client's round at ``phase``: (client_fn, broadcast, client)."""
        per_client = jax.eval_shape(lambda: self._gather(self.data, clients, jnp.zeros((1,), jnp.int32), jnp.zeros((), jnp.int32)))
        one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), per_client)
        down = jax.eval_shape(lambda s: self.algorithm.broadcast(s, phase), server)
        return self.algorithm.client_fn(phase), (self.backbone, down), one

    def bytes_per_client(self, server: ServerState, clients: ClientStates, phase: Phase) -> tuple[int, int]:
        """(download, upload) bytes of one client in a round at ``phase``: the broadcast tree
        and the upload tree (for a frozen global expert the broadcast is an upper bound: a real
        client could cache it)."""
        fn, (backbone, down), one = self._one_client(server, clients, phase)
        out = jax.eval_shape(fn, (backbone, down), one)
        return tree_bytes(down), tree_bytes(out.upload)

    def trainable_params(self, server: ServerState, clients: ClientStates, phase: Phase) -> int:
        """How many parameters one client trains at ``phase`` (the local problem's params)."""
        _, (_, down), one = self._one_client(server, clients, phase)
        params, _ = jax.eval_shape(lambda d, st: self.algorithm.local_problem(d, st, phase), down, one["state"])
        return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

    def client_flops(self, server: ServerState, clients: ClientStates, phase: Phase) -> float:
        """FLOPs of one client's local training at ``phase``, from XLA's cost analysis.

        The analysis counts a ``scan`` body once, so the compiled client is the once-per-round
        work (the frozen ``precompute`` when the client caches it) plus one step: the client's
        training FLOPs are ``once + local_steps * (compiled - once)``.
        """
        algo = self.algorithm
        fn, broadcast, one = self._one_client(server, clients, phase)
        total = _flops(jax.jit(fn).lower(broadcast, one))
        once = 0.0
        if algo.uses_cache(one["images"].shape[0]):
            def pre(backbone, down, client):
                _, ctx = algo.local_problem(down, client["state"], phase)
                return algo.precompute(backbone, ctx, algo.prep(client["images"]), phase=phase)

            once = _flops(jax.jit(pre).lower(*broadcast, one))
        return once + algo.c.local_steps * (total - once)

    # --- evaluation ------------------------------------------------------------------------
    def evaluate_clients(
        self, server: ServerState, clients: ClientStates, phase: Phase, test: ClientData
    ) -> dict[str, np.ndarray]:
        """Every client's personalised model on its own test split.

        test: padded per-client test data [clients, max_t, ...]. Returns per-client arrays
        [clients]: ``count`` (test examples), ``correct``, ``nll`` (summed) and the sum of every
        per-example extra (e.g. ``gate_local``). Clients are mapped in batches of
        ``eval_clients`` (``lax.map`` with vmapped batches); compiled once per phase.
        """
        key = ("personal", phase)
        if key not in self._evals:
            self._evals[key] = jax.jit(functools.partial(self._evaluate_clients, phase=phase))
        out = self._evals[key](server, clients, self.backbone, test)
        return {name: np.asarray(v) for name, v in out.items()}

    def _evaluate_clients(self, server, clients, backbone, test, *, phase):
        algo = self.algorithm
        down = algo.broadcast(server, phase)
        max_t = test.labels.shape[1]

        def one(c):
            x = algo.prep(c["images"])
            log_p, extras = algo.predict(backbone, down, c["state"], x, phase)
            mask = (jnp.arange(max_t) < c["count"]).astype(jnp.float32)
            nll = -jnp.take_along_axis(log_p, c["labels"][:, None], axis=-1)[:, 0]
            out = {"correct": jnp.sum((log_p.argmax(-1) == c["labels"]) * mask), "nll": jnp.sum(nll * mask)}
            out.update({name: jnp.sum(v * mask) for name, v in extras.items()})
            return out

        per_client = {"images": test.images, "labels": test.labels, "count": test.counts, "state": clients.local}
        out = jax.lax.map(one, per_client, batch_size=min(self.eval_clients, test.num_clients))
        return {"count": test.counts, **out}

    def evaluate_global(
        self, server: ServerState, phase: Phase, images: jax.Array, labels: jax.Array, batch_size: int = 256
    ) -> tuple[float, float]:
        """The global model on a whole test set: -> (mean loss, accuracy). Compiled once per
        phase (the set is padded to whole batches and masked)."""
        key = ("global", phase)
        if key not in self._evals:
            self._evals[key] = jax.jit(functools.partial(self._evaluate_global, phase=phase, batch_size=batch_size))
        loss, acc = self._evals[key](server, self.backbone, images, labels)
        return float(loss), float(acc)

    def _evaluate_global(self, server, backbone, images, labels, *, phase, batch_size):
        algo = self.algorithm
        down = algo.broadcast(server, phase)
        n = labels.shape[0]
        nb = -(-n // batch_size)
        pad = nb * batch_size - n
        x = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)).reshape((nb, batch_size) + images.shape[1:])
        y = jnp.pad(labels, (0, pad)).reshape(nb, batch_size)
        mask = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)

        def one(batch):
            xb, yb, mb = batch
            logits = algo.predict_global(backbone, down, algo.prep(xb), phase)
            losses = cross_entropy(logits, yb, mb) * mb.sum()
            return losses, ((logits.argmax(-1) == yb) * mb).sum()

        losses, correct = jax.lax.map(one, (x, y, mask))
        return losses.sum() / n, correct.sum() / n
