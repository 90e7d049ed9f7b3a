"""FedPer-style personalisation (Arivazhagan et al. 2019) on LoRA: the LoRA adapters are
federated (FedAvg), the classifier head stays on its client and is never sent.

Every client's head starts from the same initial head; the server keeps only the LoRA units.
There is no global model (no shared head), so only personalised accuracy is reported.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedms_jax.federated import server as srv
from fedms_jax.federated.algorithms.base import Algorithm, Phase, delta, stack
from fedms_jax.federated.engine import ClientStates, ServerState


class FedPer(Algorithm):
    name = "fedper"
    has_global_model = False

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]:
        trainable = self.init_expert(rng)
        shared = {"lora": trainable["lora"]}
        server = ServerState(shared, srv.init_server_opt(self.c.server_optimizer, shared))
        heads = stack(trainable["head"], num_clients)
        return server, ClientStates(jnp.zeros((num_clients,), jnp.int32), {"head": heads})

    def broadcast(self, server: ServerState, phase: Phase):
        return self.active(server.trainable, phase, head=False)

    def local_problem(self, down, state, phase):
        return {**down, "head": state["head"]}, None

    def loss(self, params, ctx, backbone, images, labels, rng, *, phase):
        return self.expert_loss(backbone, params, images, labels, phase, rng), {}

    def finish(self, down, state, old, new, phase):
        return {"lora": delta(new["lora"], old["lora"])}, {"head": new["head"]}

    def predict(self, backbone, down, state, images, phase):
        logits = self.expert_logits(backbone, {**down, "head": state["head"]}, images, phase)
        return jax.nn.log_softmax(logits), {}
