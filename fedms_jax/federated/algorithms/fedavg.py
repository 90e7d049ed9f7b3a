"""FedAvg of the expert's active LoRA + head, with the SAL schedule (FedMS stage 1).

Clients train the active units (top-k blocks' LoRA and the head) from the broadcast server
values and upload their deltas; the server averages them weighted by example count and applies
its optimizer (FedAvg: SGD lr 1; FedAdam) to those units only.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax.federated import server as srv
from fedms_jax.federated.client import make_local_train
from fedms_jax.federated.engine import ClientStates, ServerState
from fedms_jax.federated.placement import ClientOutput
from fedms_jax.models.expert import Expert

PyTree = Any


class FedAvg:
    """FedAvg-LoRA with SAL.

    Args:
      expert: the model.
      client_optimizer: local optimizer (fresh state every round).
      server_optimizer: applied to the pseudo-gradient ``-mean delta``.
      local_steps, batch_size: local work per round.
      stats: (mean, std) for preprocessing.
      init_head: initial head params (e.g. CLIP zero-shot embeddings), or None for a fresh one.
    """

    def __init__(
        self,
        expert: Expert,
        client_optimizer: optax.GradientTransformation,
        server_optimizer: optax.GradientTransformation,
        local_steps: int,
        batch_size: int,
        stats: tuple[tuple[float, ...], tuple[float, ...]],
        init_head: PyTree | None = None,
    ) -> None:
        self.expert = expert
        self.client_optimizer = client_optimizer
        self.server_optimizer = server_optimizer
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.stats = stats
        self.init_head = init_head

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]:
        trainable = self.expert.init_trainable(rng, head=self.init_head)
        server = ServerState(trainable, srv.init_server_opt(self.server_optimizer, trainable))
        clients = ClientStates(participation=jnp.zeros((num_clients,), jnp.int32), local={})
        return server, clients

    def active_names(self, num_active: int) -> list[str]:
        return srv.active_units(num_active, self.expert.num_layers)

    def broadcast(self, server: ServerState, num_active: int) -> PyTree:
        return srv.select(server.trainable, self.active_names(num_active))

    @functools.lru_cache(maxsize=None)
    def client_fn(self, num_active: int) -> Callable[[PyTree, PyTree], ClientOutput]:
        local_train = make_local_train(
            self.expert, self.client_optimizer, num_active, self.local_steps, self.batch_size, self.stats
        )

        def client_fn(broadcast, client):
            backbone, active = broadcast
            new, loss = local_train(
                backbone, active, client["images"], client["labels"], client["count"], client["key"]
            )
            delta = jax.tree_util.tree_map(jnp.subtract, new, active)
            return ClientOutput(
                upload=delta,
                weight=client["count"].astype(jnp.float32),
                state=client["state"],
                metrics={"loss": loss},
            )

        return client_fn

    def server_update(self, server: ServerState, mean_upload: PyTree, num_active: int) -> ServerState:
        trainable, opt_state = srv.apply_server_update(
            self.server_optimizer, server.trainable, server.opt_state, mean_upload
        )
        return ServerState(trainable, opt_state)

    def bytes_per_client(self, server: ServerState, num_active: int) -> tuple[int, int]:
        """(download, upload) bytes of one client in a round at level k: the active units."""
        n = srv.tree_bytes(self.broadcast(server, num_active))
        return n, n
