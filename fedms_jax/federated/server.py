"""Server side: the trainable tree as *units* (head, one unit per block), server optimizers.

A unit is what SAL switches on and off together: the head, and each block's LoRA adapters.
Only the active units at level k are broadcast, trained, uploaded, aggregated and updated; the
server optimizer keeps one optax state per unit, so an inactive unit's state (FedAdam moments,
bias-correction count) does not move while it sleeps.

Server optimizers act on the pseudo-gradient ``-(weighted mean of client deltas)``:
FedAvg = SGD with lr 1 (the new model is the weighted mean of the clients'), FedAdam = Adam
(Reddi et al., "Adaptive Federated Optimization").
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedms_jax import sal

PyTree = Any
HEAD = "head"


def unit_names(num_layers: int) -> list[str]:
    return [HEAD] + [f"blocks_{i}" for i in range(num_layers)]


def active_units(num_active: int, num_layers: int, head: bool = True) -> list[str]:
    """The head (unless ``head=False``) plus the top-k blocks."""
    return [HEAD] * head + [f"blocks_{i}" for i in sal.active_block_ids(num_active, num_layers)]


def split_units(trainable: PyTree) -> dict[str, PyTree]:
    """{'lora': {'encoder': {'blocks_i': ..}}, 'head': .., other: ..} -> {'head': .., 'blocks_i': .., other: ..}.

    Every top-level entry other than 'lora' (the head, FedMS's gate adapter) is one unit; the
    LoRA tree is one unit per block. Missing entries are simply absent.
    """
    out = {name: sub for name, sub in trainable.items() if name != "lora"}
    out.update(trainable.get("lora", {}).get("encoder", {}))
    return out


def join_units(units: dict[str, PyTree]) -> dict:
    blocks = {k: v for k, v in units.items() if sal.block_index(k) is not None}
    out = {k: v for k, v in units.items() if sal.block_index(k) is None}
    if blocks:
        out["lora"] = {"encoder": blocks}
    return out


def select(trainable: PyTree, names: list[str]) -> dict:
    """The trainable tree restricted to the named units (e.g. the active ones)."""
    units = split_units(trainable)
    return join_units({n: units[n] for n in names if n in units})


def replace_units(trainable: PyTree, part: PyTree) -> dict:
    """``trainable`` with the units present in ``part`` replaced."""
    return join_units({**split_units(trainable), **split_units(part)})


def tree_bytes(tree: PyTree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def server_optimizer(name: str, lr: float, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3) -> optax.GradientTransformation:
    if name == "fedavg":
        return optax.sgd(lr)
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    raise ValueError(f"server.optimizer must be 'fedavg' or 'fedadam', got {name!r}")


def init_server_opt(optimizer: optax.GradientTransformation, trainable: PyTree) -> dict[str, Any]:
    """One optimizer state per unit."""
    return {name: optimizer.init(unit) for name, unit in split_units(trainable).items()}


def apply_server_update(
    optimizer: optax.GradientTransformation,
    trainable: PyTree,
    opt_state: dict[str, Any],
    mean_delta: PyTree,
) -> tuple[dict, dict[str, Any]]:
    """Updates the units present in ``mean_delta`` with pseudo-gradient ``-mean_delta``."""
    params = split_units(trainable)
    new_state = dict(opt_state)
    for name, delta in split_units(mean_delta).items():
        grad = jax.tree_util.tree_map(jnp.negative, delta)
        updates, new_state[name] = optimizer.update(grad, opt_state[name], params[name])
        params[name] = optax.apply_updates(params[name], updates)
    return join_units(params), new_state
