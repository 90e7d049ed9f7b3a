"""FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
Learning") on LoRA: the body (the LoRA adapters) is federated, the head is local.

Each round a client first trains its own head with the body fixed (``fedrep.head_fraction`` of
its local steps), then the body with the head fixed (the rest), and uploads the body's delta.
Unlike FedPer, head and body never train at the same time: the head fits the representation
the client just received before the body moves. The head's optimizer state persists on its
client. No global model (no shared head).
"""
from __future__ import annotations

from fedms_jax.algorithms.common import (
    Algorithm, Settings, active, delta, expert_stage, fresh_clients, opt_states, single, stack,
)
from fedms_jax.algorithms.fedavg import init_expert
from fedms_jax.config import FedRepConfig
from fedms_jax.federated import server as srv


def fedrep(settings: Settings, options: FedRepConfig = FedRepConfig()) -> Algorithm:
    """FedRep; ``options`` is ``config.fedrep`` (validated when it was made)."""

    def init(rng, num_clients):
        trainable = init_expert(settings, rng)
        local = {"head": trainable["head"], "opt": opt_states(settings, head=trainable["head"])}
        return srv.init_server(settings.server_optimizer, {"lora": trainable["lora"]}), fresh_clients(
            num_clients, stack(local, num_clients))

    stage = expert_stage(
        settings,
        broadcast=lambda server, phase: active(settings, server.trainable, phase, head=False),
        client_init=lambda down, state, phase: ({**down, "head": state["head"]}, None),
        client_final=lambda down, state, old, new, phase: (
            {"lora": delta(new["lora"], old["lora"])}, {**state, "head": new["head"]}),
        global_predict=None,
        segments=((("head",), options.head_fraction), (("lora",), 1.0 - options.head_fraction)),
        persistent=("head",),
    )
    return single("fedrep", settings, init, stage)
