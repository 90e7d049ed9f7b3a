"""``Config``: the whole run, its sections, the checks that span sections; ``validate``."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from fedms_jax import budgets as _budgets
from fedms_jax.choices import ALGORITHMS, TWO_STAGE, USES_SAL
from fedms_jax.config.base import ConfigError, _check, _hints, _int, _section, _Section
from fedms_jax.config.sections import (
    CheckpointConfig, ClientConfig, CompileConfig, DataConfig, DittoConfig, DPConfig, FedMSConfig, FedProxConfig,
    FedRepConfig, GuardConfig, LoRAConfig, MeshConfig, ModelConfig, MultihostConfig, PlacementConfig, PopulationConfig,
    SALConfig, ServerConfig,
)
from fedms_jax.config.system import SystemConfig


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    """A run: the top-level scalars and one section each; checks that span sections live here.

    Frozen and hashable; build a variant with ``dataclasses.replace`` (it validates again)."""

    seed: int = _int(0, lo=0)  # every random draw comes from a named stream (seed, purpose, ...): fedms_jax.rng
    algorithm: str = "fedms"  # fedms | fedavg_sal | fedavg | fedprox | fedper | fedrep | ditto | local | finetune
    rounds: int = _int(24)  # all stages together
    stage1_rounds: int = _int(12, lo=0)  # two-stage algorithms (fedms, finetune): rounds of stage 1
    cohort_size: int = _int(8)  # clients sampled each round
    eval_every: int = _int(1)  # rounds between evaluations (and always after the last round)
    eval_clients: int = _int(8)  # clients evaluated at once (vmapped) in personalised evaluation
    eval_batch: int = _int(256)  # test examples per evaluation batch (inside a client; global test set)
    fedms: FedMSConfig = _section(FedMSConfig)
    fedprox: FedProxConfig = _section(FedProxConfig)
    fedrep: FedRepConfig = _section(FedRepConfig)
    ditto: DittoConfig = _section(DittoConfig)
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    lora: LoRAConfig = _section(LoRAConfig)
    sal: SALConfig = _section(SALConfig)
    client: ClientConfig = _section(ClientConfig)
    server: ServerConfig = _section(ServerConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    mesh: MeshConfig = _section(MeshConfig)
    placement: PlacementConfig = _section(PlacementConfig)
    compile: CompileConfig = _section(CompileConfig)
    dp: DPConfig = _section(DPConfig)
    guard: GuardConfig = _section(GuardConfig)
    multihost: MultihostConfig = _section(MultihostConfig)
    population: PopulationConfig = _section(PopulationConfig)
    system: SystemConfig = _section(SystemConfig)

    def _validate(self) -> None:
        self._choice("algorithm", ALGORITHMS)
        if self.algorithm in TWO_STAGE:
            self._check(self.stage1_rounds < self.rounds, "stage1_rounds",
                        f"must be < rounds={self.rounds} (stage 2 needs at least one round)")
        self._check(self.cohort_size <= self.data.num_clients, "cohort_size",
                    f"must be <= data.num_clients={self.data.num_clients}")
        # A pretrained backbone's depth is only known once it is loaded (SALSchedule checks then).
        m = self.model
        trainable = m.layers - m.frozen_blocks
        _check(self.sal.k0 <= trainable or bool(m.pretrained), "sal.k0", self.sal.k0,
               f"must be <= model.layers={m.layers}" if not m.frozen_blocks else
               f"must be <= model.layers - model.frozen_blocks = {m.layers} - {m.frozen_blocks} = {trainable}")
        # Known bug (issue 25): FedMS's stage-2 round with the global expert training deadlocks in
        # a model-axis all-reduce under the tensor layout (8 CPU devices, 2x4); refused until fixed.
        _check(not (self.algorithm == "fedms" and self.fedms.train_global and self.mesh.strategy == "tensor"
                    and self.mesh.model > 1), "mesh.strategy", self.mesh.strategy,
               "with algorithm='fedms' and fedms.train_global=true deadlocks (known bug): use "
               "mesh.strategy='fsdp' or fedms.train_global=false")
        _check(not (self.dp.enabled and self.algorithm == "local"), "dp.clip", self.dp.clip,
               "algorithm='local' sends nothing to the server: there is nothing to privatise")
        chunk = self.placement.chunk_size
        _check(chunk == 0 or self.cohort_size % chunk == 0, "placement.chunk_size", chunk,
               f"must divide cohort_size={self.cohort_size}")
        sy = self.system
        if self.sal.budget_mode == "deadline":
            _check(sy.deadline_s > 0, "sal.budget_mode", "deadline",
                   "picks each client's SAL depth to meet system.deadline_s: set system.speed and system.deadline_s > 0")
            _check(self.algorithm in USES_SAL, "sal.budget_mode", "deadline",
                   f"limits the SAL level; algorithm={self.algorithm!r} trains every block (it applies to {list(USES_SAL)})")
        if sy.buffered:
            _check(sy.concurrency == 0 or sy.concurrency >= self.cohort_size, "system.concurrency", sy.concurrency,
                   f"must be >= cohort_size={self.cohort_size} (the results a server step waits for), or 0")
            _check(not self.sal.budgets and self.sal.budget_mode != "deadline", "system.aggregation", "fedbuff",
                   "does not combine with budget tiers or sal.budget_mode='deadline' (every result trains the step's level)")
            _check(sy.concurrency <= self.data.num_clients, "system.concurrency", sy.concurrency,
                   f"must be <= data.num_clients={self.data.num_clients}")
            _check((sy.concurrency or 2 * self.cohort_size) <= self.data.num_clients, "system.concurrency", sy.concurrency,
                   f"0 means 2 x cohort_size = {2 * self.cohort_size}, more than data.num_clients={self.data.num_clients}: set it")
        if self.sal.budgets and sy.availability != "always":
            _check(False, "system.availability", sy.availability,
                   "budget tiers fix each round's clients per tier, which availability cannot promise: use "
                   "sal.budget_mode='deadline' (no tiers) or system.availability='always'")
        if self.dp.enabled and (sy.availability != "always" or sy.dropout > 0 or sy.deadline_s > 0 or sy.over_selection > 1
                                or sy.buffered):
            # The accountant's amplification assumes a fixed-size uniform sample of all clients;
            # availability, over-selection, dropouts and deadlines change who contributes in ways
            # correlated with the clients (a slow client's data), which it does not model.
            _check(False, "dp.clip", self.dp.clip,
                   "DP's accounting assumes every sampled client contributes (a uniform sample of all clients): "
                   "it does not combine with system.availability, dropout, deadline_s, over_selection or fedbuff")
        b = self.sal.budgets
        if b:  # budget-aware SAL (fedms_jax/budgets.py)
            _check(self.algorithm in USES_SAL, "sal.budgets", b,
                   f"budgets limit the SAL level; algorithm={self.algorithm!r} trains every block on every "
                   f"client (budgets apply to {list(USES_SAL)})")
            _check(max(b) <= trainable or bool(m.pretrained), "sal.budgets", b,
                   f"each must be <= the {trainable} trainable blocks (model.layers - model.frozen_blocks)")
            for key, value, what in _budgets.problems(b, self.sal.budget_shares, self.sal.budget_mode,
                                                      self.data.num_clients, self.cohort_size):
                _check(False, key, value, what)

    @classmethod
    def from_dict(cls, config: ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
        """A ConfigDict (or nested mapping) as a Config. An unknown key is an error; a missing
        one takes its default (config files older than the key keep working)."""
        return _build(cls, config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config, "")


def _build(cls: type[_Section], values: Any, prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config.{prefix[:-1]} = {values!r}: must be a section (a ConfigDict)")
    hints = _hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    for key in values:
        if key not in names:
            where = prefix[:-1] or "the top level"
            raise ConfigError(f"unknown config key {prefix + str(key)!r} ({key!r} is not in {where}: {names})")
    return cls(**{
        k: _build(hints[k], v, f"{prefix}{k}.") if dataclasses.is_dataclass(hints[k]) else v
        for k, v in values.items()
    })


def validate(config: Config | ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
    """The config as a (valid) ``Config``; raises ConfigError naming the first bad key and its
    value. A ``Config`` is returned as it is: it was checked when it was made."""
    return config if isinstance(config, Config) else Config.from_dict(config)
