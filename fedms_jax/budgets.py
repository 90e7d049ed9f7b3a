"""Budget-aware SAL: a resource model of the clients' compute, and the round's tier groups.

Our reading of the FedMS papers (DESIGN.md section 1): SAL activates the top ``k(t)`` blocks'
LoRA at round t, and -- as a survey describes FedMS -- adjusts the number of activated LoRA
matrices to each client's compute. Here a client c has a **budget** ``b_c`` in blocks and trains
the top ``min(k(t), b_c)`` blocks: it runs the round exactly as SAL at that level would
(inactive blocks have no LoRA compute, no gradient, and nothing is sent for them), and each
block is averaged over the clients that trained it (per-unit aggregation weights,
``federated.server``).

**Tiers.** Budgets come in a handful of tiers ``sal.budgets = (b_1 < ... < b_T)`` with shares
``sal.budget_shares`` (equal when left empty). So that every round program has static shapes,
the number of cohort clients in each tier is fixed: ``counts = apportion(cohort_size, shares)``
(largest remainder; every tier gets at least one client, or the config is refused). The cohort
of a round is listed tier by tier (``tier-major``): tier 1's ``counts[0]`` clients, then tier
2's, ... (each tier's ids sorted). Two modes (``sal.budget_mode``):

  * ``static``: a client's tier never changes. The tiers of the ``num_clients`` clients are the
    exact apportionment of ``num_clients`` by the shares, assigned by a permutation seeded by
    ``(seed, 'budget')`` (a stratified draw: each client's tier has the shares as its
    distribution, and the tier populations are exact, so the cohort's per-tier counts are always
    available -- checked when the config is validated). Round t samples ``counts[g]`` clients
    uniformly without replacement from each tier g, seeded by ``(seed, 'budget', t)``.
  * ``dynamic``: availability changes every round. The cohort is the same uniform draw as
    without budgets (``uniform_cohort``), and the fixed multiset of tiers (``counts``) is
    assigned to its members by a permutation seeded by ``(seed, 'budget', t)``.

Everything is a pure numpy function of (seed, round, client), so a resumed run draws the same.
This module imports no jax (``config`` uses ``apportion`` to validate before jax starts).

**Groups.** At level k the tiers whose ``min(k, b)`` are equal train the same program, so
adjacent tiers with equal levels merge into one *group* (``Tiers.groups``): a round at k runs one
client program per distinct level. A 12-block model with budgets (4, 8, 12) under a progressive
schedule k = 1..12 has 12 round programs (one per k, as without budgets); k <= 4 run one group,
4 < k <= 8 two, k > 8 three -- 24 client bodies inlined over the 12 programs, 12 distinct client
programs (levels 1..12).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np

from fedms_jax import rng as rngs
from fedms_jax.choices import BUDGET_MODES, TIER_MODES as MODES  # sal.budget_mode
from fedms_jax.rng import Stream


def uniform_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform without replacement, from the stream (seed, COHORT, round), sorted: a resumed run draws the same
    (``federated.rounds.sample_cohort``, the cohort without budgets)."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort_size must be in [1, {num_clients}], got {cohort_size}")
    rng = rngs.numpy(seed, Stream.COHORT, round_index)
    return np.sort(rng.choice(num_clients, cohort_size, replace=False)).astype(np.int32)


def equal_shares(n: int) -> tuple[float, ...]:
    return (1.0 / n,) * n


def apportion(total: int, shares: Sequence[float]) -> tuple[int, ...]:
    """``total`` split by ``shares`` (largest remainder; ties to the earlier tier): integers
    summing to ``total``, each within 1 of ``total * share``."""
    weight = float(sum(shares))
    raw = [total * s / weight for s in shares]
    base = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return tuple(int(b) for b in base)


class Group(NamedTuple):
    """Cohort slots ``[start, start + size)``, of tiers ``tiers``, trained at SAL level ``level``."""

    level: int
    start: int
    size: int
    tiers: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Tiers:
    """The static tier structure of every round: budgets (strictly increasing, in blocks) and the
    cohort clients per tier (a tier-major cohort lists them in this order)."""

    budgets: tuple[int, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.budgets) != len(self.counts) or not self.budgets:
            raise ValueError(f"budgets {self.budgets} and counts {self.counts} must be non-empty and of one length")
        if any(b < 0 for b in self.budgets) or list(self.budgets) != sorted(set(self.budgets)):
            raise ValueError(f"budgets must be strictly increasing and >= 0, got {self.budgets}")
        if any(c < 1 for c in self.counts):
            raise ValueError(f"every tier needs at least one client per round, got counts {self.counts}")

    @property
    def cohort_size(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum((0,) + self.counts[:-1]))

    def levels(self, k: int) -> tuple[int, ...]:
        """Each tier's SAL level at k: ``min(k, b)``."""
        return tuple(min(k, b) for b in self.budgets)

    def groups(self, k: int) -> tuple[Group, ...]:
        """Adjacent tiers with the same level at k merged (budgets increase, so equal levels are
        adjacent): the round's client programs, in cohort order."""
        out: list[Group] = []
        for i, (level, start, n) in enumerate(zip(self.levels(k), self.starts, self.counts)):
            if out and out[-1].level == level:
                g = out[-1]
                out[-1] = Group(level, g.start, g.size + n, g.tiers + (i,))
            else:
                out.append(Group(level, start, n, (i,)))
        return tuple(out)

    def slot_tiers(self) -> np.ndarray:
        """The tier of each slot of a tier-major cohort [cohort_size]."""
        return np.repeat(np.arange(len(self.counts)), self.counts)


