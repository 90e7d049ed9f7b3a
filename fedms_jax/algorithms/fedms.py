"""FedMS: a global expert by FedAvg + SAL (stage 1), then local experts mixed with it by a gate
whose adapter is aggregated every round (stage 2, the Mixture of Foundation Models).

Our reading of the paper (DESIGN.md section 1); every marked choice is a ``fedms.*`` option:

* **the global expert** is trained by FedAvg + SAL in stage 1 and, with ``train_global``
  (default), keeps training and aggregating in stage 2, on the local expert's part of each
  client's data. With ``prior='balanced'`` (default) its clients train it with the balanced-
  softmax loss (cross-entropy of ``z + log pi_c``, ``pi_c`` the client's smoothed label
  distribution; Ren et al. 2020, FedRoD's generic model, Chen & Chao 2022), so the shared head
  estimates ``p(y | x)`` under a uniform label prior instead of being dragged toward each
  cohort's classes. A client *serves* it as ``z + log pi_c``: its own prior, kept in its state
  (``observe``), never sent. The global accuracy is the plain ``z`` on the whole test set;
* **the local expert** (LoRA + head, kept on the client with its optimizer state, never sent;
  initialised from the global expert the client first receives) trains from stage 1 on
  (``local_start='stage1'``: alongside the global expert on the same batches, Ditto's schedule)
  or in stage 2 only; with ``local_prox = lam`` its loss adds ``lam/2 ||v - w||^2`` toward the
  received global expert. In stage 2 it trains on its own cross-entropy (``local_loss='own'``)
  or through the mixture (``'mixture'``, APFL's personal update: ``-log p_mix(y)`` with the
  gate's weights and the global expert's output under ``stop_gradient``), so it learns to
  correct what the global expert gets wrong instead of standing alone;
* **the gate** = gate adapter (aggregated by FedAvg every round) + local gate head. It trains on
  the held-out slice (``gate_holdout``) with both experts' outputs under ``stop_gradient``,
  so it learns how far to trust each expert on examples the local expert did not train on in
  that round; with ``rotate_holdout`` the slice moves every round the client trains, so the
  local expert sees all of its client's data over time (``client.Sampler``);
* the **mixture** ``p(y|x) = w_g softmax(z_g + log pi) + w_l softmax(z_l)`` (``mixing``:
  ``probs``; ``logits`` mixes logits; ``residual`` is ``softmax(z_g + log pi + w_l z_l)``);
* one shared trunk: below the lowest active block both experts are the same frozen network, so
  the trunk runs once (``featurize``); with the global expert frozen (``train_global=False``)
  its logits and feature are part of the features too.

Ablations: ``gate='fixed'`` (no gate network, weight ``local_weight`` on the local expert),
``gate_holdout=0`` (the gate trained with the experts on the same batches by the mixture's loss,
plus ``aux_weight`` x each expert's own cross-entropy; the first scheme), ``prior='none'``,
``train_global=False``, ``local_start='stage2'``, ``local_loss='own'``, ``rotate_holdout=False``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedms_jax import mofm
from fedms_jax.algorithms.common import (
    active, expert_logits, expert_stage, local_expert, local_expert_states, opt_states, store_local,
)
from fedms_jax.federated.ops import cross_entropy, delta, featurize_branch, masked_mean
from fedms_jax.federated.protocol import Algorithm, Features, Settings, staged
from fedms_jax.algorithms.fedavg import init_expert, prox_term
from fedms_jax.config import FedMSConfig
from fedms_jax.federated import server as srv
from fedms_jax.federated.types import EXPERTS, tree_where

PyTree = Any
GATE = "gate"  # the gate adapter's unit in the server tree
COUNTS = "label_counts"  # the client-state entry with the client's per-class example counts [C]


# --- the label prior --------------------------------------------------------------------------
def label_counts(labels: jax.Array, mask: jax.Array, num_classes: int) -> jax.Array:
    """Per-class counts [C] float32 of the real examples (``mask`` 1) among ``labels`` [n]."""
    return jnp.zeros((num_classes,), jnp.float32).at[labels].add(mask.astype(jnp.float32))


def log_prior(counts: jax.Array, smoothing: float) -> jax.Array:
    """The smoothed log label distribution [C]: ``log((n_c + s) / sum_c (n_c + s))`` (add-s
    smoothing; all zeros, a client that has not trained yet, gives the uniform prior)."""
    smoothed = counts.astype(jnp.float32) + smoothing
    return jnp.log(smoothed) - jnp.log(smoothed.sum())


def balanced_cross_entropy(logits: jax.Array, log_pi: jax.Array, labels: jax.Array, mask=None) -> jax.Array:
    """The balanced-softmax loss: cross-entropy of ``logits + log_pi`` (logits [B, C], log_pi
    [C]): the model's ``softmax(logits)`` is then the label-balanced posterior."""
    return cross_entropy(logits + log_pi, labels, mask)


