"""FedBuff inside the vmapped engine (``system.aggregation = fedbuff``): every client of a server
step trains from the server version it downloaded.

The server is a ``types.BufferedServer``: its state and the trainable trees of its last S
versions on the device (``BufferedServer.trainables_of`` gathers each client's; ``stepped``
writes the new one). Which version each client downloaded and the staleness weight of its
result are plans of the host's event simulation (``system.BufferedTimeline``), inputs to one
compiled round program per phase: the number of programs does not grow with staleness.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from fedms_jax.federated.types import ClientOutput, Phase, ServerState

PyTree = Any


def own_versions(stage, server: ServerState, phase: Phase, backbone: PyTree, cohort: dict, fn: Callable,
                 trainables: PyTree, weight: jax.Array) -> tuple[tuple, dict, Callable]:
    """A group's (broadcast, per-client inputs, client function) when each client trains from its
    own version: ``trainables`` leaves [m, ...] (its version's), ``weight`` [m] (its result's
    staleness weight). Each client's ``down`` is ``stage.broadcast`` of its version, so the
    shared broadcast holds just the backbone."""
    downs = jax.vmap(lambda tr: stage.broadcast(server.replace(trainable=tr), phase))(trainables)
    return (backbone, None), {**cohort, "down": downs, "staleness_weight": weight}, from_own_version(fn)


def from_own_version(fn: Callable) -> Callable:
    """A client function that takes its broadcast from its own inputs (FedBuff: ``down``, from
    the version it downloaded) and scales its upload by its ``staleness_weight``: the server's
    mean of a unit is then sum_c n_c w_c delta_c / sum_c n_c (FedBuff's staleness-weighted
    average, with this engine's example weights)."""
    def run(broadcast, client):
        client = dict(client)
        down, w = client.pop("down"), client.pop("staleness_weight")
        out = fn((broadcast[0], down), client)
        return ClientOutput(jax.tree_util.tree_map(lambda u: u * w.astype(u.dtype), out.upload), out.weight,
                            out.state, out.metrics)

    return run
