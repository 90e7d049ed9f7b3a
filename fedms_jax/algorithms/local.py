"""Local-only LoRA: every client trains its own expert on its own data; nothing is sent.

All clients start from the same initial expert. The server holds nothing (no global model);
each client's expert and its optimizer state live in its persistent state.
"""
from __future__ import annotations

from fedms_jax.algorithms.common import active, expert_stage, fresh_clients, opt_states
from fedms_jax.federated.ops import stack
from fedms_jax.federated.protocol import Algorithm, Settings, single
from fedms_jax.algorithms.fedavg import init_expert
from fedms_jax.federated.types import ServerState, replace_units


def local(settings: Settings) -> Algorithm:
    def init(rng, num_clients):
        expert = init_expert(settings, rng)
        local = {"expert": expert, "opt": opt_states(settings, lora=expert["lora"], head=expert["head"])}
        return ServerState({}, {}), fresh_clients(num_clients, stack(local, num_clients))

    stage = expert_stage(
        settings,
        broadcast=lambda server, phase: {},
        client_init=lambda down, state, phase: (active(settings, state["expert"], phase), None),
        client_final=lambda down, state, old, new, phase: ({}, {**state, "expert": replace_units(state["expert"], new)}),
        global_predict=None,
        persistent=("lora", "head"),
    )
    return single("local", settings, init, stage)
