"""Server side: the server optimizers, one optax state per unit.

Uploads and weights come unit by unit (``types.ClientOutput``) and are averaged unit by unit
(``federated.aggregate``), so each unit is averaged over the clients that trained it. The server
optimizer acts on each unit's pseudo-gradient ``-(weighted mean of client deltas)``: FedAvg = SGD with lr 1 (the new unit is the weighted
mean of the clients'), FedAdam = Adam (Reddi et al., "Adaptive Federated Optimization"). A unit
that no client trained (total weight 0: inactive, or every client excluded) keeps its value
and its optimizer state exactly, so an inactive unit's FedAdam moments and bias-correction count
do not move while it sleeps.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedms_jax.choices import SERVER_OPTIMIZERS
from fedms_jax.federated.types import ServerState, join_units, split_units, tree_where

PyTree = Any


# server.optimizer -> (lr, b1, b2, eps) -> optimizer
OPTIMIZERS = {
    "fedavg": lambda lr, b1, b2, eps: optax.sgd(lr),
    "fedadam": lambda lr, b1, b2, eps: optax.adam(lr, b1=b1, b2=b2, eps=eps),
}
assert tuple(OPTIMIZERS) == SERVER_OPTIMIZERS, "fedms_jax.choices.SERVER_OPTIMIZERS and the registry disagree"


def server_optimizer(name: str, lr: float, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"server.optimizer must be one of {list(SERVER_OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](lr, b1, b2, eps)


def init_server(optimizer: optax.GradientTransformation, trainable: PyTree) -> ServerState:
    """The server state of a trainable tree: one optimizer state per unit."""
    return ServerState(trainable, {name: optimizer.init(unit) for name, unit in split_units(trainable).items()})


def server_update(
    optimizer: optax.GradientTransformation, server: ServerState, mean_delta: PyTree, totals: PyTree
) -> ServerState:
    """Applies the pseudo-gradient ``-mean_delta[u]`` to each uploaded unit u whose total weight
    is positive; every other unit, and its optimizer state, is left as it was."""
    params = split_units(server.trainable)
    opt_state = dict(server.opt_state)
    for name, delta in mean_delta.items():
        grad = jax.tree_util.tree_map(jnp.negative, delta)
        updates, new_state = optimizer.update(grad, opt_state[name], params[name])
        trained = totals[name] > 0
        params[name] = tree_where(trained, optax.apply_updates(params[name], updates), params[name])
        opt_state[name] = tree_where(trained, new_state, opt_state[name])
    return ServerState(join_units(params), opt_state)
