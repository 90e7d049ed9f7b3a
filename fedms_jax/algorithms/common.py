"""What the algorithms share: the expert stage (FedAvg's functions, which the other methods
override some of), active units, and the persistent local experts of two-stage methods. The
protocol they implement is ``federated.protocol``."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedms_jax.federated import server as srv
from fedms_jax.federated.ops import cross_entropy, delta, featurize_branch, init_opt_states, stack
from fedms_jax.federated.protocol import Settings, Stage
from fedms_jax.federated.types import (
    ClientStates, Phase, active_units, replace_units, select, tree_where,
)

PyTree = Any


def fresh_clients(num_clients: int, local: PyTree | None = None) -> ClientStates:
    return ClientStates(jnp.zeros((num_clients,), jnp.int32), {} if local is None else local)


def active(settings: Settings, trainable: PyTree, phase: Phase, head: bool = True) -> dict:
    """The active units of an expert's trainable tree (head + top-k blocks' LoRA)."""
    return select(trainable, active_units(phase.num_active, settings.expert.num_layers, head=head))


def expert_logits(settings: Settings, backbone: PyTree, trainable: PyTree, hidden: jax.Array, phase: Phase, rng=None) -> jax.Array:
    """The expert's top k blocks and head from the branch point [B, T, D] -> logits [B, C]."""
    return settings.expert.logits_from_branch(
        backbone, trainable, hidden, phase.num_active, frozen_head=settings.frozen_head, rng=rng
    )


def expert_stage(settings: Settings, **overrides: Callable) -> Stage:
    """The stage where the client trains one expert (``params``) with cross-entropy: FedAvg's
    defaults for every function; ``overrides`` replace some (the other methods' stages)."""

    def featurize(backbone, ctx, images, phase):
        return featurize_branch(settings.expert, backbone, images, phase)

    def loss(params, ctx, backbone, batch, rng, phase):
        logits = expert_logits(settings, backbone, params, batch.features.branch.hidden, phase, rng)
        return cross_entropy(logits, batch.labels, batch.mask), {}

    def predict(params, ctx, backbone, feats, phase):
        return jax.nn.log_softmax(expert_logits(settings, backbone, params, feats.branch.hidden, phase)), {}

    def global_predict(backbone, down, feats, phase):
        return expert_logits(settings, backbone, down, feats.branch.hidden, phase)

    def server_update(server, mean, totals, phase):
        return srv.server_update(settings.server_optimizer, server, mean, totals)

    defaults = dict(
        broadcast=lambda server, phase: active(settings, server.trainable, phase),
        client_init=lambda down, state, phase: (down, None),
        featurize=featurize,
        loss=loss,
        client_final=lambda down, state, old, new, phase: (delta(new, old), state),
        server_update=server_update,
        predict=predict,
        global_predict=global_predict,
        # FedAvg's client ignores its state and returns it as it was.
        state_keys=None if {"client_init", "client_final"} & set(overrides) else (),
    )
    return Stage(**{**defaults, **overrides})


# --- persistent local experts (two-stage methods) --------------------------------------------
def opt_states(settings: Settings, **entries: PyTree) -> dict:
    """One client's initial persistent optimizer states ({entry: {unit: state}}) for the full
    trees of the params entries a stage keeps state for (e.g. ``local=expert``): the client
    state's ``'opt'`` entry (``federated.client.OPT``)."""
    return init_opt_states(settings.client_optimizer, entries)


def local_expert_states(expert: PyTree, num_clients: int, **extra: PyTree) -> ClientStates:
    """Every client's slot for a local expert (a copy of ``expert``, not ``ready`` yet) and the
    ``extra`` per-client entries (one client's value each, copied to every client)."""
    local = {"ready": jnp.zeros((num_clients,), bool), "expert": stack(expert, num_clients)}
    local.update({name: stack(v, num_clients) for name, v in extra.items()})
    return fresh_clients(num_clients, local)


def local_expert(settings: Settings, global_active: PyTree, state: PyTree, phase: Phase) -> PyTree:
    """The client's local expert (active units), or the global expert if it has none yet: with
    the global expert frozen in stage 2 that equals copying it at the stage boundary, and a
    client never sampled in stage 2 is served the global expert."""
    return tree_where(state["ready"], active(settings, state["expert"], phase), global_active)


def store_local(state: PyTree, trained: PyTree) -> dict:
    return {**state, "ready": jnp.ones((), bool), "expert": replace_units(state["expert"], trained)}
