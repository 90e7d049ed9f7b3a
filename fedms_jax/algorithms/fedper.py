"""FedPer-style personalisation (Arivazhagan et al. 2019) on LoRA: the LoRA adapters are
federated (FedAvg), the classifier head stays on its client and is never sent.

Every client's head starts from the same initial head; the server keeps only the LoRA units.
There is no global model (no shared head), so only personalised accuracy is reported. The
head's optimizer state persists on its client across rounds.
"""
from __future__ import annotations

from fedms_jax.algorithms.common import active, expert_stage, fresh_clients, opt_states
from fedms_jax.federated.ops import delta, stack
from fedms_jax.federated.protocol import Algorithm, Settings, Stage, single
from fedms_jax.algorithms.fedavg import init_expert
from fedms_jax.federated import server as srv


def local_head_init(settings: Settings):
    """``init`` of the methods with a federated body and a local head: the server holds the
    LoRA units, every client a copy of the initial head and its optimizer state."""

    def init(rng, num_clients):
        trainable = init_expert(settings, rng)
        shared = {"lora": trainable["lora"]}
        local = {"head": trainable["head"], "opt": opt_states(settings, head=trainable["head"])}
        return srv.init_server(settings.server_optimizer, shared), fresh_clients(num_clients, stack(local, num_clients))

    return init


def local_head_stage(settings: Settings, **overrides) -> Stage:
    """The stage of a federated body (LoRA: broadcast, trained, its delta uploaded) with a
    local head (kept on the client with its optimizer state, never sent; no global model);
    ``overrides`` as in ``expert_stage`` (FedRep's segments)."""
    return expert_stage(
        settings,
        broadcast=lambda server, phase: active(settings, server.trainable, phase, head=False),
        client_init=lambda down, state, phase: ({**down, "head": state["head"]}, None),
        client_final=lambda down, state, old, new, phase: (
            {"lora": delta(new["lora"], old["lora"])}, {**state, "head": new["head"]}),
        global_predict=None,  # no shared head: no global model
        persistent=("head",),
        **overrides,
    )


def fedper(settings: Settings) -> Algorithm:
    return single("fedper", settings, local_head_init(settings), local_head_stage(settings))
