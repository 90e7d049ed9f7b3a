"""FedAvg of the expert's active LoRA + head, optionally with SAL (FedMS stage 1) and FedProx.

Clients train the active units (top-k blocks' LoRA and the head) from the broadcast server
values and upload their deltas; the server averages them weighted by example count and applies
its optimizer (FedAvg: SGD lr 1; FedAdam) to those units only. With ``prox_mu > 0`` the local
loss adds ``mu/2 ||theta - theta_server||^2`` over the trained units (FedProx, Li et al. 2020).

Registered as ``fedavg`` (all blocks), ``fedavg_sal`` (the SAL schedule) and ``fedprox``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedms_jax.federated import server as srv
from fedms_jax.federated.algorithms.base import Algorithm, Common, Phase, delta
from fedms_jax.federated.engine import ClientStates, ServerState

PyTree = Any


def prox_term(params: PyTree, anchor: PyTree) -> jax.Array:
    """``1/2 ||params - anchor||^2`` over every leaf."""
    sq = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
    return 0.5 * sum(jax.tree_util.tree_leaves(sq))


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, common: Common, prox_mu: float = 0.0) -> None:
        super().__init__(common)
        if prox_mu < 0:
            raise ValueError(f"fedprox.mu must be >= 0, got {prox_mu}")
        self.prox_mu = float(prox_mu)

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]:
        trainable = self.init_expert(rng)
        server = ServerState(trainable, srv.init_server_opt(self.c.server_optimizer, trainable))
        return server, ClientStates(participation=jnp.zeros((num_clients,), jnp.int32), local={})

    def broadcast(self, server: ServerState, phase: Phase) -> PyTree:
        return self.active(server.trainable, phase)

    def local_problem(self, down, state, phase):
        return down, (down if self.prox_mu > 0 else None)

    def loss(self, params, anchor, backbone, images, labels, rng, *, phase):
        loss = self.expert_loss(backbone, params, images, labels, phase, rng)
        if self.prox_mu > 0:
            loss = loss + self.prox_mu * prox_term(params, anchor)
        return loss, {}

    def finish(self, down, state, old, new, phase):
        return delta(new, old), state

    def predict(self, backbone, down, state, images, phase):
        return jax.nn.log_softmax(self.predict_global(backbone, down, images, phase)), {}

    def predict_global(self, backbone, down, images, phase):
        return self.expert_logits(backbone, down, images, phase)
