"""FedMS: a global expert by FedAvg + SAL (stage 1), then local experts mixed with it by a gate
whose adapter is aggregated every round (stage 2, the Mixture of Foundation Models).

Our reading of the paper (DESIGN.md section 1; marked choices are config options):

* stage 1 is ``fedavg_sal`` on the global expert;
* stage 2, per client: the local expert (initialised from the global expert, see
  ``common.local_expert``) and the gate head are trained and kept on the client, never sent;
  the gate adapter is trained, uploaded and averaged (FedAvg) every round; the global expert is
  frozen (``fedms.train_global=True`` keeps training it with FedAvg);
* one shared trunk: below the lowest active block both experts are the same frozen network, so
  the trunk runs once (``featurize``), and with the global expert frozen its logits are part of
  the features too; only the local expert's top k blocks run per step. The gate reads the
  branch point, so it costs two small matmuls;
* the loss is ``-log p(y)`` of the mixture (``fedms.mixing``: probabilities or logits), plus
  ``fedms.aux_weight`` times each trained expert's own cross-entropy;
* ablation ``fedms.gate='fixed'``: no gate network, the mixture weight on the local expert is
  ``fedms.local_weight`` for every example (0.5/0.5 by default).
"""
from __future__ import annotations

from typing import Any

import jax

from fedms_jax import mofm
from fedms_jax.algorithms.common import (
    Algorithm, Settings, active, cross_entropy, delta, expert_logits, expert_stage, local_expert,
    local_expert_states, staged, store_local,
)
from fedms_jax.algorithms.fedavg import fedavg_stage, init_expert
from fedms_jax.config import FedMSConfig
from fedms_jax.federated import server as srv
from fedms_jax.federated.client import featurize_branch
from fedms_jax.federated.types import Features

PyTree = Any
GATE = "gate"  # the gate adapter's unit in the server tree


def gate_features(branch, gate_input: str) -> jax.Array:
    """The gate's input [B, D] from the branch point: its [CLS] vector, or the mean of all its
    tokens. At k = L the branch point is the embedding layer, where [CLS] is the same vector
    for every image (class token + its position embedding), hence the default 'mean'."""
    return branch.cls if gate_input == "cls" else branch.hidden.mean(axis=1)


def mixture(settings: Settings, f: FedMSConfig, params, glob, backbone, feats: Features, phase, rng=None):
    """The MoFM on features: -> (log p [B,C], z_global [B,C], z_local [B,C], w [B,2]).

    params: {'local': the local expert, 'adapter', 'gate_head'} (the gate's only when learned);
    glob: the global expert (its logits are ``feats.frozen['z_global']`` when it is frozen).
    """
    r_g, r_l = (None, None) if rng is None else jax.random.split(rng)
    hidden = feats.branch.hidden
    if "z_global" in feats.frozen:
        z_global = feats.frozen["z_global"]
    else:
        z_global = expert_logits(settings, backbone, glob, hidden, phase, r_g if f.train_global else None)
    z_local = expert_logits(settings, backbone, params["local"], hidden, phase, r_l)
    if f.gate == "learned":
        w = mofm.gate_weights(params["adapter"], params["gate_head"], gate_features(feats.branch, f.gate_input), f.gate_rank)
    else:
        w = mofm.fixed_weights(hidden.shape[0], f.local_weight)
    return mofm.mix(w, z_global, z_local, f.mixing), z_global, z_local, w


def mofm_stage(settings: Settings, f: FedMSConfig):
    """Stage 2: local expert + gate per client; the gate adapter (and with ``train_global`` the
    global expert) aggregated."""
    glob_of = lambda params, ctx: params["global"] if f.train_global else ctx

    def broadcast(server, phase):
        down = {"global": active(settings, server.trainable, phase)}
        if f.gate == "learned":
            down[GATE] = server.trainable[GATE]
        return down

    def client_init(down, state, phase):
        params = {"local": local_expert(settings, down["global"], state, phase)}
        if f.gate == "learned":
            params.update(adapter=down[GATE], gate_head=state["gate_head"])
        if f.train_global:
            return {**params, "global": down["global"]}, None
        return params, down["global"]

    def featurize(backbone, ctx, images, phase):
        feats = featurize_branch(settings.expert, backbone, images, phase)
        if f.train_global:
            return feats
        # The frozen global expert's logits join the features: with caching they cost one
        # forward per example per round instead of one per step.
        return Features(feats.branch, {"z_global": expert_logits(settings, backbone, ctx, feats.branch.hidden, phase)})

    def loss(params, ctx, backbone, feats, labels, rng, phase):
        log_p, z_g, z_l, w = mixture(settings, f, params, glob_of(params, ctx), backbone, feats, phase, rng)
        loss = mofm.nll(log_p, labels)
        if f.aux_weight > 0:
            aux = cross_entropy(z_l, labels) + (cross_entropy(z_g, labels) if f.train_global else 0.0)
            loss = loss + f.aux_weight * aux
        return loss, {"gate_local": w[:, mofm.LOCAL].mean()}

    def client_final(down, state, old, new, phase):
        upload = {}
        if f.gate == "learned":
            upload[GATE] = delta(new["adapter"], old["adapter"])
        if f.train_global:
            upload.update(delta(new["global"], old["global"]))
        state = store_local(state, new["local"])
        if f.gate == "learned":
            state["gate_head"] = new["gate_head"]
        return upload, state

    def predict(params, ctx, backbone, feats, phase):
        log_p, _, _, w = mixture(settings, f, params, glob_of(params, ctx), backbone, feats, phase)
        return log_p, {"gate_local": w[:, mofm.LOCAL]}

    return expert_stage(
        settings, broadcast=broadcast, client_init=client_init, featurize=featurize, loss=loss,
        client_final=client_final, predict=predict,
        global_predict=lambda backbone, down, feats, phase: expert_logits(
            settings, backbone, down["global"], feats.branch.hidden, phase),
    )


def fedms(settings: Settings, stage1_rounds: int, options: FedMSConfig = FedMSConfig()) -> Algorithm:
    """FedMS over ``settings``; ``options`` is ``config.fedms`` (validated when it was made)."""
    def init(rng, num_clients):
        r_expert, r_gate = jax.random.split(rng)
        expert = init_expert(settings, r_expert)
        adapter, head = mofm.init_gate(r_gate, settings.expert.spec.encoder.hidden_size, options.gate_rank)
        server = srv.init_server(settings.server_optimizer, {**expert, GATE: adapter})
        return server, local_expert_states(expert, num_clients, gate_head=head)

    return staged("fedms", settings, init, fedavg_stage(settings), mofm_stage(settings, options), stage1_rounds)
