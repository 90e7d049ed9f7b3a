"""DP-FedAvg's accounting, without jax: Google's ``dp_accounting`` for fixed-size cohorts sampled
without replacement under replace-one neighbours, the run's ``Accountant`` and its ledger, and
the calibration of the noise multiplier (``fedms_jax.privacy`` states the analysis)."""
from __future__ import annotations

import functools
import math
import numbers
from fractions import Fraction
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant

from fedms_jax.choices import ACCOUNTANTS

Kind = Literal["rdp", "pld"]
KINDS: tuple[str, ...] = ACCOUNTANTS  # dp.accountant

# 1e-3 keeps a PLD epsilon(t) call at ~20-40 ms for t <= 200 (z=1, q=0.1, two busy CPU cores)
# and agrees with 1e-4 to four decimals there; connect-the-dots is pessimistic at any interval,
# so a coarser grid only ever overstates epsilon.
DEFAULT_PLD_DISCRETIZATION = 1e-3

# Calibration searches z in [floor, ceiling]. The PLD's loss grid grows like 1/z^2 (z = 0.125
# already takes seconds per evaluation), so its floor is higher than RDP's.
_CALIBRATION_FLOOR = {"rdp": 2.0 ** -10, "pld": 0.125}
_CALIBRATION_CEILING = 2.0 ** 20

_LEDGER_VERSION = 1


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_noise_multiplier(noise_multiplier: Any) -> float:
    if (isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real)
            or not math.isfinite(noise_multiplier) or noise_multiplier < 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def _check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in the open interval (0, 1), got {delta!r}")
    return float(delta)


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_rounds(rounds: Any, name: str = "rounds", minimum: int = 0) -> int:
    if not _is_int(rounds) or rounds < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {rounds!r}")
    return int(rounds)


def _check_discretization(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not 0 < value <= 0.1):
        raise ValueError(f"pld_discretization must be a number in (0, 0.1], got {value!r}")
    return float(value)


def _check_groups(groups: Any) -> tuple[tuple[int, int], ...]:
    hint = "groups must be a non-empty sequence of (population N, sampled m) pairs, e.g. [(1000, 10)]"
    if isinstance(groups, (str, bytes, Mapping)) or not isinstance(groups, Iterable):
        raise ValueError(f"{hint}; got {groups!r}")
    items = list(groups)
    if not items:
        raise ValueError(f"{hint}; got an empty {type(groups).__name__}")
    out = []
    for i, group in enumerate(items):
        try:
            population, sampled = group
        except (TypeError, ValueError):
            raise ValueError(f"{hint}; groups[{i}] = {group!r} is not a pair") from None
        if not (_is_int(population) and _is_int(sampled)):
            raise ValueError(f"groups[{i}] = {group!r}: population and sampled must be ints")
        if population < 1:
            raise ValueError(f"groups[{i}]: population N must be >= 1, got N={population}")
        if not 1 <= sampled <= population:
            raise ValueError(f"groups[{i}]: sampled m must satisfy 1 <= m <= N, "
                             f"got m={sampled} with N={population}")
        out.append((int(population), int(sampled)))
    return tuple(out)


