"""The federated vocabulary every other module speaks: phases, states, a client's output and the
trainable tree as *units*.

No module here imports the engine, an algorithm or a placement backend, so every module can
import this one and nothing imports in a cycle.

A **unit** is what SAL switches on and off together, and what aggregation averages as one: the
head, each block's LoRA adapters (``blocks_i``), and every other top-level entry of a trainable
tree (FedMS's gate adapter). ``split_units``/``join_units`` convert between the nested trainable
tree ``{'lora': {'encoder': {'blocks_i': ..}}, 'head': .., 'gate': ..}`` and the flat
``{unit name: subtree}`` form that uploads, per-unit weights and server optimizer states use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from fedms_jax import sal

PyTree = Any
HEAD = "head"
# A prediction's extra output {expert name: scores [B, C]}: evaluation also reports each
# expert's accuracy alone (``correct_<name>``), e.g. FedMS's global and local experts.
EXPERTS = "experts"


@dataclasses.dataclass(frozen=True, order=True)
class Phase:
    """The static shape of a round: ``stage`` (1, or 2 for two-stage methods) and the SAL level
    ``num_active`` (k). Each distinct phase is one compiled round program."""

    stage: int
    num_active: int


@flax.struct.dataclass
class ServerState:
    """trainable: the full tree (all blocks, every unit); opt_state: {unit: server-optimizer state}."""

    trainable: PyTree
    opt_state: PyTree


@flax.struct.dataclass
class BufferedServer:
    """FedBuff's server (``system.aggregation = fedbuff``): the server state and the trainable
    trees of its last S versions, which clients still training may have downloaded
    (``versions`` leaves [S, ...]; version v in row v mod S)."""

    server: ServerState
    versions: PyTree

    @classmethod
    def start(cls, server: ServerState, keep: int) -> "BufferedServer":
        """Version 0 (``server``) in every row."""
        return cls(server, jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (keep,) + x.shape), server.trainable))

    @property
    def keep(self) -> int:
        return jax.tree_util.tree_leaves(self.versions)[0].shape[0]

    def trainables_of(self, version: jax.Array) -> PyTree:
        """The trainable trees of server versions ``version`` [m] int32 -> leaves [m, ...]."""
        rows = version % self.keep
        return jax.tree_util.tree_map(lambda v: v[rows], self.versions)

    def stepped(self, server: ServerState, round_index: jax.Array) -> "BufferedServer":
        """After server step ``round_index`` made version ``round_index + 1`` (``server``): it,
        with that version written over the oldest row."""
        row = (round_index + 1) % self.keep
        return BufferedServer(server, jax.tree_util.tree_map(lambda vs, x: vs.at[row].set(x), self.versions,
                                                             server.trainable))


def server_of(server) -> ServerState:
    """The ``ServerState`` of a server (a ``BufferedServer``'s own)."""
    return server.server if isinstance(server, BufferedServer) else server


@flax.struct.dataclass
class ClientStates:
    """Persistent per-client state, stacked: leading axis = client id.

    participation: int32 [num_clients], rounds each client has trained in.
    local: algorithm-specific state (e.g. FedMS local experts); ``{}`` when there is none.
    """

    participation: jax.Array
    local: PyTree


class ClientOutput(NamedTuple):
    """What one client returns from a round.

    upload: {unit: subtree}, averaged over the cohort unit by unit.
    weight: {unit: float scalar}, the client's weight in each unit's average (its example count
      for a unit it trained, 0 for one it did not): a unit is averaged over the clients that
      trained it, and a unit no client trained is left exactly as it was.
    state: the client's new persistent state (any pytree; may be empty).
    metrics: per-client scalars.
    """

    upload: PyTree
    weight: PyTree
    state: PyTree
    metrics: PyTree


# --- units ----------------------------------------------------------------------------------
def active_units(num_active: int, num_layers: int, head: bool = True) -> list[str]:
    """The head (unless ``head=False``) plus the top-k blocks."""
    return [HEAD] * head + [f"blocks_{i}" for i in sal.active_block_ids(num_active, num_layers)]


def split_units(trainable: PyTree) -> dict[str, PyTree]:
    """Nested trainable tree -> {unit: subtree}. Missing entries are simply absent."""
    out = {name: sub for name, sub in trainable.items() if name != "lora"}
    out.update(trainable.get("lora", {}).get("encoder", {}))
    return out


def join_units(units: dict[str, PyTree]) -> dict:
    """{unit: subtree} -> the nested trainable tree (inverse of ``split_units``)."""
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


def tree_where(flag: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    """Per-leaf ``jnp.where`` on a scalar flag (e.g. 'this client's update is finite')."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def tree_bytes(tree: PyTree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))
