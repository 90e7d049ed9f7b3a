"""FedPer-style personalisation (Arivazhagan et al. 2019) on LoRA: the LoRA adapters are
federated (FedAvg), the classifier head stays on its client and is never sent.

Every client's head starts from the same initial head; the server keeps only the LoRA units.
There is no global model (no shared head), so only personalised accuracy is reported. The
head's optimizer state persists on its client across rounds.
"""
from __future__ import annotations

from fedms_jax.algorithms.common import (
    Algorithm, Settings, active, delta, expert_stage, fresh_clients, opt_states, single, stack,
)
from fedms_jax.algorithms.fedavg import init_expert
from fedms_jax.federated import server as srv


def fedper(settings: Settings) -> Algorithm:
    def init(rng, num_clients):
        trainable = init_expert(settings, rng)
        shared = {"lora": trainable["lora"]}
        local = {"head": trainable["head"], "opt": opt_states(settings, head=trainable["head"])}
        return srv.init_server(settings.server_optimizer, shared), fresh_clients(num_clients, stack(local, num_clients))

    stage = expert_stage(
        settings,
        broadcast=lambda server, phase: active(settings, server.trainable, phase, head=False),
        client_init=lambda down, state, phase: ({**down, "head": state["head"]}, None),
        client_final=lambda down, state, old, new, phase: (
            {"lora": delta(new["lora"], old["lora"])}, {**state, "head": new["head"]}),
        global_predict=None,  # no shared head: no global model
        persistent=("head",),
    )
    return single("fedper", settings, init, stage)