# --- the experts and the gate -------------------------------------------------------------------
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

    * ``global_feature``: the global expert's pooled feature (what its head reads: deep, and
      content-aware at every SAL level), from the features or given, under ``stop_gradient``;
    * ``mean`` / ``cls``: the branch point's mean token / [CLS] vector. At k = L the branch
      point is the embedding layer: [CLS] is the same for every image and the mean token a
      linear function of the image's mean patch, so neither can route on content there.
    """
    if gate_input == "global_feature":
        g = feats.frozen["g_feature"] if global_feature is None else global_feature
        return jax.lax.stop_gradient(g)
    return feats.branch.cls if gate_input == "cls" else feats.branch.hidden.mean(axis=1)


def gate(f: FedMSConfig, params, feats: Features, global_feature=None) -> jax.Array:
    """The gate's weights [B, 2] (global, local) for a batch of features."""
    batch = feats.branch.hidden.shape[0]
    if f.gate != "learned":
        return mofm.fixed_weights(batch, f.local_weight)
    x = gate_features(feats, f.gate_input, global_feature)
    return mofm.gate_weights(params["adapter"], params["gate_head"], x, f.gate_rank)


def served_global(settings, f: FedMSConfig, params, ctx, backbone, feats: Features, phase, rng=None):
    """The global expert as its client serves it -> (pooled feature [B, F] or None when it is
    part of the features, logits + the client's log prior [B, C], plain logits [B, C])."""
    if "z_global" in feats.frozen:
        z = feats.frozen["z_global"]
        return None, z + ctx["log_prior"], z
    glob = params["global"] if f.train_global else ctx["anchor"]
    feature, z = global_expert(settings, backbone, glob, feats.branch.hidden, phase, rng)
    return feature, z + ctx["log_prior"], z


def mixture(settings: Settings, f: FedMSConfig, params, ctx, backbone, feats: Features, phase, rng=None):
    """The MoFM on features: -> (log p [B,C], served global logits [B,C], z_local [B,C], w [B,2]).

    params: {'local', 'adapter', 'gate_head'[, 'global']}; ctx: {'anchor': the received global
    expert, 'log_prior': [C]} (``client_init``).
    """
    r_g, r_l = (None, None) if rng is None else jax.random.split(rng)
    g_feature, z_global, _ = served_global(settings, f, params, ctx, backbone, feats, phase, r_g if f.train_global else None)
    z_local = expert_logits(settings, backbone, params["local"], feats.branch.hidden, phase, r_l)
    w = gate(f, params, feats, g_feature)
    return mofm.mix(w, z_global, z_local, f.mixing), z_global, z_local, w


def gate_stats(w: jax.Array, mask: jax.Array) -> dict:
    """Mean and spread (std) of the gate's local weight over the real examples of a batch."""
    local = w[:, mofm.LOCAL]
    mean = masked_mean(local, mask)
    return {"gate_local": mean, "gate_local_std": jnp.sqrt(masked_mean(jnp.square(local - mean), mask))}


