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
import jax.numpy as jnp

from fedms_jax import mofm
from fedms_jax.algorithms.common import (
    Algorithm, Settings, active, cross_entropy, delta, expert_logits, expert_stage,
    local_expert, local_expert_states, opt_states, staged, store_local,
)
from fedms_jax.algorithms.fedavg import fedavg_stage, init_expert
from fedms_jax.config import FedMSConfig
from fedms_jax.federated import server as srv
from fedms_jax.federated.client import featurize_branch, masked_mean
from fedms_jax.federated.types import EXPERTS, Features

PyTree = Any
GATE = "gate"  # the gate adapter's unit in the server tree


def gate_input_dim(settings: Settings, gate_input: str) -> int:
    """Width of the gate's input: the expert's pooled feature F, or the hidden width D."""
    spec = settings.expert.spec
    return spec.feature_dim if gate_input == "global_feature" else spec.encoder.hidden_size


def global_expert(settings: Settings, backbone, glob, hidden, phase, rng=None) -> tuple[jax.Array, jax.Array]:
    """The global expert from the branch point -> (pooled feature [B, F], logits [B, C])."""
    e = settings.expert
    feature = e.features(backbone, glob["lora"], hidden, phase.num_active, rng=rng)
    return feature, e.head_logits(e.head_params(glob, settings.frozen_head), feature)


def gate_features(feats: Features, gate_input: str, global_feature: jax.Array | None = None) -> jax.Array:
    """The gate's input [B, F or D]:

    * ``global_feature``: the frozen global expert's pooled feature (what its head reads: deep,
      and content-aware at every SAL level), from the features or given;
    * ``mean`` / ``cls``: the branch point's mean token / [CLS] vector. At k = L the branch
      point is the embedding layer: [CLS] is the same for every image and the mean token a
      linear function of the image's mean patch, so neither can route on content there.
    """
    if gate_input == "global_feature":
        g = feats.frozen["g_feature"] if global_feature is None else global_feature
        return jax.lax.stop_gradient(g)
    return feats.branch.cls if gate_input == "cls" else feats.branch.hidden.mean(axis=1)


def mixture(settings: Settings, f: FedMSConfig, params, glob, backbone, feats: Features, phase, rng=None):
    """The MoFM on features: -> (log p [B,C], z_global [B,C], z_local [B,C], w [B,2]).

    params: {'local': the local expert, 'adapter', 'gate_head'} (the gate's only when learned);
    glob: the global expert (its logits and feature are ``feats.frozen`` when it is frozen).
    """
    r_g, r_l = (None, None) if rng is None else jax.random.split(rng)
    hidden = feats.branch.hidden
    g_feature = None
    if "z_global" in feats.frozen:
        z_global = feats.frozen["z_global"]
    else:
        g_feature, z_global = global_expert(settings, backbone, glob, hidden, phase, r_g if f.train_global else None)
    z_local = expert_logits(settings, backbone, params["local"], hidden, phase, r_l)
    w = gate(f, params, feats, g_feature)
    return mofm.mix(w, z_global, z_local, f.mixing), z_global, z_local, w


def gate(f: FedMSConfig, params, feats: Features, global_feature=None) -> jax.Array:
    """The gate's weights [B, 2] (global, local) for a batch of features."""
    batch = feats.branch.hidden.shape[0]
    if f.gate != "learned":
        return mofm.fixed_weights(batch, f.local_weight)
    x = gate_features(feats, f.gate_input, global_feature)
    return mofm.gate_weights(params["adapter"], params["gate_head"], x, f.gate_rank)


def gate_stats(w: jax.Array, mask: jax.Array) -> dict:
    """Mean and spread (std) of the gate's local weight over the real examples of a batch."""
    local = w[:, mofm.LOCAL]
    mean = masked_mean(local, mask)
    return {"gate_local": mean, "gate_local_std": jnp.sqrt(masked_mean(jnp.square(local - mean), mask))}