def _dominant_group(groups: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    # Exact fractions: float m/N could order two equal rates arbitrarily.
    return max(groups, key=lambda g: Fraction(g[1], g[0]))


# --------------------------------------------------------------------------------------------
# Events and the PLD accountant for sampling without replacement.
# --------------------------------------------------------------------------------------------

def round_event(noise_multiplier: float, population: int, sampled: int) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of one round for one tier (see the module docstring).

    ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``: the Gaussian's multiplier
    is ``stddev / (replace-one L2 sensitivity 2C)``, the convention ``RdpAccountant`` applies under
    ``REPLACE_ONE`` and ``SampledWithoutReplacementPLDAccountant`` follows.
    """
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=population, sample_size=sampled,
        event=dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))


@functools.lru_cache(maxsize=8)
def _one_round_pld(sigma: float, sampling_probability: float,
                   discretization: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of the symmetrised envelope of ``(1-q) N(0, s^2) + q N(1, s^2)`` vs ``N(0, s^2)``.

    ``sigma`` is the noise in units of the replace-one sensitivity (``z / 2``), ``q`` the sampling
    rate. Returns a symmetric PrivacyLossDistribution (one PMF), supported on the integer
    multiples of ``discretization`` in ``[-U, U]`` plus ``+inf``.
    """
    adjacency = privacy_loss_mechanism.AdjacencyType
    # A = (1-q) N(0) + q N(1) vs B = N(0), and the swapped pair; both sensitivities are 1 because
    # sigma is already in units of the replace-one sensitivity.
    remove = privacy_loss_mechanism.GaussianPrivacyLoss(
        sigma, sensitivity=1.0, sampling_prob=sampling_probability,
        adjacency_type=adjacency.REMOVE)
    add = privacy_loss_mechanism.GaussianPrivacyLoss(
        sigma, sensitivity=1.0, sampling_prob=sampling_probability, adjacency_type=adjacency.ADD)
    upper = max(remove.connect_dots_bounds().epsilon_upper, add.connect_dots_bounds().epsilon_upper)
    k = max(1, math.ceil(upper / discretization))
    eps = np.arange(k + 1) * discretization
    # The envelope for eps >= 0 is the worse of the two orders (A vs B dominates, but the max costs
    # nothing and does not rely on that).
    deltas_pos = np.maximum(remove.get_delta_for_epsilon(eps), add.get_delta_for_epsilon(eps))
    deltas_pos = np.clip(deltas_pos, 0.0, 1.0)
    # A symmetric curve is fixed by its eps >= 0 half: delta(-e) = 1 - exp(-e) + exp(-e) delta(e)
    # (the identity between the two orders of a pair, H_a(P||Q) = 1 - a + a H_{1/a}(Q||P)).
    e = eps[:0:-1]
    deltas_neg = -np.expm1(-e) + np.exp(-e) * deltas_pos[:0:-1]
    deltas = np.concatenate([deltas_neg, deltas_pos])
    pmf = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(discretization, -k, k, deltas)
    return pld_lib.PrivacyLossDistribution(pmf)


@functools.lru_cache(maxsize=32)
def _one_round_rdp(noise_multiplier: float, population: int,
                   sampled: int) -> tuple[np.ndarray, np.ndarray]:
    """``(orders, rdp)`` of one round from ``RdpAccountant`` (read-only arrays, shape (orders,))."""
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(round_event(noise_multiplier, population, sampled))
    orders, rdp = accountant.orders, accountant.rdp
    orders.setflags(write=False)
    rdp.setflags(write=False)
    return orders, rdp


_CompositionError = dp_accounting.PrivacyAccountant.CompositionErrorDetails


class SampledWithoutReplacementPLDAccountant(dp_accounting.PrivacyAccountant):
    """PLD accountant for the Gaussian mechanism under fixed-size sampling without replacement.

    A ``dp_accounting.PrivacyAccountant`` (neighbouring relation ``REPLACE_ONE`` only) that
    supports what ``PLDAccountant`` lacks: ``SampledWithoutReplacementDpEvent`` of a
    ``GaussianDpEvent``, plus ``GaussianDpEvent`` (sampling rate 1), ``SelfComposedDpEvent``,
    ``ComposedDpEvent``, ``NoOpDpEvent`` and ``NonPrivateDpEvent``. Each round is accounted by the
    PLD of the symmetrised dominating envelope described in the module docstring; the
    ``GaussianDpEvent``'s multiplier is ``stddev / (replace-one L2 sensitivity)`` (what
    ``round_event`` builds). Pessimistic like ``PLDAccountant``: connect-the-dots discretisation,
    and the tails dp_accounting truncates (1e-15 per composition) count as infinite loss.
    """

    def __init__(self, value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION):
        super().__init__(dp_accounting.NeighboringRelation.REPLACE_ONE)
        self._discretization = _check_discretization(value_discretization_interval)
        self._pld: pld_lib.PrivacyLossDistribution | None = None
        self._non_private = False

    def _add(self, one_round: pld_lib.PrivacyLossDistribution, count: int) -> None:
        composed = one_round.self_compose(count) if count > 1 else one_round
        self._pld = composed if self._pld is None else self._pld.compose(composed)

    def _maybe_compose(self, event: dp_accounting.DpEvent, count: int,
                       do_compose: bool) -> _CompositionError | None:
        details = _CompositionError
        # A count of 0 (what ``supports`` passes) still validates the event; it composes nothing.
        do_compose = do_compose and count > 0
        if isinstance(event, dp_accounting.NoOpDpEvent):
            return None
        if isinstance(event, dp_accounting.NonPrivateDpEvent):
            if do_compose:
                self._non_private = True
            return None
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_accounting.ComposedDpEvent):
            for sub in event.events:
                error = self._maybe_compose(sub, count, do_compose)
                if error is not None:
                    return error
            return None
        if isinstance(event, dp_accounting.GaussianDpEvent):
            if do_compose:
                if event.noise_multiplier == 0:
                    self._non_private = True
                else:
                    self._add(_one_round_pld(float(event.noise_multiplier), 1.0,
                                             self._discretization), count)
            return None
        if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
            if not isinstance(event.event, dp_accounting.GaussianDpEvent):
                return details(invalid_event=event, error_message=(
                    "the subevent of SampledWithoutReplacementDpEvent must be a GaussianDpEvent, "
                    f"found {event.event}"))
            if not 0 <= event.sample_size <= event.source_dataset_size:
                return details(invalid_event=event, error_message=(
                    "need 0 <= sample_size <= source_dataset_size"))
            if do_compose and event.sample_size > 0:
                if event.event.noise_multiplier == 0:
                    self._non_private = True
                else:
                    q = event.sample_size / event.source_dataset_size
                    self._add(_one_round_pld(float(event.event.noise_multiplier), q,
                                             self._discretization), count)
            return None
        return details(invalid_event=event, error_message="unsupported event")

    def get_epsilon(self, target_delta: float) -> float:
        if self._non_private:
            return math.inf
        if self._pld is None:
            return 0.0
        return float(self._pld.get_epsilon_for_delta(target_delta))

    def get_delta(self, target_epsilon: float) -> float:
        if self._non_private:
            return 1.0
        if self._pld is None:
            return 0.0
        return float(self._pld.get_delta_for_epsilon(target_epsilon))


