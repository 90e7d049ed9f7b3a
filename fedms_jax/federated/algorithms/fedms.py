"""FedMS: a global expert by FedAvg + SAL (stage 1), then local experts mixed with it by a gate
whose adapter is aggregated every round (stage 2, the Mixture of Foundation Models).

Our reading of the paper (DESIGN.md section 1; marked choices are config options):

* stage 1 is ``fedavg_sal`` on the global expert;
* stage 2, per client: the local expert (initialised from the global expert, see
  ``two_stage``) and the gate head are trained and kept on the client, never sent; the gate
  adapter is trained, uploaded and averaged (FedAvg) every round; the global expert is frozen
  (``fedms.train_global=True`` keeps training it with FedAvg);
* one shared trunk: below the lowest active block both experts are the same frozen network, so
  the trunk runs once; only the top k blocks run twice. The gate reads the trunk's output at the
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
from fedms_jax.federated import server as srv
from fedms_jax.federated.algorithms.base import Common, Phase, delta
from fedms_jax.federated.algorithms.two_stage import TwoStage
from fedms_jax.federated.engine import ClientStates, ServerState
from fedms_jax.models.vision import Branch
from fedms_jax.train import cross_entropy

PyTree = Any
GATE = "gate"  # the gate adapter's unit in the server tree
GATE_MODES = ("learned", "fixed")
GATE_INPUTS = ("mean", "cls")


class FedMS(TwoStage):
    name = "fedms"

    def __init__(
        self,
        common: Common,
        stage1_rounds: int,
        *,
        gate_rank: int = 16,
        gate: str = "learned",
        local_weight: float = 0.5,
        mixing: str = "probs",
        aux_weight: float = 0.0,
        train_global: bool = False,
        gate_input: str = "mean",
    ) -> None:
        super().__init__(common, stage1_rounds)
        if gate not in GATE_MODES:
            raise ValueError(f"fedms.gate must be one of {list(GATE_MODES)}, got {gate!r}")
        if mixing not in mofm.MIX_MODES:
            raise ValueError(f"fedms.mixing must be one of {list(mofm.MIX_MODES)}, got {mixing!r}")
        if not 0.0 <= local_weight <= 1.0:
            raise ValueError(f"fedms.local_weight must be in [0, 1], got {local_weight}")
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"fedms.gate_input must be one of {list(GATE_INPUTS)}, got {gate_input!r}")
        if gate_rank < 1:
            raise ValueError(f"fedms.gate_rank must be >= 1, got {gate_rank}")
        self.gate_rank = gate_rank
        self.learned_gate = gate == "learned"
        self.local_weight = float(local_weight)
        self.mixing = mixing
        self.aux_weight = float(aux_weight)
        self.train_global = train_global
        self.gate_input = gate_input

    def init(self, rng: jax.Array, num_clients: int) -> tuple[ServerState, ClientStates]:
        r_expert, r_gate = jax.random.split(rng)
        expert = self.init_expert(r_expert)
        adapter, head = mofm.init_gate(r_gate, self.expert.spec.encoder.hidden_size, self.gate_rank)
        trainable = {**expert, GATE: adapter}
        server = ServerState(trainable, srv.init_server_opt(self.c.server_optimizer, trainable))
        return server, self.init_clients(expert, num_clients, gate_head=head)

    # --- stage 2 ---------------------------------------------------------------------------
    def broadcast(self, server: ServerState, phase: Phase) -> PyTree:
        glob = self.active(server.trainable, phase)
        if phase.stage == 1:
            return glob
        return {"global": glob, **({GATE: server.trainable[GATE]} if self.learned_gate else {})}

    def local_problem(self, down, state, phase):
        if phase.stage == 1:
            return super().local_problem(down, state, phase)
        params = {"local": self.local_expert(down["global"], state, phase)}
        if self.learned_gate:
            params.update(adapter=down[GATE], gate_head=state["gate_head"])
        if self.train_global:
            return {**params, "global": down["global"]}, None
        return params, down["global"]

    def precompute(self, backbone, ctx, images, *, phase):
        """Stage 2 with a frozen global expert: its logits join the branch point, so a round
        runs the global expert's top blocks once per example instead of once per step."""
        branch = super().precompute(backbone, ctx, images, phase=phase)
        if phase.stage == 1 or self.train_global:
            return branch
        return {"branch": branch, "z_global": self.logits_from_branch(backbone, ctx, branch.hidden, phase)}

    def forward(self, backbone, glob, local, adapter, gate_head, images, phase, rng=None):
        """The MoFM on images [B,H,W,C]: -> (log p [B,C], z_global [B,C], z_local [B,C], w [B,2]).

        The trunk (blocks below the branch point) runs once for both experts and the gate.
        ``images`` may also be ``precompute``'s output: the branch point, or it and the frozen
        global expert's logits.
        """
        r_g, r_l = (None, None) if rng is None else jax.random.split(rng)
        z_global = None
        if isinstance(images, dict):
            branch, z_global = images["branch"], images["z_global"]
        elif isinstance(images, Branch):
            branch = images
        else:
            branch = self.expert.trunk(backbone, images, phase.num_active)
        if z_global is None:
            z_global = self.logits_from_branch(backbone, glob, branch.hidden, phase, r_g if self.train_global else None)
        z_local = self.logits_from_branch(backbone, local, branch.hidden, phase, r_l)
        if self.learned_gate:
            w = mofm.gate_weights(adapter, gate_head, self.gate_features(branch), self.gate_rank)
        else:
            w = mofm.fixed_weights(branch.hidden.shape[0], self.local_weight)
        return mofm.mix(w, z_global, z_local, self.mixing), z_global, z_local, w

    def gate_features(self, branch) -> jax.Array:
        """The gate's input [B, D] from the branch point: its [CLS] vector, or the mean of all its
        tokens. At k = L the branch point is the embedding layer, where [CLS] is the same vector
        for every image (class token + its position embedding), hence the default 'mean'."""
        return branch.cls if self.gate_input == "cls" else branch.hidden.mean(axis=1)

    def loss(self, params, ctx, backbone, images, labels, rng, *, phase):
        if phase.stage == 1:
            return super().loss(params, ctx, backbone, images, labels, rng, phase=phase)
        glob = params["global"] if self.train_global else ctx
        log_p, z_g, z_l, w = self.forward(
            backbone, glob, params["local"], params.get("adapter"), params.get("gate_head"), images, phase, rng
        )
        loss = mofm.nll(log_p, labels)
        if self.aux_weight > 0:
            aux = cross_entropy(z_l, labels) + (cross_entropy(z_g, labels) if self.train_global else 0.0)
            loss = loss + self.aux_weight * aux
        return loss, {"gate_local": w[:, mofm.LOCAL].mean()}

    def finish(self, down, state, old, new, phase):
        if phase.stage == 1:
            return super().finish(down, state, old, new, phase)
        upload = {}
        if self.learned_gate:
            upload[GATE] = delta(new["adapter"], old["adapter"])
        if self.train_global:
            upload.update(delta(new["global"], old["global"]))
        state = self.store_local(state, new["local"])
        if self.learned_gate:
            state["gate_head"] = new["gate_head"]
        return upload, state

    def predict(self, backbone, down, state, images, phase):
        if phase.stage == 1:
            return super().predict(backbone, down, state, images, phase)
        log_p, _, _, w = self.forward(
            backbone, down["global"], self.local_expert(down["global"], state, phase),
            down.get(GATE), state["gate_head"], images, phase,
        )
        return log_p, {"gate_local": w[:, mofm.LOCAL]}

    def predict_global(self, backbone, down, images, phase):
        glob = down if phase.stage == 1 else down["global"]
        return self.expert_logits(backbone, glob, images, phase)
