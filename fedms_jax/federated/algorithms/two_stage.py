"""Two-stage algorithms: stage 1 is FedAvg (+ SAL) of a global expert; stage 2 personalises.

Each client keeps a *local expert* (the full LoRA tree and head) in its persistent state. It is
initialised from the global expert the first time the client trains in stage 2 (``ready``
flips then); with the global expert frozen in stage 2 that is the same as copying it at the
stage boundary, and a client never sampled in stage 2 is served the global expert.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedms_jax.federated import server as srv
from fedms_jax.federated.algorithms.base import Common, Phase, choose, stack
from fedms_jax.federated.algorithms.fedavg import FedAvg
from fedms_jax.federated.engine import ClientStates, ServerState

PyTree = Any


class TwoStage(FedAvg):
    """FedAvg for ``stage1_rounds`` rounds, then stage 2 (defined by subclasses)."""

    two_stage = True

    def __init__(self, common: Common, stage1_rounds: int) -> None:
        super().__init__(common)
        if stage1_rounds < 0:
            raise ValueError(f"stage1_rounds must be >= 0, got {stage1_rounds}")
        self.stage1_rounds = stage1_rounds

    def phase(self, round_index: int) -> Phase:
        stage = 1 if round_index < self.stage1_rounds else 2
        return Phase(stage, self.c.schedule.num_active(round_index))

    def init_clients(self, expert: PyTree, num_clients: int, **extra: PyTree) -> ClientStates:
        local = {"ready": jnp.zeros((num_clients,), bool), "expert": stack(expert, num_clients)}
        local.update({name: stack(v, num_clients) for name, v in extra.items()})
        return ClientStates(jnp.zeros((num_clients,), jnp.int32), local)

    def local_expert(self, global_active: PyTree, state: PyTree, phase: Phase) -> PyTree:
        """The client's local expert (active units), or the global expert if it has none yet."""
        return choose(state["ready"], self.active(state["expert"], phase), global_active)

    def store_local(self, state: PyTree, trained: PyTree) -> dict:
        return {**state, "ready": jnp.ones((), bool), "expert": srv.replace_units(state["expert"], trained)}


class Finetune(TwoStage):
    """FedAvg (all blocks), then local fine-tuning of a copy of the global expert."""

    name = "finetune"

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]:
        server, _ = super().init(rng, num_clients)
        return server, self.init_clients(server.trainable, num_clients)

    def local_problem(self, down, state, phase):
        if phase.stage == 1:
            return super().local_problem(down, state, phase)
        return self.local_expert(down, state, phase), None

    def finish(self, down, state, old, new, phase):
        if phase.stage == 1:
            return super().finish(down, state, old, new, phase)
        return {}, self.store_local(state, new)

    def predict(self, backbone, down, state, images, phase):
        expert = down if phase.stage == 1 else self.local_expert(down, state, phase)
        return jax.nn.log_softmax(self.expert_logits(backbone, expert, images, phase)), {}
