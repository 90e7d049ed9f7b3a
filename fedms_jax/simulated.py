"""An experiment's rounds in simulated time (``system.*``): the system model, the timeline of
plans it gives each round, and what a client costs at each SAL level.

``SimulatedTime`` is the part of ``experiment.Experiment`` that answers for the system model: the
round loop asks it each round's inputs (``round_inputs``: the slots' depths and, for FedBuff,
their versions and weights) and cohort; the costs it plans with are measured from the compiled
client program once per stage (``accounting.level_costs``).
"""
from __future__ import annotations

import numpy as np

from fedms_jax import system
from fedms_jax.config import Config, ConfigError
from fedms_jax.federated import accounting
from fedms_jax.federated.types import BufferedServer, Phase, server_of


class SimulatedTime:
    """Mixed into ``Experiment``, whose fields it reads: config, algorithm, engine, resources,
    system and the ``_memo`` dict (the timeline, the costs per stage)."""

    @property
    def timeline(self) -> system.Timeline | None:
        """The rounds in simulated time (None without a system model), made on first use: it
        measures each stage's client FLOPs (``accounting.level_costs``: two client compiles per
        stage at most)."""
        if self.system is None:
            return None
        if "timeline" not in self._memo and self.config.system.buffered:
            sy = self.config.system
            self._memo["timeline"] = system.BufferedTimeline(
                self.system, self.algorithm.phase, self.level_costs, sy.concurrency or 2 * self.config.cohort_size,
                sy.staleness, sy.max_staleness)
        if "timeline" not in self._memo:
            tiers = self.engine.tiers
            self._memo["timeline"] = system.Timeline(
                self.system, self.algorithm.phase, self.level_costs,
                levels=None if tiers is None else lambda p: np.repeat(tiers.levels(p.num_active), tiers.counts),
                cohort=None if self.resources is None else self.resources.cohort,
                deadline_depth=self.engine.deadline_depth)
        return self._memo["timeline"]

    def level_costs(self, phase: Phase) -> system.Costs:
        """What one client of ``phase``'s stage costs at each level the run trains it at
        (``accounting.level_costs``; memoised per stage)."""
        key = ("costs", phase.stage)
        if key not in self._memo:
            phases = [p for p in self.algorithm.phases(self.config.rounds) if p.stage == phase.stage]
            levels = {p.num_active for p in phases}
            if self.engine.tiers is not None:
                levels |= {lv for p in phases for lv in self.engine.tiers.levels(p.num_active)}
            if self.engine.deadline_depth:
                levels.add(1)
            server, clients = self.states_like()
            self._memo[key] = accounting.level_costs(self.engine, server_of(server), clients, phase.stage, sorted(levels),
                                                     self._memo.setdefault("flops_at", {}))
        return self._memo[key]

    def round_inputs(self, round_index: int) -> dict:
        """What round ``round_index`` takes beside its cohort (``Engine.run_round``'s keywords):
        each slot's ``depth`` (``system.Plan.depth``; absent without a system model: every
        client trains its level) and for FedBuff ``buffered`` (each result's version, weight)."""
        if self.system is None:
            return {}
        plan = self.timeline.plan(round_index)
        return {"depth": plan.depth, **({"buffered": (plan.version, plan.weight)} if plan.version is not None else {})}

    def _buffered(self, server):
        """FedBuff: the server with its ring of versions (``BufferedServer``); else as it is."""
        if not self.engine.versions:
            return server
        return BufferedServer.start(server, self.engine.versions)


def make_system(config: Config, cohort_seed: int | None = None) -> system.SystemModel | None:
    """The system model of ``config.system`` (None when off); a file it reads that is missing or
    malformed is a ConfigError naming the key."""
    if not config.system.enabled:
        return None
    try:
        return system.SystemModel(config.system, config.seed, config.data.num_clients, config.cohort_size, cohort_seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