def _fresh_accountant_factory(kind: str, pld_discretization: float
                              ) -> Callable[[], dp_accounting.PrivacyAccountant]:
    if kind == "rdp":
        return lambda: dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return lambda: SampledWithoutReplacementPLDAccountant(pld_discretization)


# --------------------------------------------------------------------------------------------
# The run's ledger.
# --------------------------------------------------------------------------------------------

class Accountant:
    """Privacy ledger of a DP-FedAvg run: epsilon at ``delta`` after a number of noisy rounds.

    Args:
      noise_multiplier: ``z`` (noise stddev / clip) of every round, ``>= 0``.
      groups: ``[(N_1, m_1), ...]``: tier ``i`` samples ``m_i`` of its ``N_i`` users each round
        (``1 <= m_i <= N_i``); one pair when there are no tiers.
      delta: the target delta, in ``(0, 1)``.
      kind: ``'rdp'`` or ``'pld'`` (see the module docstring for the events and why).
      rounds: noisy aggregation rounds already composed (the ledger), ``>= 0``.
      pld_discretization: the PLD's ``value_discretization_interval`` (``'pld'`` only).

    ``epsilon(t)`` is the max over tiers (each user is in exactly one tier), ``math.inf`` when
    ``noise_multiplier == 0`` and ``t > 0``, and ``0.0`` when ``t == 0``. Values are cached per
    ``t`` and are a pure function of the parameters and ``t`` (no dependence on the order of
    calls), so a run rebuilt with ``from_dict`` reports the very same numbers. Cost per new ``t``:
    RDP, one vector operation (the one-round RDP curve, ~0.2 s, is computed once); PLD, one
    FFT-based self-composition of the cached one-round PLD (~20-40 ms for t <= 200 at the default
    discretization).
    """

    def __init__(self, noise_multiplier: float, groups: Sequence[tuple[int, int]], delta: float,
                 kind: Kind = "rdp", *, rounds: int = 0,
                 pld_discretization: float = DEFAULT_PLD_DISCRETIZATION):
        self._noise_multiplier = _check_noise_multiplier(noise_multiplier)
        self._groups = _check_groups(groups)
        self._delta = _check_delta(delta)
        self._kind = _check_kind(kind)
        self._rounds = _check_rounds(rounds)
        self._pld_discretization = _check_discretization(pld_discretization)
        self._cache: dict[int, float] = {}

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        return self._groups

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def pld_discretization(self) -> float:
        return self._pld_discretization

    @property
    def rounds(self) -> int:
        """Noisy aggregation rounds composed so far."""
        return self._rounds

    @property
    def dominant_group(self) -> tuple[int, int]:
        """The tier ``(N, m)`` with the largest sampling rate: the one whose epsilon is reported."""
        return _dominant_group(self._groups)

    def event(self, rounds: int) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event accounted after ``rounds`` rounds (dominant tier)."""
        rounds = _check_rounds(rounds)
        return dp_accounting.SelfComposedDpEvent(
            round_event(self._noise_multiplier, *self.dominant_group), rounds)

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (default: the rounds composed so far)."""
        rounds = self._rounds if rounds is None else _check_rounds(rounds)
        if rounds == 0:
            return 0.0
        if self._noise_multiplier == 0:
            return math.inf
        if rounds not in self._cache:
            self._cache[rounds] = self._compute(rounds)
        return self._cache[rounds]

    def _compute(self, rounds: int) -> float:
        if self._kind == "rdp":
            orders, one_round = _one_round_rdp(self._noise_multiplier, *self.dominant_group)
            # Same arithmetic as RdpAccountant.compose(event, rounds): rdp += rounds * one_round.
            return float(rdp_privacy_accountant.compute_epsilon(
                orders, rounds * one_round, self._delta)[0])
        accountant = _fresh_accountant_factory("pld", self._pld_discretization)()
        return accountant.compose(self.event(rounds)).get_epsilon(self._delta)

    def compose(self, rounds: int = 1) -> float:
        """Records ``rounds`` more noisy rounds; returns the epsilon after them."""
        self._rounds += _check_rounds(rounds)
        return self.epsilon()

    def as_dict(self) -> dict[str, Any]:
        """JSON-able parameters and the rounds composed (for a checkpoint's meta)."""
        return {"version": _LEDGER_VERSION, "noise_multiplier": self._noise_multiplier,
                "groups": [list(g) for g in self._groups], "delta": self._delta,
                "kind": self._kind, "pld_discretization": self._pld_discretization,
                "rounds": self._rounds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Accountant":
        """Rebuilds an accountant from ``as_dict()`` output (e.g. after ``json.loads``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"from_dict: expected a mapping, got {type(data).__name__}")
        if data.get("version") != _LEDGER_VERSION:
            raise ValueError(f"from_dict: unsupported ledger version {data.get('version')!r}, "
                             f"expected {_LEDGER_VERSION}")
        required = ("noise_multiplier", "groups", "delta", "kind", "pld_discretization", "rounds")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"from_dict: missing keys {missing}")
        return cls(data["noise_multiplier"], data["groups"], data["delta"], data["kind"],
                   rounds=data["rounds"], pld_discretization=data["pld_discretization"])

    def __repr__(self) -> str:
        return (f"Accountant(noise_multiplier={self._noise_multiplier}, groups={list(self._groups)}, "
                f"delta={self._delta}, kind={self._kind!r}, rounds={self._rounds})")


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int,
                               groups: Sequence[tuple[int, int]], kind: Kind = "rdp", *,
                               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                               tol: float = 1e-4) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is ``<= target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, then a check that the returned
    ``z`` meets the target) on the event of the tier with the largest sampling rate, with the
    accountant ``Accountant(z, groups, delta, kind)`` uses, so ``Accountant(z, ...).epsilon(rounds)
    <= target_epsilon`` holds exactly for the returned ``z``, which is within ``tol`` of the
    smallest such multiplier. The search brackets ``z`` in ``[floor, 2**20]`` (floor ``2**-10``
    for RDP, ``0.125`` for PLD, whose cost grows like ``1/z^2``).

    Raises:
      ValueError: invalid arguments, or no multiplier in the searched range reaches the target
        (e.g. RDP cannot report epsilon below ~0.011 at any noise), or the target is met even at
        the floor.
    """
    if (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real)
            or not math.isfinite(target_epsilon) or target_epsilon <= 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    rounds = _check_rounds(rounds, minimum=1)
    groups = _check_groups(groups)
    kind = _check_kind(kind)
    pld_discretization = _check_discretization(pld_discretization)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    population, sampled = _dominant_group(groups)
    make_accountant = _fresh_accountant_factory(kind, pld_discretization)

    def make_event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(round_event(z, population, sampled), rounds)

    seen: dict[float, float] = {}

    def eps(z: float) -> float:
        if z not in seen:
            seen[z] = make_accountant().compose(make_event(z)).get_epsilon(delta)
        return seen[z]

    what = (f"target_epsilon={target_epsilon} at delta={delta} after rounds={rounds} for "
            f"groups={list(groups)} (kind={kind!r})")
    floor = _CALIBRATION_FLOOR[kind]
    hi = 1.0
    while eps(hi) > target_epsilon:
        if hi * 2 > _CALIBRATION_CEILING or eps(hi * 2) == 0.0:  # 0 with noise: the accountant underflowed
            raise ValueError(f"cannot reach {what}: epsilon is still {eps(hi):.6g} at "
                             f"noise_multiplier={hi:g}")
        hi *= 2
    lo = hi / 2
    while eps(lo) <= target_epsilon:
        if lo / 2 < floor:
            raise ValueError(f"{what} is already met at noise_multiplier={lo:g} (epsilon "
                             f"{eps(lo):.6g}); this calibration does not search below {floor:g}")
        hi, lo = lo, lo / 2
    z = dp_accounting.calibrate_dp_mechanism(
        make_accountant, make_event, float(target_epsilon), delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=float(tol))
    return float(z)
