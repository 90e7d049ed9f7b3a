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

from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedms_jax.data.clients import ClientData
from fedms_jax.data.preprocess import preprocess
from fedms_jax.federated import placement
from fedms_jax.federated.placement import ClientOutput
from fedms_jax.models.expert import Expert
from fedms_jax.train import cross_entropy

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


class Algorithm(Protocol):
    """What the engine needs from an algorithm (see ``algorithms/fedavg.py``)."""

    expert: Expert

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]: ...

    def broadcast(self, server: ServerState, num_active: int) -> PyTree: ...

    def client_fn(self, num_active: int) -> Callable[[PyTree, PyTree], ClientOutput]: ...

    def server_update(self, server: ServerState, mean_upload: PyTree, num_active: int) -> ServerState: ...

    def bytes_per_client(self, server: ServerState, num_active: int) -> tuple[int, int]: ...


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
      mesh: a mesh with a 'clients' axis (default: all devices).
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
    ) -> None:
        if backend not in ("vmap", "sequential"):
            raise ValueError(f"placement.backend must be 'vmap' or 'sequential', got {backend!r}")
        self.algorithm = algorithm
        self.backend = backend
        self.chunk_size = chunk_size or None
        self.mesh = mesh if mesh is not None else placement.make_mesh()
        rep = placement.replicated(self.mesh)
        self.backbone = jax.device_put(backbone, rep)
        self.data = jax.device_put(data, rep)
        self.seed = seed
        self.seed_key = jax.random.key(seed)
        self.num_traces = 0  # how many round programs were traced (= compiled)
        self._rounds: dict[int, Callable] = {}

    def place(self, tree: PyTree) -> PyTree:
        """Commits server/client states to the mesh (replicated), as the round's outputs are, so
        the first round and every later one see the same input shardings (no recompile)."""
        return jax.device_put(tree, placement.replicated(self.mesh))

    def _gather(self, clients: ClientStates, cohort_ids: jax.Array, round_index: jax.Array) -> PyTree:
        take = lambda x: x[cohort_ids]
        return {
            "id": cohort_ids,
            "images": take(self.data.images),
            "labels": take(self.data.labels),
            "count": take(self.data.counts),
            "key": client_keys(self.seed_key, round_index, cohort_ids),
            "state": jax.tree_util.tree_map(take, clients.local),
        }

    def _round(self, server, clients, round_index, cohort_ids, backbone, *, num_active, sequential=False):
        algo = self.algorithm
        per_client = self._gather(clients, cohort_ids, round_index)
        broadcast = (backbone, algo.broadcast(server, num_active))
        fn = algo.client_fn(num_active)
        if sequential:
            mean, total, states, metrics = placement.map_reduce_sequential(fn, broadcast, per_client)
        else:
            self.num_traces += 1
            mean, total, states, metrics = placement.map_reduce(
                fn, broadcast, per_client, mesh=self.mesh, chunk_size=self.chunk_size
            )
        server = algo.server_update(server, mean, num_active)
        clients = ClientStates(
            participation=clients.participation.at[cohort_ids].add(1),
            local=jax.tree_util.tree_map(lambda all_, new: all_.at[cohort_ids].set(new), clients.local, states),
        )
        weights = per_client["count"].astype(jnp.float32)
        out = {name: jnp.sum(v * weights) / jnp.maximum(weights.sum(), 1.0) for name, v in metrics.items()}
        out["total_weight"] = total
        return server, clients, out

    def round_fn(self, num_active: int) -> Callable:
        """The compiled round for SAL level k (cached)."""
        if num_active not in self._rounds:
            body = lambda s, c, t, ids, b: self._round(s, c, t, ids, b, num_active=num_active)
            self._rounds[num_active] = jax.jit(body, donate_argnums=(0, 1))
        return self._rounds[num_active]

    def run_round(
        self, server: ServerState, clients: ClientStates, round_index: int, num_active: int, cohort_ids: np.ndarray
    ) -> tuple[ServerState, ClientStates, dict]:
        ids = jnp.asarray(cohort_ids, jnp.int32)
        t = jnp.asarray(round_index, jnp.int32)
        if self.backend == "sequential":
            return self._round(server, clients, t, ids, self.backbone, num_active=num_active, sequential=True)
        return self.round_fn(num_active)(server, clients, t, ids, self.backbone)


def make_evaluator(
    expert: Expert, stats: tuple[tuple[float, ...], tuple[float, ...]], batch_size: int = 256
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """-> ``evaluate(backbone, trainable, images uint8 [N,...], labels [N]) -> (loss, accuracy)``.

    Runs the full model (all blocks with LoRA) in fixed-size batches (``lax.map``), padding the
    last batch and masking it out, so any test-set size compiles once.
    """
    mean, std = stats
    s = expert.spec

    @jax.jit
    def evaluate(backbone, trainable, images, labels, frozen_head=None):
        n = labels.shape[0]
        nb = -(-n // batch_size)
        pad = nb * batch_size - n
        x = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)).reshape((nb, batch_size) + images.shape[1:])
        y = jnp.pad(labels, (0, pad)).reshape(nb, batch_size)
        mask = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)

        def one(batch):
            xb, yb, mb = batch
            xb = preprocess(xb, s.image_size, mean, std, s.num_channels)
            logits = expert.logits(backbone, trainable, xb, s.num_layers, frozen_head=frozen_head)
            losses = cross_entropy(logits, yb, mb) * mb.sum()
            return losses, ((logits.argmax(-1) == yb) * mb).sum()

        losses, correct = jax.lax.map(one, (x, y, mask))
        return losses.sum() / n, correct.sum() / n

    return evaluate