@dataclasses.dataclass(frozen=True)
class ResourceModel:
    """Who has which budget, round by round (see the module docstring).

    budgets: blocks per tier (strictly increasing, >= 1); shares: each tier's probability
    (positive, summing to 1; empty = equal); mode: 'static' | 'dynamic'.
    """

    seed: int
    num_clients: int
    cohort_size: int
    budgets: tuple[int, ...]
    shares: tuple[float, ...] = ()
    mode: str = "static"
    # the seed of the rounds' cohort draws (None: ``seed``); under DP a secret drawn from the OS,
    # so the sampling that the privacy amplification relies on cannot be replayed
    cohort_seed: int | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("a ResourceModel needs at least one budget tier")
        shares = tuple(float(s) for s in self.shares) or equal_shares(len(self.budgets))
        object.__setattr__(self, "shares", shares)
        for problem in problems(self.budgets, shares, self.mode, self.num_clients, self.cohort_size):
            raise ValueError(f"{problem[0]} = {problem[1]!r}: {problem[2]}")
        if not 1 <= self.cohort_size <= self.num_clients:
            raise ValueError(f"cohort_size must be in [1, {self.num_clients}], got {self.cohort_size}")

    @classmethod
    def from_config(cls, config) -> ResourceModel | None:
        """The model of a validated ``config.Config`` (None when ``sal.budgets`` is empty)."""
        s = config.sal
        if not s.budgets:
            return None
        return cls(config.seed, config.data.num_clients, config.cohort_size, s.budgets, s.budget_shares, s.budget_mode)

    @property
    def tiers(self) -> Tiers:
        return Tiers(tuple(self.budgets), apportion(self.cohort_size, self.shares))

    @property
    def population(self) -> tuple[int, ...]:
        """Clients per tier over all clients (static mode)."""
        return apportion(self.num_clients, self.shares)

    def client_tiers(self) -> np.ndarray:
        """static: every client's tier [num_clients], fixed for the run."""
        if self.mode != "static":
            raise ValueError("client_tiers: in 'dynamic' mode a client's tier changes every round (see cohort)")
        multiset = np.repeat(np.arange(len(self.budgets)), self.population)
        return rngs.numpy(self.seed, Stream.BUDGET, 0).permutation(multiset)

    def cohort(self, round_index: int) -> np.ndarray:
        """Round ``round_index``'s cohort ids [cohort_size] int32, tier-major (``Tiers.counts``
        clients of each tier in turn; sorted within a tier)."""
        counts = self.tiers.counts
        seed = self.seed if self.cohort_seed is None else self.cohort_seed
        rng = rngs.numpy(seed, Stream.BUDGET, 1, round_index)
        if self.mode == "static":
            tiers = self.client_tiers()
            parts = [rng.choice(np.flatnonzero(tiers == g), n, replace=False) for g, n in enumerate(counts)]
        else:
            ids = uniform_cohort(seed, round_index, self.num_clients, self.cohort_size)
            perm = rng.permutation(self.cohort_size)
            bounds = np.cumsum((0,) + counts)
            parts = [ids[perm[bounds[g]:bounds[g + 1]]] for g in range(len(counts))]
        return np.concatenate([np.sort(p) for p in parts]).astype(np.int32)

    def budget_of(self, round_index: int) -> dict[int, int]:
        """{client id: budget} of the round's cohort."""
        ids = self.cohort(round_index)
        return {int(c): self.budgets[t] for c, t in zip(ids, self.tiers.slot_tiers())}


def problems(
    budgets, shares, mode: str, num_clients: int | None = None, cohort_size: int | None = None,
    layers: int | None = None,
) -> list[tuple[str, object, str]]:
    """What is wrong with a budget configuration, as (key, value, what) triples (empty: fine).
    ``shares`` empty = equal. The checks that need the clients, the cohort or the model's depth
    are skipped while those are None (``config.SALConfig`` checks the section alone)."""
    out: list[tuple[str, object, str]] = []
    budgets, shares = tuple(budgets), tuple(shares)
    if mode not in BUDGET_MODES:
        out.append(("sal.budget_mode", mode, f"must be one of {list(BUDGET_MODES)}"))
        return out
    if not budgets:
        if shares:
            out.append(("sal.budget_shares", shares, "is set but sal.budgets is empty"))
        return out
    if mode not in MODES:
        out.append(("sal.budget_mode", mode, f"with sal.budgets must be one of {list(MODES)} ('deadline' has no tiers)"))
    if any(b < 1 for b in budgets) or list(budgets) != sorted(set(budgets)):
        out.append(("sal.budgets", budgets, "must be distinct block counts >= 1 in increasing order"))
    if layers is not None and max(budgets) > layers:
        out.append(("sal.budgets", budgets, f"each must be <= the {layers} blocks of the model"))
    if shares:
        if len(shares) != len(budgets):
            out.append(("sal.budget_shares", shares, f"must have one share per budget ({len(budgets)})"))
            return out
        if any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
            out.append(("sal.budget_shares", shares, "must be positive and sum to 1"))
            return out
    shares = shares or equal_shares(len(budgets))
    if out or cohort_size is None:
        return out
    counts = apportion(cohort_size, shares)
    if min(counts) < 1:
        out.append(("sal.budget_shares", shares,
                    f"gives the tiers {counts} of the cohort_size={cohort_size} clients per round: every "
                    "tier needs at least one (raise the small shares or the cohort)"))
    elif mode == "static" and num_clients is not None:
        population = apportion(num_clients, shares)
        short = [i for i, (p, c) in enumerate(zip(population, counts)) if p < c]
        if short:
            out.append(("sal.budget_shares", shares,
                        f"static tiers of the {num_clients} clients are {population}, fewer than the "
                        f"{counts} a cohort of {cohort_size} needs per round (tier(s) {short})"))
    return out
