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

from typing import Any, Callable

from fedms_jax.federated.protocol import Algorithm, Settings, Stage, single, staged
from fedms_jax.algorithms.ditto import ditto
from fedms_jax.algorithms.fedavg import fedavg, fedprox
from fedms_jax.algorithms.fedms import fedms
from fedms_jax.algorithms.fedper import fedper
from fedms_jax.algorithms.fedrep import fedrep
from fedms_jax.algorithms.finetune import finetune
from fedms_jax.algorithms.local import local
from fedms_jax.choices import ALGORITHMS, USES_SAL

__all__ = [
    "ALGORITHMS", "REGISTRY", "USES_SAL", "Algorithm", "Settings", "Stage", "ditto", "fedavg", "fedms",
    "fedper", "fedprox", "fedrep", "finetune", "local", "make_algorithm", "single", "staged",
]

# config.algorithm -> (settings, config) -> Algorithm; the options are the config's own sections.
REGISTRY: dict[str, Callable[[Settings, Any], Algorithm]] = {
    "fedms": lambda s, c: fedms(s, c.stage1_rounds, c.fedms),
    "fedavg_sal": lambda s, c: fedavg(s, "fedavg_sal"),
    "fedavg": lambda s, c: fedavg(s, "fedavg"),
    "fedprox": lambda s, c: fedprox(s, c.fedprox),
    "fedper": lambda s, c: fedper(s),
    "fedrep": lambda s, c: fedrep(s, c.fedrep),
    "ditto": lambda s, c: ditto(s, c.ditto),
    "local": lambda s, c: local(s),
    "finetune": lambda s, c: finetune(s, c.stage1_rounds),
}
assert tuple(REGISTRY) == ALGORITHMS, "fedms_jax.choices.ALGORITHMS and the registry disagree"


def make_algorithm(config, settings: Settings) -> Algorithm:
    """The algorithm ``config.algorithm`` (a validated ``config.Config``) over ``settings``.

    Algorithms outside ``USES_SAL`` train every block (``sal.*`` does not apply to them).
    """
    name = config.algorithm
    if name not in REGISTRY:
        raise ValueError(f"config.algorithm = {name!r}: must be one of {list(ALGORITHMS)}")
    return REGISTRY[name](settings if name in USES_SAL else settings.with_schedule("all"), config)
