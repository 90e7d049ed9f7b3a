"""Clients as devices in simulated time: speeds, bandwidths, availability, dropouts, deadlines.

A seeded **system model** (``system.*``, DESIGN.md section 1 "Systems", our choice) gives every
client c a compute speed ``s_c`` (FLOP/s: lognormal with a median and a log-spread, or drawn
from a file of measured device speeds), bandwidths ``up_c`` and ``down_c`` (bytes/s, lognormal
around their medians) and an availability (always; Bernoulli per round; or on/off windows of a
trace, in simulated seconds). A client at SAL level d downloads, trains, then uploads:

    time_c(d) = down_bytes(d) / down_c + flops(d) / s_c + up_bytes(d) / up_c

with ``flops(d)`` and the bytes those of the compiled client program at level d
(``level_costs``). A **synchronous round** (``SystemModel.plan``) starting at simulated time T:

1. the clients available at T are known; ``cohort_size`` of them are selected uniformly (the
   round program's static size; when fewer are available, the rest of the slots hold
   unavailable clients that take no part: depth 0);
2. each selected client drops out with probability ``dropout``, at a uniform fraction of its
   round (its work so far is wasted);
3. the server waits for ``ceil(cohort_size / over_selection)`` reports, or until the deadline
   ``deadline_s`` after T, or until it has heard from every selected client (a report, or a
   dropout noticed), whichever comes first; the first reports up to that number contribute (in
   arrival order), the others' compute until the round closed is counted as wasted (a client
   that would drop out after the close is late);
4. with ``sal.budget_mode = deadline`` each selected client trains the top
   ``d_c = max{d <= k : time_c(d) <= deadline_s}`` blocks (1 when none fits: it will be late),
   so a slow client sends a smaller update instead of none; each block is averaged over the
   clients that trained it (the server's per-unit weights).

The plan of a round is a pure numpy function of (seed, round, the clock at its start), so a
resumed run replays the clock and draws the same. Its outcome for the device is one array, the
**depth** of each cohort slot: 0 for a client that contributes nothing (unavailable, dropped,
late), else the number of top blocks it trains (the group's level without deadline mode).

What this does not simulate: the server's own compute and its aggregation time, contention on a
shared link, a client's speed changing within the run, and partial uploads. This module imports
no jax.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedms_jax import rng as rngs
from fedms_jax.budgets import uniform_cohort
from fedms_jax.rng import Stream


class Costs(NamedTuple):
    """What one client's round costs at each SAL level d (index d; entry 0 unused): local
    training FLOPs and the bytes it downloads and uploads."""

    flops: np.ndarray  # [L + 1] float64
    down: np.ndarray  # [L + 1] bytes
    up: np.ndarray  # [L + 1] bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """A round's plan: the cohort ids [C] int32, each slot's depth [C] int32 (0: contributes
    nothing), the round's simulated duration and its bookkeeping (``record``). Buffered
    (FedBuff) steps also give each result's server version ``version`` [C] int64 (what the
    client downloaded) and staleness weight ``weight`` [C] float32."""

    ids: np.ndarray
    depth: np.ndarray
    duration: float
    record: dict
    version: np.ndarray | None = None
    weight: np.ndarray | None = None


def read_speeds(path: str | Path) -> np.ndarray:
    """Device speeds (FLOP/s) from a ``.npy`` file or a text file of one number per line."""
    path = Path(path)
    try:
        values = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=1)
    except (OSError, ValueError) as e:
        raise ValueError(f"config.system.speed_file = {str(path)!r}: cannot read device speeds ({e})") from None
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"config.system.speed_file = {str(path)!r}: needs at least one speed, every one finite and > 0")
    return values


def read_trace(path: str | Path) -> dict[int, np.ndarray]:
    """On-windows per traced client from a CSV of ``client,start_s,end_s`` rows (a header row
    is allowed): {client: [[start, end], ...]} sorted by start."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config.system.trace_file = {str(path)!r}: cannot read it ({e})") from None
    windows: dict[int, list[tuple[float, float]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip() or (n == 1 and not fields[0].lstrip("-").isdigit()):
            continue
        try:
            client, start, end = int(fields[0]), float(fields[1]), float(fields[2])
        except (IndexError, ValueError):
            raise ValueError(f"config.system.trace_file = {str(path)!r}: line {n} is not client,start_s,end_s: {line!r}") from None
        if client < 0 or not start < end:
            raise ValueError(f"config.system.trace_file = {str(path)!r}: line {n} needs a client >= 0 and start_s < end_s: {line!r}")
        windows.setdefault(client, []).append((start, end))
    if not windows:
        raise ValueError(f"config.system.trace_file = {str(path)!r}: holds no window")
    return {c: np.array(sorted(w), np.float64) for c, w in windows.items()}


class SystemModel:
    """The devices of ``num_clients`` clients and the rounds they run (see the module docstring).

    config: a ``config.SystemConfig`` (enabled). ``cohort_seed``: the seed of the selections
    (None: ``seed``)."""

    def __init__(self, config, seed: int, num_clients: int, cohort_size: int, cohort_seed: int | None = None) -> None:
        if not config.enabled:
            raise ValueError("SystemModel needs system.speed set (lognormal or file)")
        self.config, self.seed, self.num_clients, self.cohort_size = config, seed, num_clients, cohort_size
        self.cohort_seed = seed if cohort_seed is None else cohort_seed
        r = rngs.numpy(seed, Stream.SYSTEM, 0)
        if config.speed == "file":
            self.speed = r.choice(read_speeds(config.speed_file), num_clients, replace=True)
        else:
            self.speed = config.speed_median * np.exp(config.speed_sigma * r.standard_normal(num_clients))
        b = rngs.numpy(seed, Stream.SYSTEM, 1)
        spread = lambda: np.exp(config.bandwidth_sigma * b.standard_normal(num_clients))
        self.up = config.bandwidth_up * spread()
        self.down = config.bandwidth_down * spread()
        self.trace = read_trace(config.trace_file) if config.availability == "trace" else None
        self.goal = math.ceil(cohort_size / config.over_selection)
        ranks = np.argsort(np.argsort(self.speed, kind="stable"), kind="stable")
        self.quintile = (ranks * 5 // num_clients).astype(np.int32)  # 0: the slowest fifth of the clients

    # --- who is there -------------------------------------------------------------------------
    def available(self, round_index: int, clock: float) -> np.ndarray:
        """Which clients can be selected for a round starting at simulated time ``clock``: bool [N]."""
        c = self.config
        if c.availability == "always":
            return np.ones(self.num_clients, bool)
        if c.availability == "bernoulli":
            return rngs.numpy(self.seed, Stream.SYSTEM, 2, round_index).random(self.num_clients) < c.available_p
        t = clock % c.trace_period_s if c.trace_period_s > 0 else clock
        traced = sorted(self.trace)
        on = np.array([bool(np.any((w[:, 0] <= t) & (t < w[:, 1]))) for w in (self.trace[k] for k in traced)])
        return on[np.arange(self.num_clients) % len(traced)]

    def select(self, round_index: int, available: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The round's cohort [C] (sorted) and which of its slots hold an available client. With
        every client available it is the uniform cohort of a run without a system model (the
        same clients, so runs with and without one compare on the same draws)."""
        m = self.cohort_size
        if available.all():
            return uniform_cohort(self.cohort_seed, round_index, self.num_clients, m), np.ones(m, bool)
        r = rngs.numpy(self.cohort_seed, Stream.SYSTEM, 3, round_index)
        on, off = np.flatnonzero(available), np.flatnonzero(~available)
        chosen = r.choice(on, min(m, len(on)), replace=False)
        filler = r.choice(off, m - len(chosen), replace=False)  # static cohort size: slots that take no part
        ids = np.concatenate([chosen, filler]).astype(np.int32)
        order = np.argsort(ids, kind="stable")
        return ids[order], np.concatenate([np.ones(len(chosen), bool), np.zeros(len(filler), bool)])[order]

    # --- what a round costs --------------------------------------------------------------------
    def times(self, ids: np.ndarray, levels: np.ndarray, costs: Costs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(download, compute, upload) seconds of clients ``ids`` at SAL ``levels`` (arrays [m])."""
        return (costs.down[levels] / self.down[ids], costs.flops[levels] / self.speed[ids], costs.up[levels] / self.up[ids])

    def fitting_depth(self, ids: np.ndarray, k: int, costs: Costs) -> np.ndarray:
        """deadline mode: each client's largest depth d in [1, k] whose round time fits
        ``deadline_s`` (1 where none does) [m] int32."""
        levels = np.arange(1, k + 1)
        total = sum(self.times(np.repeat(ids, k), np.tile(levels, len(ids)), costs)).reshape(len(ids), k)
        fits = total <= self.config.deadline_s
        best = np.where(fits, levels[None, :], 0).max(axis=1)
        return np.maximum(best, 1).astype(np.int32)

    def plan(self, round_index: int, clock: float, k: int, costs: Costs, levels: np.ndarray | None = None,
             ids: np.ndarray | None = None, deadline_depth: bool = False) -> Plan:
        """Round ``round_index`` starting at simulated ``clock``, SAL level ``k``.

        ``levels`` [C]: each slot's level when budget tiers fix them (None: k); ``ids``: a cohort
        already drawn (budget tiers: tier-major; then every client must be available); without
        it the cohort is selected from the available clients. ``deadline_depth``: each client's
        depth is the largest that fits the deadline (``fitting_depth``)."""
        c, m = self.config, self.cohort_size
        avail = self.available(round_index, clock)
        if ids is None:
            ids, present = self.select(round_index, avail)
        else:
            present = avail[ids]
        ids = np.asarray(ids, np.int32)
        if deadline_depth:
            depth = self.fitting_depth(ids, k, costs)
        else:
            depth = np.full(m, k, np.int32) if levels is None else np.asarray(levels, np.int32)
        t_down, t_comp, t_up = self.times(ids, depth, costs)
        total = t_down + t_comp + t_up
        r = rngs.numpy(self.cohort_seed, Stream.SYSTEM, 4, round_index)
        drops = (r.random(m) < c.dropout) & present
        drop_at = r.random(m) * total  # when a dropped client leaves
        alive = present & ~drops
        deadline = c.deadline_s if c.deadline_s > 0 else np.inf
        finish = np.where(alive, total, np.inf)
        arrived = np.sort(finish[alive & (finish <= deadline)])  # a dropout never arrives, deadline or not
        if len(arrived) >= self.goal:
            end = float(arrived[self.goal - 1])
        elif present.any():  # the goal is out of reach: the server waits for the deadline, or until it has
            # heard from every selected client (a report, or noticing that it dropped out), if that is sooner
            heard = max(np.max(finish[alive], initial=0.0), np.max(np.where(drops, drop_at, 0.0), initial=0.0))
            end = float(min(deadline, heard))
        else:  # nobody to wait for: the server waits until someone can be selected
            end = self.wait(clock)
        # The first `goal` reports in arrival order (ties at the goal's time: in cohort order).
        rank = np.empty(m, np.int64)
        rank[np.argsort(finish, kind="stable")] = np.arange(m)
        contributes = alive & (finish <= end) & (rank < self.goal)
        drops &= drop_at <= end  # one that would leave after the round closed is late, like the other unfinished
        stopped = np.where(drops, drop_at, end)  # when each non-contributing client's work ended
        computed = np.clip((stopped - t_down) * self.speed[ids], 0.0, costs.flops[depth])
        useful = float(np.sum(np.where(contributes, costs.flops[depth], 0.0)))
        wasted = float(np.sum(np.where(present & ~contributes, computed, 0.0)))
        late = present & ~drops & ~contributes
        record = {
            "sim_round_s": end,
            "sim_clock_s": clock + end,
            "sim_available": int(avail.sum()),
            "sim_selected": int(present.sum()),
            "sim_contributed": int(contributes.sum()),
            "sim_dropped": int(drops.sum()),
            "sim_late": int(late.sum()),
            "sim_useful_gflop": useful / 1e9,
            "sim_wasted_gflop": wasted / 1e9,
            "sim_mean_depth": float(depth[contributes].mean()) if contributes.any() else 0.0,
            # contributions by the clients' speed quintile (slowest fifth first)
            "sim_contributed_by_speed": np.bincount(self.quintile[ids[contributes]], minlength=5).tolist(),
        }
        return Plan(ids, np.where(contributes, depth, 0).astype(np.int32), end, record)

    def wait(self, clock: float) -> float:
        """Seconds from ``clock`` until the availability may change when nobody is available:
        the deadline (or 1 s) for Bernoulli rounds, the next window start of the trace."""
        c = self.config
        if c.availability != "trace":
            return c.deadline_s or 1.0
        starts = np.concatenate([w[:, 0] for w in self.trace.values()])
        t = clock % c.trace_period_s if c.trace_period_s > 0 else clock
        later = starts[starts > t]
        if later.size:
            return float(later.min() - t)
        if c.trace_period_s > 0:
            return float(c.trace_period_s - t + starts.min())
        raise ValueError(f"config.system.trace_file = {c.trace_file!r}: no client is available after simulated "
                         f"time {clock:.1f} s (the trace ends; set system.trace_period_s to repeat it)")


class Timeline:
    """The rounds of a run in simulated time: round t's ``Plan`` starts at the clock the plans of
    rounds 0..t-1 leave, so plans are made in order and kept (host numbers only: a resumed run
    replays them from round 0 and gets the same clock, bitwise).

    ``phase(t)`` -> (stage, k) of round t; ``costs(phase)`` -> its ``Costs``; ``levels(phase)``:
    each slot's level under budget tiers (None: k); ``cohort(t)``: a tier-major cohort (budget
    tiers; None: selected from the available clients); ``deadline_depth``: budget_mode=deadline."""

    def __init__(self, model: SystemModel, phase, costs, levels=None, cohort=None, deadline_depth: bool = False) -> None:
        self.model, self.phase, self.costs, self.levels, self.cohort = model, phase, costs, levels, cohort
        self.deadline_depth = deadline_depth
        self._plans: list[Plan] = []
        self._clock = 0.0

    def plan(self, round_index: int) -> Plan:
        while len(self._plans) <= round_index:
            t = len(self._plans)
            phase = self.phase(t)
            p = self.model.plan(t, self._clock, phase.num_active, self.costs(phase),
                                levels=None if self.levels is None else self.levels(phase),
                                ids=None if self.cohort is None else self.cohort(t), deadline_depth=self.deadline_depth)
            self._plans.append(p)
            self._clock += p.duration
        return self._plans[round_index]

    def clock(self, round_index: int) -> float:
        """The simulated time at which round ``round_index`` starts."""
        return 0.0 if round_index == 0 else self.plan(round_index - 1).record["sim_clock_s"]


STALENESS = {  # system.staleness: s (server versions since the client's download) -> weight
    "sqrt": lambda s: 1.0 / np.sqrt(1.0 + s),
    "constant": lambda s: np.ones_like(np.asarray(s, np.float64)),
}


class BufferedTimeline:
    """FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation")
    in simulated time: ``concurrency`` clients are always in flight, each training from the
    server version it downloaded when it started; a result is buffered when its client
    finishes, and the server steps once ``cohort_size`` results are buffered, each weighted by
    ``staleness(s)`` with s the versions the server moved since that client's download. A
    result staler than ``max_staleness - 1`` is discarded (its compute wasted: the device keeps
    only the last ``max_staleness`` versions). When a client finishes, drops out or is
    discarded, another starts at once (an available client that has no result pending,
    uniformly; when none is available, the server waits for one); the slot of the result that
    fills the buffer is refilled just after the step, so its client downloads the new version.

    Step t's plan: the buffered clients in arrival order (``ids``), their versions, weights and
    depth (the level of the step's phase), the simulated time the step happened (``record``).
    Draws: client selection j (the j-th start) from (cohort_seed, SYSTEM, 6, j), its dropout
    and drop time from (cohort_seed, SYSTEM, 7, j), availability at start j as round j's.
    Like ``Timeline``, plans are made in order and kept; a resumed run replays them."""

    def __init__(self, model: SystemModel, phase, costs, concurrency: int, staleness: str, max_staleness: int) -> None:
        self.model, self.phase, self.costs = model, phase, costs
        self.concurrency, self.weigh, self.max_staleness = concurrency, STALENESS[staleness], max_staleness
        self._plans: list[Plan] = []
        self._clock = 0.0
        self._events: list[tuple] = []  # heap of (time, seq, kind, client, version, level, start)
        self._seq = 0
        self._starts = 0
        self._busy = np.zeros(model.num_clients, bool)  # in flight or buffered
        self._buffer: list[tuple[int, int, int]] = []  # (client, version, level)
        self._inflight = 0
        self._waiting = False  # a 'retry' event is queued (nobody was available)
        self._wasted = self._useful = 0.0
        self._stale = self._dropped = 0
        self._start(0.0)

    def _start(self, now: float) -> None:
        """Fills the free slots at ``now``, each from the current server version. A slot stays
        empty while every available client is busy (the next event refills it); when nobody is
        available, or nothing is in flight to wait for, the simulation retries after ``wait``."""
        import heapq

        m = self.model
        while self._inflight < self.concurrency:
            j = self._starts
            available = m.available(j, now)
            free = available & ~self._busy
            if not free.any():
                if not self._waiting and (self._inflight == 0 or not available.any()):
                    self._waiting = True
                    heapq.heappush(self._events, (now + m.wait(now), self._next_seq(), "retry", -1, -1, 0, now, 0.0, 0.0))
                return
            self._starts += 1
            c = int(rngs.numpy(m.cohort_seed, Stream.SYSTEM, 6, j).choice(np.flatnonzero(free)))
            phase = self.phase(len(self._plans))
            level, costs = phase.num_active, self.costs(phase)
            t_down, t_comp, t_up = (float(x[0]) for x in m.times(np.array([c]), np.array([level]), costs))
            total = t_down + t_comp + t_up
            r = rngs.numpy(m.cohort_seed, Stream.SYSTEM, 7, j)
            drops, at = r.random() < m.config.dropout, r.random() * total
            version = len(self._plans)
            # what the client computes is fixed at its start (its stage's costs at its level)
            heapq.heappush(self._events, (now + (at if drops else total), self._next_seq(), "drop" if drops else "done",
                                          c, version, level, now, float(costs.flops[level]), t_down))
            self._busy[c] = True
            self._inflight += 1

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _computed(self, c: int, start: float, end: float, flops: float, t_down: float) -> float:
        """FLOPs client c had computed at ``end`` of a round of ``flops`` begun at ``start``
        (downloading for ``t_down`` seconds first)."""
        return float(np.clip((end - start - t_down) * self.model.speed[c], 0.0, flops))

    def _step(self) -> Plan:
        import heapq

        m, k = self.model, self.model.cohort_size
        self._start(self._clock)  # the slots of the last step's results, from the version it made
        while len(self._buffer) < k:
            now, _, kind, c, version, level, start, flops, t_down = heapq.heappop(self._events)
            if kind == "retry":
                self._waiting = False
                self._start(now)
                continue
            self._inflight -= 1
            step = len(self._plans)
            if kind == "drop":
                self._dropped += 1
                self._wasted += self._computed(c, start, now, flops, t_down)
                self._busy[c] = False
            elif step - version >= self.max_staleness:
                self._stale += 1
                self._wasted += self._computed(c, start, now, flops, t_down)
                self._busy[c] = False
            else:
                self._buffer.append((c, version, level))
                self._useful += flops
            if len(self._buffer) < k:  # the k-th result's slot is refilled after the step, from its version
                self._start(now)
        step = len(self._plans)
        ids = np.array([b[0] for b in self._buffer], np.int32)
        version = np.array([b[1] for b in self._buffer], np.int64)
        staleness = step - version
        self._busy[ids] = False
        self._buffer = []
        duration = now - self._clock
        self._clock = now
        record = {
            "sim_round_s": duration, "sim_clock_s": now, "sim_in_flight": self._inflight,
            "sim_contributed": k, "sim_mean_staleness": float(staleness.mean()), "sim_max_staleness": int(staleness.max()),
            "sim_dropped_total": self._dropped, "sim_stale_total": self._stale,
            "sim_useful_gflop_total": self._useful / 1e9, "sim_wasted_gflop_total": self._wasted / 1e9,
            "sim_contributed_by_speed": np.bincount(m.quintile[ids], minlength=5).tolist(),
        }
        depth = np.full(k, self.phase(step).num_active, np.int32)
        return Plan(ids, depth, duration, record, version, self.weigh(staleness).astype(np.float32))

    def plan(self, round_index: int) -> Plan:
        while len(self._plans) <= round_index:
            self._plans.append(self._step())
        return self._plans[round_index]

    def clock(self, round_index: int) -> float:
        return 0.0 if round_index == 0 else self.plan(round_index - 1).record["sim_clock_s"]
