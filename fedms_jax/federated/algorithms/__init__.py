"""One module per federated algorithm on the same engine; ``make_algorithm`` builds one by name.

| name        | what                                          | SAL schedule  |
|-------------|-----------------------------------------------|---------------|
| fedms       | FedMS: stage 1 FedAvg+SAL, stage 2 MoFM       | ``sal.*``     |
| fedavg_sal  | FedAvg-LoRA with SAL (FedMS stage 1 alone)    | ``sal.*``     |
| fedavg      | FedAvg-LoRA, all blocks                       | all blocks    |
| fedprox     | FedProx-LoRA (``fedprox.mu``)                 | all blocks    |
| fedper      | LoRA federated, head local                    | all blocks    |
| local       | local-only LoRA, nothing sent                 | all blocks    |
| finetune    | FedAvg, then local fine-tuning (stage 2)      | all blocks    |
"""
from __future__ import annotations

import dataclasses

import ml_collections

from fedms_jax.federated.algorithms.base import Algorithm, Common, Phase
from fedms_jax.federated.algorithms.fedavg import FedAvg
from fedms_jax.federated.algorithms.fedms import FedMS
from fedms_jax.federated.algorithms.fedper import FedPer
from fedms_jax.federated.algorithms.local import LocalOnly
from fedms_jax.federated.algorithms.two_stage import Finetune

ALGORITHMS = ("fedms", "fedavg_sal", "fedavg", "fedprox", "fedper", "local", "finetune")
USES_SAL = ("fedms", "fedavg_sal")

__all__ = ["ALGORITHMS", "USES_SAL", "Algorithm", "Common", "Phase", "make_algorithm"]


def make_algorithm(config: ml_collections.ConfigDict, common: Common) -> Algorithm:
    """The algorithm ``config.algorithm`` (validated) over ``common``.

    Algorithms outside ``USES_SAL`` train every block (``sal.*`` does not apply to them).
    """
    name = config.algorithm
    if name not in USES_SAL:
        common = dataclasses.replace(common, schedule=dataclasses.replace(common.schedule, mode="all"))
    f = config.fedms
    if name == "fedms":
        return FedMS(
            common, config.stage1_rounds, gate_rank=f.gate_rank, gate=f.gate, local_weight=f.local_weight,
            mixing=f.mixing, aux_weight=f.aux_weight, train_global=f.train_global, gate_input=f.gate_input,
        )
    if name in ("fedavg", "fedavg_sal"):
        return FedAvg(common)
    if name == "fedprox":
        return FedAvg(common, prox_mu=config.fedprox.mu)
    if name == "fedper":
        return FedPer(common)
    if name == "local":
        return LocalOnly(common)
    if name == "finetune":
        return Finetune(common, config.stage1_rounds)
    raise ValueError(f"config.algorithm = {name!r}: must be one of {list(ALGORITHMS)}")
