"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization")
on LoRA: a global expert trained by FedAvg and, on every client, a personal expert trained on
its own loss plus ``lam/2 ||v - w||^2`` toward the global expert ``w`` the client received.

Per round a client takes its local steps on both at once (the same batches): the global copy on
its cross-entropy (its delta is uploaded), the personal expert on cross-entropy plus the
proximal term to the *received* global expert (fixed during the round, as in the paper's
Algorithm 1). A client's personal expert starts from the global expert it receives the first
time it trains (our choice: clients first sampled late start from a trained model, not from
the initial one) and keeps its optimizer state. Personalised accuracy is the personal expert;
global accuracy the global expert.
"""
from __future__ import annotations

import jax

from fedms_jax.algorithms.common import (
    expert_logits, expert_stage, local_expert, local_expert_states, opt_states, store_local,
)
from fedms_jax.federated.ops import cross_entropy, delta
from fedms_jax.federated.protocol import Algorithm, Settings, single
from fedms_jax.algorithms.fedavg import init_expert, prox_term
from fedms_jax.config import DittoConfig
from fedms_jax.federated import server as srv


def ditto(settings: Settings, options: DittoConfig = DittoConfig()) -> Algorithm:
    """Ditto; ``options`` is ``config.ditto`` (validated when it was made)."""
    lam = options.lam

    def init(rng, num_clients):
        expert = init_expert(settings, rng)
        opt = opt_states(settings, personal=expert)
        return srv.init_server(settings.server_optimizer, expert), local_expert_states(expert, num_clients, opt=opt)

    def client_init(down, state, phase):
        return {"global": down, "personal": local_expert(settings, down, state, phase)}, down

    def loss(params, anchor, backbone, batch, rng, phase):
        h = batch.features.branch.hidden
        ce = lambda p: cross_entropy(expert_logits(settings, backbone, p, h, phase, rng), batch.labels, batch.mask)
        personal = ce(params["personal"]) + lam * prox_term(params["personal"], anchor)
        return ce(params["global"]) + personal, {"personal_loss": personal}

    def predict(params, ctx, backbone, feats, phase):
        return jax.nn.log_softmax(expert_logits(settings, backbone, params["personal"], feats.branch.hidden, phase)), {}

    stage = expert_stage(
        settings,
        client_init=client_init,
        loss=loss,
        client_final=lambda down, state, old, new, phase: (
            delta(new["global"], old["global"]), store_local(state, new["personal"])),
        predict=predict,
        persistent=("personal",),
    )
    return single("ditto", settings, init, stage)
