"""Federated algorithms as factories of pure-function records (``common.Algorithm``), all on the
same engine; ``make_algorithm`` builds the one a config names.

| name        | what                                          | SAL schedule  |
|-------------|-----------------------------------------------|---------------|
| fedms       | FedMS: stage 1 FedAvg+SAL, stage 2 MoFM       | ``sal.*``     |
| fedavg_sal  | FedAvg-LoRA with SAL (FedMS stage 1 alone)    | ``sal.*``     |
| fedavg      | FedAvg-LoRA, all blocks                       | all blocks    |
| fedprox     | FedProx-LoRA (``fedprox.mu``)                 | all blocks    |
| fedper      | LoRA federated, head local                    | all blocks    |
| fedrep      | FedPer, but head then body each round         | all blocks    |
| ditto       | FedAvg + personal model pulled to global      | all blocks    |
| local       | local-only LoRA, nothing sent                 | all blocks    |
| finetune    | FedAvg, then local fine-tuning (stage 2)      | all blocks    |
"""
from __future__ import annotations

from fedms_jax.algorithms.common import Algorithm, Settings, Stage, single, staged
from fedms_jax.algorithms.ditto import ditto
from fedms_jax.algorithms.fedavg import fedavg, fedprox
from fedms_jax.algorithms.fedms import fedms
from fedms_jax.algorithms.fedper import fedper
from fedms_jax.algorithms.fedrep import fedrep
from fedms_jax.algorithms.finetune import finetune
from fedms_jax.algorithms.local import local
from fedms_jax.config import ALGORITHMS, USES_SAL

__all__ = [
    "ALGORITHMS", "USES_SAL", "Algorithm", "Settings", "Stage", "ditto", "fedavg", "fedms",
    "fedper", "fedprox", "fedrep", "finetune", "local", "make_algorithm", "single", "staged",
]


def make_algorithm(config, settings: Settings) -> Algorithm:
    """The algorithm ``config.algorithm`` (a validated ``config.Config``) over ``settings``; its
    options are the config's own sections (``config.fedms``, ``config.fedprox``).

    Algorithms outside ``USES_SAL`` train every block (``sal.*`` does not apply to them).
    """
    name = config.algorithm
    if name not in USES_SAL:
        settings = settings.with_schedule("all")
    if name == "fedms":
        return fedms(settings, config.stage1_rounds, config.fedms)
    if name in ("fedavg", "fedavg_sal"):
        return fedavg(settings, name)
    if name == "fedprox":
        return fedprox(settings, config.fedprox)
    if name == "fedper":
        return fedper(settings)
    if name == "fedrep":
        return fedrep(settings, config.fedrep)
    if name == "ditto":
        return ditto(settings, config.ditto)
    if name == "local":
        return local(settings)
    if name == "finetune":
        return finetune(settings, config.stage1_rounds)
    raise ValueError(f"config.algorithm = {name!r}: must be one of {list(ALGORITHMS)}")