def local_mixture_loss(w: jax.Array, z_global: jax.Array, z_local: jax.Array, labels: jax.Array, mode: str, mask=None):
    """APFL's personal update: ``-log p_mix(y)`` as a function of the local expert's logits only
    (the gate's weights ``w`` [B, 2] and the global expert's logits under ``stop_gradient``)."""
    sg = jax.lax.stop_gradient
    return masked_mean(mofm.nll_per_example(mofm.mix(sg(w), sg(z_global), z_local, mode), labels), mask)


# --- the stages ---------------------------------------------------------------------------------
def _observe(state, labels, mask, num_classes):
    return {**state, COUNTS: label_counts(labels, mask, num_classes)}


def _ctx(f: FedMSConfig, down_global, state) -> dict:
    return {"anchor": down_global, "log_prior": _prior(f, state)}


def _prior(f: FedMSConfig, state) -> jax.Array:
    """The client's log prior [C] (zeros with ``prior='none'``: the global expert served as is)."""
    counts = state[COUNTS]
    return log_prior(counts, f.prior_smoothing) if f.prior == "balanced" else jnp.zeros_like(counts)


def _global_loss(f: FedMSConfig, z: jax.Array, ctx, labels, mask) -> jax.Array:
    """The global expert's training loss: balanced softmax (or plain cross-entropy)."""
    return balanced_cross_entropy(z, ctx["log_prior"], labels, mask) if f.prior == "balanced" else cross_entropy(z, labels, mask)


def _local_of(settings, f: FedMSConfig, down_global, state, phase):
    """The client's local expert (active units) this round: its own copy (``local_expert='own'``)
    or the received global expert plus the client's own offset (``'offset'``: the local expert
    follows the federation's progress and keeps what its client added); the global expert
    itself before the client has trained one."""
    if f.local_expert == "own":
        return local_expert(settings, down_global, state, phase)
    offset = active(settings, state["expert"], phase)
    moved = jax.tree_util.tree_map(jnp.add, down_global, offset)
    return tree_where(state["ready"], moved, down_global)


def _store_local(f: FedMSConfig, state, new_local, down_global):
    """Keeps the trained local expert in the client state (as an offset from ``down_global``
    with ``local_expert='offset'``)."""
    if f.local_expert == "offset":
        new_local = jax.tree_util.tree_map(jnp.subtract, new_local, down_global)
    return store_local(state, new_local)


def _local_prox(f: FedMSConfig, local, ctx) -> jax.Array:
    return f.local_prox * prox_term(local, ctx["anchor"]) if f.local_prox > 0 else 0.0


