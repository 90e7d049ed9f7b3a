"""The ``system.*`` section: clients as devices in simulated time (fedms_jax/system.py)."""
from __future__ import annotations

import dataclasses

from fedms_jax.choices import AGGREGATIONS, AVAILABILITY, SPEEDS, STALENESS
from fedms_jax.config.base import _Section, _int


@dataclasses.dataclass(frozen=True)
class SystemConfig(_Section):
    """Clients as devices in simulated time (fedms_jax/system.py): compute speed, bandwidth,
    availability, dropouts and a round deadline. A client's round time is its download bytes /
    bandwidth_down + its local-training FLOPs (from the compiled client, at its SAL level) / its
    speed + its upload bytes / bandwidth_up; the round lasts until the server has what it waits
    for. Off (``speed = none``): every client is ideal and rounds take no simulated time."""

    _key = "system."
    speed: str = "none"  # none | lognormal (median speed_median, log-spread speed_sigma) | file
    speed_median: float = 1e10  # FLOP/s of the median client
    speed_sigma: float = 1.0  # lognormal: standard deviation of log(speed)
    # speed = file: measured device speeds in FLOP/s (.npy, or text with one per line); each client
    # draws one, with replacement, from the stream (seed, SYSTEM, 0)
    speed_file: str = ""
    bandwidth_up: float = 1e6  # bytes/s, the median client's upload
    bandwidth_down: float = 1e7  # bytes/s, the median client's download
    bandwidth_sigma: float = 0.0  # lognormal spread of both bandwidths (0: every client the median)
    # always | bernoulli: available in a round with probability available_p, independently | trace:
    # on/off windows in simulated seconds from trace_file (CSV rows client,start_s,end_s; client c
    # follows the (c mod n)-th of the n traced client ids in increasing order; windows repeat
    # every trace_period_s when that is > 0)
    availability: str = "always"
    available_p: float = 1.0
    trace_file: str = ""
    trace_period_s: float = 0.0
    dropout: float = 0.0  # probability that a selected client drops out during its round (its work is lost)
    # > 0: the server aggregates what has arrived this many simulated seconds after the round
    # began; the late are dropped (their compute counted as wasted)
    deadline_s: float = 0.0
    # the server selects cohort_size available clients and closes the round once
    # ceil(cohort_size / over_selection) have reported (deployed systems over-select by ~1.3)
    over_selection: float = 1.0
    # sync: rounds | fedbuff: buffered asynchronous aggregation (FedBuff): `concurrency` clients
    # train at once, each from the server version it downloaded, and the server steps whenever
    # cohort_size results are buffered (a "round" is then one server step)
    aggregation: str = "sync"
    concurrency: int = _int(0, lo=0)  # fedbuff: clients in flight (0: 2 x cohort_size)
    staleness: str = "sqrt"  # fedbuff: a result's weight by its staleness s: sqrt = 1/sqrt(1+s) | constant = 1
    # fedbuff: server versions kept on the device; a result staler than this minus 1 is discarded
    max_staleness: int = _int(16)

    @property
    def enabled(self) -> bool:
        return self.speed != "none"

    @property
    def buffered(self) -> bool:
        return self.aggregation == "fedbuff"

    def _validate(self) -> None:
        self._choice("speed", SPEEDS)
        self._choice("availability", AVAILABILITY)
        self._check(self.speed_median > 0, "speed_median", "must be > 0 (FLOP/s)")
        self._check(self.speed_sigma >= 0, "speed_sigma", "must be >= 0")
        self._check(self.speed != "file" or bool(self.speed_file), "speed_file", "must name a file when system.speed = 'file'")
        self._check(self.bandwidth_up > 0, "bandwidth_up", "must be > 0 (bytes/s)")
        self._check(self.bandwidth_down > 0, "bandwidth_down", "must be > 0 (bytes/s)")
        self._check(self.bandwidth_sigma >= 0, "bandwidth_sigma", "must be >= 0")
        self._check(0 < self.available_p <= 1, "available_p", "must be in (0, 1]")
        self._check(self.availability != "trace" or bool(self.trace_file), "trace_file",
                    "must name a CSV of client,start_s,end_s rows when system.availability = 'trace'")
        self._check(self.trace_period_s >= 0, "trace_period_s", "must be >= 0 (0: the windows do not repeat)")
        self._check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        self._check(self.deadline_s >= 0, "deadline_s", "must be >= 0 (0: no deadline)")
        self._check(self.over_selection >= 1, "over_selection", "must be >= 1")
        self._choice("aggregation", AGGREGATIONS)
        self._choice("staleness", STALENESS)
        if self.buffered:
            self._check(self.enabled, "aggregation", "fedbuff runs in simulated time: set system.speed (lognormal or file)")
            self._check(self.deadline_s == 0, "deadline_s", "is for synchronous rounds: fedbuff has no round deadline")
            self._check(self.over_selection == 1, "over_selection", "is for synchronous rounds (fedbuff: system.concurrency)")
        if not self.enabled:  # the rest of the model needs clients with a speed
            for name, default in (("availability", "always"), ("dropout", 0.0), ("deadline_s", 0.0),
                                  ("over_selection", 1.0)):
                self._check(getattr(self, name) == default, name, "needs a system model: set system.speed (lognormal or file)")
