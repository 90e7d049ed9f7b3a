"""Local-only LoRA: every client trains its own expert on its own data; nothing is sent.

All clients start from the same initial expert. The server holds nothing (no global model);
each client's expert lives in its persistent state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedms_jax.federated import server as srv
from fedms_jax.federated.algorithms.base import Algorithm, Phase, stack
from fedms_jax.federated.engine import ClientStates, ServerState


class LocalOnly(Algorithm):
    name = "local"
    has_global_model = False

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]:
        experts = stack(self.init_expert(rng), num_clients)
        return ServerState({}, {}), ClientStates(jnp.zeros((num_clients,), jnp.int32), {"expert": experts})

    def broadcast(self, server: ServerState, phase: Phase):
        return {}

    def local_problem(self, down, state, phase):
        return self.active(state["expert"], phase), None

    def loss(self, params, ctx, backbone, images, labels, rng, *, phase):
        return self.expert_loss(backbone, params, images, labels, phase, rng), {}

    def finish(self, down, state, old, new, phase):
        return {}, {"expert": srv.replace_units(state["expert"], new)}

    def predict(self, backbone, down, state, images, phase):
        return jax.nn.log_softmax(self.expert_logits(backbone, self.active(state["expert"], phase), images, phase)), {}