def mofm_stage(settings: Settings, f: FedMSConfig):
    """Stage 2: local expert + gate per client; the gate adapter (and with ``train_global`` the
    global expert) aggregated.

    With ``f.gate_holdout > 0`` (and a learned gate) the local expert trains on its own
    cross-entropy over the client's training slice only, and the gate trains on the held-out
    slice with both experts' outputs fixed (``stop_gradient``): it learns which expert to trust
    on data neither memorised, and cannot move the experts. With 0 the mixture's loss trains
    the local expert and the gate together on the same batches (the original scheme).
    """
    learned = f.gate == "learned"
    holdout = f.gate_holdout if learned else 0.0
    glob_of = lambda params, ctx: params["global"] if f.train_global else ctx

    def broadcast(server, phase):
        down = {"global": active(settings, server.trainable, phase)}
        if learned:
            down[GATE] = server.trainable[GATE]
        return down

    def client_init(down, state, phase):
        params = {"local": local_expert(settings, down["global"], state, phase)}
        if learned:
            params.update(adapter=down[GATE], gate_head=state["gate_head"])
        if f.train_global:
            return {**params, "global": down["global"]}, None
        return params, down["global"]

    def featurize(backbone, ctx, images, phase):
        feats = featurize_branch(settings.expert, backbone, images, phase)
        if f.train_global:
            return feats
        # The frozen global expert's logits and feature join the features: with caching they
        # cost one forward per example per round instead of one per step.
        g_feature, z_global = global_expert(settings, backbone, ctx, feats.branch.hidden, phase)
        return Features(feats.branch, {"z_global": z_global, "g_feature": g_feature})

    def loss(params, ctx, backbone, batch, rng, phase):
        if holdout > 0:
            h = batch.features.branch.hidden
            z_local = expert_logits(settings, backbone, params["local"], h, phase, rng)
            expert_loss = cross_entropy(z_local, batch.labels, batch.mask)
            held = batch.held
            z_l = jax.lax.stop_gradient(expert_logits(settings, backbone, params["local"], held.features.branch.hidden, phase))
            w = gate(f, params, held.features)
            log_p = mofm.mix(w, held.features.frozen["z_global"], z_l, f.mixing)
            gate_loss = masked_mean(mofm.nll_per_example(log_p, held.labels), held.mask)
            return expert_loss + gate_loss, {**gate_stats(w, held.mask), "gate_loss": gate_loss}
        log_p, z_g, z_l, w = mixture(settings, f, params, glob_of(params, ctx), backbone, batch.features, phase, rng)
        loss = masked_mean(mofm.nll_per_example(log_p, batch.labels), batch.mask)
        if f.aux_weight > 0:
            aux = cross_entropy(z_l, batch.labels, batch.mask)
            if f.train_global:
                aux = aux + cross_entropy(z_g, batch.labels, batch.mask)
            loss = loss + f.aux_weight * aux
        return loss, gate_stats(w, batch.mask)

    def client_final(down, state, old, new, phase):
        upload = {}
        if learned:
            upload[GATE] = delta(new["adapter"], old["adapter"])
        if f.train_global:
            upload.update(delta(new["global"], old["global"]))
        state = store_local(state, new["local"])
        if learned:
            state["gate_head"] = new["gate_head"]
        return upload, state

    def predict(params, ctx, backbone, feats, phase):
        log_p, z_g, z_l, w = mixture(settings, f, params, glob_of(params, ctx), backbone, feats, phase)
        w_local = w[:, mofm.LOCAL]
        extras = {"gate_local": w_local, "gate_local_sq": jnp.square(w_local)}
        return log_p, {**extras, EXPERTS: {"global": z_g, "local": z_l}}

    return expert_stage(
        settings, broadcast=broadcast, client_init=client_init, featurize=featurize, loss=loss,
        client_final=client_final, predict=predict,
        global_predict=lambda backbone, down, feats, phase: expert_logits(
            settings, backbone, down["global"], feats.branch.hidden, phase),
        holdout=holdout,
        persistent=("local", "gate_head") if learned else ("local",),
    )


def fedms(settings: Settings, stage1_rounds: int, options: FedMSConfig = FedMSConfig()) -> Algorithm:
    """FedMS over ``settings``; ``options`` is ``config.fedms`` (validated when it was made)."""
    learned = options.gate == "learned"

    def init(rng, num_clients):
        r_expert, r_gate = jax.random.split(rng)
        expert = init_expert(settings, r_expert)
        if not learned:
            server = srv.init_server(settings.server_optimizer, expert)
            return server, local_expert_states(expert, num_clients, opt=opt_states(settings, local=expert))
        adapter, head = mofm.init_gate(r_gate, gate_input_dim(settings, options.gate_input), options.gate_rank)
        server = srv.init_server(settings.server_optimizer, {**expert, GATE: adapter})
        opt = opt_states(settings, local=expert, gate_head=head)
        return server, local_expert_states(expert, num_clients, gate_head=head, opt=opt)

    return staged("fedms", settings, init, fedavg_stage(settings), mofm_stage(settings, options), stage1_rounds)
