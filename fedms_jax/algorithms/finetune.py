"""FedAvg + fine-tuning: stage 1 is FedAvg of a global expert, stage 2 fine-tunes a local copy.

Each client keeps a *local expert* (the full LoRA tree and head) in its persistent state,
initialised from the global expert the first time it trains in stage 2 (``common.local_expert``).
Its optimizer state persists with it. Nothing is uploaded in stage 2 (the global expert's active units are still broadcast: a new
client starts from them); the global expert stays as stage 1 left it.
"""
from __future__ import annotations

from fedms_jax.algorithms.common import (
    expert_stage, local_expert, local_expert_states, opt_states, store_local,
)
from fedms_jax.federated.protocol import Algorithm, Settings, staged
from fedms_jax.algorithms.fedavg import fedavg_stage, init_expert
from fedms_jax.federated import server as srv


def finetune(settings: Settings, stage1_rounds: int) -> Algorithm:
    def init(rng, num_clients):
        expert = init_expert(settings, rng)
        opt = opt_states(settings, lora=expert["lora"], head=expert["head"])
        return srv.init_server(settings.server_optimizer, expert), local_expert_states(expert, num_clients, opt=opt)

    stage2 = expert_stage(
        settings,
        client_init=lambda down, state, phase: (local_expert(settings, down, state, phase), None),
        client_final=lambda down, state, old, new, phase: ({}, store_local(state, new)),
        persistent=("lora", "head"),
    )
    return staged("finetune", settings, init, fedavg_stage(settings), stage2, stage1_rounds)