def global_stage(settings: Settings, f: FedMSConfig):
    """Stage 1: FedAvg + SAL of the global expert (balanced softmax with ``prior``), and with
    ``local_start='stage1'`` each client's local expert on the same batches (its own
    cross-entropy plus ``local_prox``), as Ditto trains its personal model. The client serves
    the global expert with its log prior."""
    with_local = f.local_start == "stage1"
    C = settings.expert.num_classes

    def client_init(down, state, phase):
        ctx = _ctx(f, down, state)
        if not with_local:
            return {"global": down}, ctx
        return {"global": down, "local": _local_of(settings, f, down, state, phase)}, ctx

    def loss(params, ctx, backbone, batch, rng, phase):
        h = batch.features.branch.hidden
        r_g, r_l = (None, None) if rng is None else jax.random.split(rng)
        z = expert_logits(settings, backbone, params["global"], h, phase, r_g)
        total = _global_loss(f, z, ctx, batch.labels, batch.mask)
        if not with_local:
            return total, {}
        z_l = expert_logits(settings, backbone, params["local"], h, phase, r_l)
        local = cross_entropy(z_l, batch.labels, batch.mask) + _local_prox(f, params["local"], ctx)
        return total + local, {"local_loss": local}

    def client_final(down, state, old, new, phase):
        state = _store_local(f, state, new["local"], down) if with_local else state
        return delta(new["global"], old["global"]), state

    def predict(params, ctx, backbone, feats, phase):
        z = expert_logits(settings, backbone, params["global"], feats.branch.hidden, phase) + ctx["log_prior"]
        if not with_local:
            return jax.nn.log_softmax(z), {}
        z_l = expert_logits(settings, backbone, params["local"], feats.branch.hidden, phase)
        return jax.nn.log_softmax(z), {EXPERTS: {"global": z, "local": z_l}}

    return expert_stage(
        settings, client_init=client_init, loss=loss, client_final=client_final, predict=predict,
        global_predict=lambda backbone, down, feats, phase: expert_logits(settings, backbone, down, feats.branch.hidden, phase),
        persistent=("local",) if with_local else (),
        state_keys=("ready", "expert", COUNTS, "opt") if with_local else (COUNTS,),
        observe=lambda state, labels, mask: _observe(state, labels, mask, C),
    )


