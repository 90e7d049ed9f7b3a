"""FedAvg of the expert's active LoRA + head, optionally with SAL (FedMS stage 1) and FedProx.

Clients train the active units (top-k blocks' LoRA and the head) from the broadcast server
values and upload their deltas; the server averages each unit over the clients that trained it,
weighted by example count, and applies its optimizer (FedAvg: SGD lr 1; FedAdam). With
``prox_mu > 0`` the local loss adds ``mu/2 ||theta - theta_server||^2`` over the trained units
(FedProx, Li et al. 2020).

``make_algorithm`` builds it as ``fedavg`` (all blocks), ``fedavg_sal`` (the SAL schedule) and
``fedprox``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedms_jax.algorithms.common import expert_logits, expert_stage, fresh_clients
from fedms_jax.federated.ops import cross_entropy
from fedms_jax.federated.protocol import Algorithm, Settings, Stage, single
from fedms_jax.config import FedProxConfig
from fedms_jax.federated import server as srv

PyTree = Any


def prox_term(params: PyTree, anchor: PyTree) -> jax.Array:
    """``1/2 ||params - anchor||^2`` over every leaf."""
    sq = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
    return 0.5 * sum(jax.tree_util.tree_leaves(sq))


def init_expert(settings: Settings, rng: jax.Array) -> dict:
    return settings.expert.init_trainable(rng, head=settings.init_head)


def fedavg_init(settings: Settings):
    def init(rng, num_clients):
        return srv.init_server(settings.server_optimizer, init_expert(settings, rng)), fresh_clients(num_clients)

    return init


def fedavg_stage(settings: Settings, prox_mu: float = 0.0) -> Stage:
    """Stage 1 of every federated method here: FedAvg (or FedProx, ``prox_mu > 0``) of the
    global expert."""
    if prox_mu == 0:
        return expert_stage(settings)

    def loss(params, anchor, backbone, batch, rng, phase):
        logits = expert_logits(settings, backbone, params, batch.features.branch.hidden, phase, rng)
        return cross_entropy(logits, batch.labels, batch.mask) + prox_mu * prox_term(params, anchor), {}

    return expert_stage(settings, client_init=lambda down, state, phase: (down, down), loss=loss)


def fedavg(settings: Settings, name: str = "fedavg") -> Algorithm:
    return single(name, settings, fedavg_init(settings), fedavg_stage(settings))


def fedprox(settings: Settings, options: FedProxConfig = FedProxConfig()) -> Algorithm:
    """FedProx; ``options`` is ``config.fedprox`` (validated when it was made)."""
    return single("fedprox", settings, fedavg_init(settings), fedavg_stage(settings, prox_mu=options.mu))