def mofm_stage(settings: Settings, f: FedMSConfig):
    """Stage 2: local expert + gate per client; the gate adapter (and with ``train_global`` the
    global expert) aggregated.

    With ``f.gate_holdout > 0`` (and a learned gate): the global expert (``train_global``)
    trains on its loss and the local expert on its own cross-entropy or through the mixture
    (``local_loss``), both over the client's training slice; the gate trains on the held-out
    slice with both experts' outputs fixed (``stop_gradient``): it learns which expert to trust
    on data the local expert did not train on, and cannot move the experts. With 0 the
    mixture's loss trains the local expert (and a training global expert) and the gate together
    on the same batches (the original scheme).
    """
    learned = f.gate == "learned"
    holdout = f.gate_holdout if learned else 0.0
    C = settings.expert.num_classes
    sg = jax.lax.stop_gradient

    def broadcast(server, phase):
        down = {"global": active(settings, server.trainable, phase)}
        if learned:
            down[GATE] = server.trainable[GATE]
        return down

    def client_init(down, state, phase):
        params = {"local": _local_of(settings, f, down["global"], state, phase)}
        if learned:
            params.update(adapter=down[GATE], gate_head=state["gate_head"])
        if f.train_global:
            params["global"] = down["global"]
        return params, _ctx(f, down["global"], state)

    def featurize(backbone, ctx, images, phase):
        feats = featurize_branch(settings.expert, backbone, images, phase)
        if f.train_global:
            return feats
        # The frozen global expert's logits and feature join the features: with caching they
        # cost one forward per example per round instead of one per step.
        g_feature, z_global = global_expert(settings, backbone, ctx["anchor"], feats.branch.hidden, phase)
        return Features(feats.branch, {"z_global": z_global, "g_feature": g_feature})

    def loss(params, ctx, backbone, batch, rng, phase):
        if holdout == 0:
            log_p, z_g, z_l, w = mixture(settings, f, params, ctx, backbone, batch.features, phase, rng)
            loss = masked_mean(mofm.nll_per_example(log_p, batch.labels), batch.mask) + _local_prox(f, params["local"], ctx)
            if f.aux_weight > 0:
                aux = cross_entropy(z_l, batch.labels, batch.mask)
                if f.train_global:
                    aux = aux + cross_entropy(z_g, batch.labels, batch.mask)
                loss = loss + f.aux_weight * aux
            return loss, gate_stats(w, batch.mask)
        r_g, r_l = (None, None) if rng is None else jax.random.split(rng)
        feats, labels, mask = batch.features, batch.labels, batch.mask
        total, aux = 0.0, {}
        g_feature, z_g, z_plain = served_global(settings, f, params, ctx, backbone, feats, phase, r_g)
        if f.train_global:
            total = _global_loss(f, z_plain, ctx, labels, mask)
            aux["global_loss"] = total
        z_l = expert_logits(settings, backbone, params["local"], feats.branch.hidden, phase, r_l)
        if f.local_loss == "mixture":
            local = local_mixture_loss(gate(f, params, feats, g_feature), z_g, z_l, labels, f.mixing, mask)
        else:
            local = cross_entropy(z_l, labels, mask)
        local = local + _local_prox(f, params["local"], ctx)
        # The gate on the held-out slice, the experts fixed.
        held = batch.held
        fixed = {**params, "local": sg(params["local"]), **({"global": sg(params["global"])} if f.train_global else {})}
        hg_feature, hz_g, _ = served_global(settings, f, fixed, ctx, backbone, held.features, phase)
        hz_l = expert_logits(settings, backbone, fixed["local"], held.features.branch.hidden, phase)
        w = gate(f, params, held.features, hg_feature)
        gate_loss = masked_mean(mofm.nll_per_example(mofm.mix(w, hz_g, hz_l, f.mixing), held.labels), held.mask)
        return total + local + gate_loss, {**aux, "local_loss": local, **gate_stats(w, held.mask), "gate_loss": gate_loss}

    def client_final(down, state, old, new, phase):
        upload = {}
        if learned:
            upload[GATE] = delta(new["adapter"], old["adapter"])
        if f.train_global:
            upload.update(delta(new["global"], old["global"]))
        state = _store_local(f, state, new["local"], down["global"])
        if learned:
            state["gate_head"] = new["gate_head"]
        return upload, state

    def predict(params, ctx, backbone, feats, phase):
        log_p, z_g, z_l, w = mixture(settings, f, params, ctx, backbone, feats, phase)
        w_local = w[:, mofm.LOCAL]
        extras = {"gate_local": w_local, "gate_local_sq": jnp.square(w_local)}
        return log_p, {**extras, EXPERTS: {"global": z_g, "local": z_l}}

    return expert_stage(
        settings, broadcast=broadcast, client_init=client_init, featurize=featurize, loss=loss,
        client_final=client_final, predict=predict,
        global_predict=lambda backbone, down, feats, phase: expert_logits(
            settings, backbone, down["global"], feats.branch.hidden, phase),
        holdout=holdout,
        rotate_holdout=f.rotate_holdout,
        lr_factors=(("adapter", f.gate_lr_factor), ("gate_head", f.gate_lr_factor)) if learned and f.gate_lr_factor != 1 else (),
        persistent=("local", "gate_head") if learned else ("local",),
        observe=lambda state, labels, mask: _observe(state, labels, mask, C),
    )


def fedms(settings: Settings, stage1_rounds: int, options: FedMSConfig = FedMSConfig()) -> Algorithm:
    """FedMS over ``settings``; ``options`` is ``config.fedms`` (validated when it was made)."""
    learned = options.gate == "learned"
    C = settings.expert.num_classes

    def init(rng, num_clients):
        r_expert, r_gate = jax.random.split(rng)
        expert = init_expert(settings, r_expert)
        counts = jnp.zeros((C,), jnp.float32)
        if not learned:
            server = srv.init_server(settings.server_optimizer, expert)
            opt = opt_states(settings, local=expert)
            return server, local_expert_states(expert, num_clients, opt=opt, **{COUNTS: counts})
        adapter, head = mofm.init_gate(r_gate, gate_input_dim(settings, options.gate_input), options.gate_rank)
        server = srv.init_server(settings.server_optimizer, {**expert, GATE: adapter})
        opt = opt_states(settings, local=expert, gate_head=head)
        return server, local_expert_states(expert, num_clients, gate_head=head, opt=opt, **{COUNTS: counts})

    return staged("fedms", settings, init, global_stage(settings, options), mofm_stage(settings, options), stage1_rounds)
