"""fedms_jax.privacy against independent oracles: numpy for clipping, sample statistics for the
noise, dp_accounting (called directly, or through constructions written here) and closed forms
for the accounting."""
from __future__ import annotations

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import stats

from fedms_jax import privacy

NR = dp_accounting.NeighboringRelation


def _tree(rng: np.random.Generator, norm: float) -> dict:
    """A nested float32 tree whose global L2 norm is `norm` (up to float32 rounding)."""
    leaves = {"w": rng.normal(size=(7, 5)), "b": rng.normal(size=(5,)),
              "blocks": [rng.normal(size=(3, 3, 2)), rng.normal(size=(4,))]}
    total = math.sqrt(sum(float(np.sum(x ** 2)) for x in jax.tree_util.tree_leaves(leaves)))
    return jax.tree_util.tree_map(lambda x: np.asarray(x * (norm / total), np.float32), leaves)


def _global_norm(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                         for x in jax.tree_util.tree_leaves(tree)))


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


# ----------------------------------------------------------------------------- clipping

def test_clip_scales_to_the_bound_and_keeps_the_direction():
    tree = _tree(np.random.default_rng(0), 10.0)
    clipped, norm = jax.jit(privacy.clip_by_global_norm)(tree, 2.0)
    assert abs(float(norm) - _global_norm(tree)) < 1e-5
    assert abs(_global_norm(clipped) - 2.0) < 1e-6
    factor = 2.0 / _global_norm(tree)
    for got, x in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(tree)):
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(x, np.float64) * factor,
                                   rtol=1e-6, atol=1e-9)


def test_clip_below_the_bound_returns_the_same_bits():
    tree = _tree(np.random.default_rng(1), 1.5)
    # Denormals, signed zero and a low-precision leaf: a multiply by 1.0 or a round trip through
    # float32 could change these bits, the unclipped path must not.
    tree["odd"] = np.array([1e-40, -1e-42, -0.0, 0.0, 3.0e-39], np.float32)
    tree["half"] = jnp.asarray(np.linspace(-0.1, 0.1, 9), jnp.bfloat16)
    for fn in (privacy.clip_by_global_norm, jax.jit(privacy.clip_by_global_norm)):
        clipped, norm = fn(tree, 2.0)
        assert float(norm) < 2.0
        assert _bits(clipped) == _bits(tree)
        assert [x.dtype for x in jax.tree_util.tree_leaves(clipped)] == \
            [jnp.asarray(x).dtype for x in jax.tree_util.tree_leaves(tree)]


def test_clip_under_vmap_clips_each_tree_independently():
    rng = np.random.default_rng(2)
    norms = [0.5, 1.9, 2.0, 2.1, 10.0, 0.0, 37.0]
    trees = [_tree(rng, n) for n in norms]
    batch = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)
    clips = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 40.0], np.float32)  # a traced clip per tree
    clipped, got_norms = jax.jit(jax.vmap(privacy.clip_by_global_norm))(batch, clips)
    for i, tree in enumerate(trees):
        n = _global_norm(tree)
        assert abs(float(got_norms[i]) - n) < 1e-5
        scale = min(1.0, clips[i] / n) if n > 0 else 1.0
        row = jax.tree_util.tree_map(lambda x: np.asarray(x[i]), clipped)
        for got, x in zip(jax.tree_util.tree_leaves(row), jax.tree_util.tree_leaves(tree)):
            if n <= clips[i]:
                assert np.array_equal(got, x)
            else:
                np.testing.assert_allclose(got, np.asarray(x, np.float64) * scale, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------------------- noise

def test_noise_has_the_requested_stddev_and_dtypes():
    like = {"a": jnp.zeros((200, 500), jnp.float32), "b": [jnp.zeros((100_000,), jnp.float32)],
            "c": jnp.zeros((50_000,), jnp.bfloat16)}
    std = 0.7
    noise = jax.jit(privacy.gaussian_noise_like)(like, jax.random.key(3), jnp.float32(std))
    for x, n in zip(jax.tree_util.tree_leaves(like), jax.tree_util.tree_leaves(noise)):
        assert n.dtype == x.dtype and n.shape == x.shape
        v = np.asarray(n, np.float64).ravel()
        assert abs(v.std() / std - 1) < 0.02, v.std()
        assert abs(v.mean()) < 5 * std / math.sqrt(v.size)


def test_zero_stddev_gives_zeros_and_leaves_a_sum_unchanged():
    tree = _tree(np.random.default_rng(4), 3.0)
    noise = privacy.gaussian_noise_like(tree, jax.random.key(0), 0.0)
    for n in jax.tree_util.tree_leaves(noise):
        assert np.all(np.asarray(n) == 0)
    noisy = jax.tree_util.tree_map(lambda x, n: x + n, tree, noise)
    assert _bits(noisy) == _bits(tree)


def test_leaves_get_independent_streams_from_fold_in():
    like = [jnp.zeros((100_000,)), jnp.zeros((100_000,))]
    key = jax.random.key(5)
    a, b = privacy.gaussian_noise_like(like, key, 1.0)
    assert abs(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1]) < 0.02  # sd of r is ~0.003
    # The documented scheme, which makes the noise reproducible on any process with the key.
    np.testing.assert_array_equal(a, jax.random.normal(jax.random.fold_in(key, 0), (100_000,)))
    np.testing.assert_array_equal(b, jax.random.normal(jax.random.fold_in(key, 1), (100_000,)))
    c, _ = privacy.gaussian_noise_like(like, jax.random.key(6), 1.0)
    assert abs(np.corrcoef(np.asarray(a), np.asarray(c))[0, 1]) < 0.02


# --------------------------------------------------------------------------- accounting

def _rdp_direct(z: float, population: int, sampled: int, rounds: int, delta: float) -> float:
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sampled, dp_accounting.GaussianDpEvent(z / 2))
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    return accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds)).get_epsilon(delta)


def _envelope_oracle(sigma: float, q: float, rounds: int, delta: float, disc: float) -> float:
    """The symmetrised envelope built another way: dp_accounting's own discretisation of the
    pair (1-q) N(1, s^2) + q N(0, s^2) vs N(0, s^2) (its Poisson 'remove' PMF), whose positive
    losses are kept and mirrored with the PLD symmetry w(-l) = exp(-l) w(l)."""
    pld = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=disc)
    remove = pld._pmf_remove.to_dense_pmf()  # pylint: disable=protected-access
    losses = np.arange(remove.size) + remove._lower_loss  # pylint: disable=protected-access
    probs = np.asarray(remove._probs)  # pylint: disable=protected-access
    keep = losses > 0
    top = int(losses[keep].max())
    mirrored = np.zeros(2 * top + 1)
    mirrored[top + losses[keep]] = probs[keep]
    mirrored[top - losses[keep]] = probs[keep] * np.exp(-losses[keep] * disc)
    mirrored[top] = 1 - mirrored.sum() - remove._infinity_mass  # pylint: disable=protected-access
    assert mirrored[top] >= 0
    pmf = pld_pmf.DensePLDPmf(disc, -top, mirrored, remove._infinity_mass, True)  # pylint: disable=protected-access
    return pmf.self_compose(rounds).get_epsilon_for_delta(delta)


@pytest.mark.parametrize("z,population,sampled,rounds", [(1.0, 100, 10, 100), (0.8, 1000, 7, 30),
                                                         (3.0, 64, 64, 10)])
def test_rdp_equals_dp_accounting(z, population, sampled, rounds):
    accountant = privacy.Accountant(z, [(population, sampled)], 1e-5, "rdp")
    assert accountant.epsilon(rounds) == pytest.approx(
        _rdp_direct(z, population, sampled, rounds, 1e-5), rel=1e-12)


def test_full_participation_is_the_gaussian_mechanism_with_sensitivity_2c():
    """m == N: no sampling, the sum has replace-one sensitivity 2C, so after T rounds the release
    is one Gaussian mechanism with stddev/sensitivity z / (2 sqrt(T))."""
    z, rounds, delta = 2.0, 25, 1e-5
    exact = dp_accounting.get_epsilon_gaussian(z / (2 * math.sqrt(rounds)), delta)
    pld = privacy.Accountant(z, [(40, 40)], delta, "pld").epsilon(rounds)
    assert exact - 1e-9 <= pld <= exact + 2e-3
    # dp_accounting's PLD under REPLACE_ONE reads the multiplier as stddev / C and doubles itself.
    direct = dp_accounting.pld.PLDAccountant(NR.REPLACE_ONE, 1e-3).compose(
        dp_accounting.GaussianDpEvent(z), rounds).get_epsilon(delta)
    assert pld == pytest.approx(direct, abs=2e-3)
    rdp = privacy.Accountant(z, [(40, 40)], delta, "rdp").epsilon(rounds)
    rdp_gaussian = dp_accounting.rdp.RdpAccountant().compose(
        dp_accounting.GaussianDpEvent(z / 2), rounds).get_epsilon(delta)
    assert rdp == pytest.approx(rdp_gaussian, rel=1e-12)
    assert exact <= rdp


@pytest.mark.parametrize("z,population,sampled,rounds", [(1.0, 100, 10, 100), (2.0, 100, 30, 40)])
def test_pld_matches_an_independent_envelope_and_sits_between_the_bounds(z, population, sampled,
                                                                         rounds):
    delta = 1e-5
    got = privacy.Accountant(z, [(population, sampled)], delta, "pld").epsilon(rounds)
    assert got == pytest.approx(_envelope_oracle(z / 2, sampled / population, rounds, delta, 1e-3),
                                rel=1e-3)
    # Composing the two orders separately (Poisson add/remove accounting of the same pair) is a
    # lower bound on the envelope's composition, and the RDP bound sits above it here.
    separate = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3).compose(
        dp_accounting.PoissonSampledDpEvent(sampled / population, dp_accounting.GaussianDpEvent(z / 2)),
        rounds).get_epsilon(delta)
    assert separate < got < _rdp_direct(z, population, sampled, rounds, delta)


def test_one_round_bounds_a_reachable_worst_case_that_poisson_replace_one_misses():
    """N=2, m=1, scalar updates, C=1: the other user sends -1, the target user +1 or -1. The
    outputs are 0.5 N(1) + 0.5 N(-1) vs N(-1), an actual pair of neighbouring inputs; its delta at
    our epsilon must not exceed the target (and is close to it, the bound is tight there), while
    dp_accounting's PoissonSampledDpEvent under REPLACE_ONE reports an epsilon at which it does."""
    z, delta = 1.0, 1e-3
    sigma = z  # stddev z * C with C = 1

    def exact_delta(eps: float) -> float:
        # Likelihood ratio (after shifting by +1): 0.5 + 0.5 exp((2x - 2) / sigma^2), increasing.
        x = 1 + sigma ** 2 * math.log(2 * math.exp(eps) - 1) / 2
        upper = 0.5 * stats.norm.sf(x, 2, sigma) + 0.5 * stats.norm.sf(x, 0, sigma)
        return upper - math.exp(eps) * stats.norm.sf(x, 0, sigma)

    ours = privacy.Accountant(z, [(2, 1)], delta, "pld").epsilon(1)
    assert 0.9 * delta <= exact_delta(ours) <= delta
    assert privacy.Accountant(z, [(2, 1)], delta, "rdp").epsilon(1) >= ours
    naive = dp_accounting.pld.PLDAccountant(NR.REPLACE_ONE, 1e-4).compose(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z))).get_epsilon(delta)
    assert exact_delta(naive) > 2 * delta


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_grows_with_rounds_and_falls_with_noise(kind):
    accountant = privacy.Accountant(1.0, [(500, 25)], 1e-5, kind)
    eps = [accountant.epsilon(t) for t in range(1, 21)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    by_noise = [privacy.Accountant(z, [(500, 25)], 1e-5, kind).epsilon(20) for z in (0.8, 1.0, 1.5, 3.0)]
    assert by_noise[1] == eps[-1]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_no_noise_is_infinite_and_no_rounds_is_zero(kind):
    assert privacy.Accountant(0.0, [(100, 10)], 1e-5, kind).epsilon(3) == math.inf
    assert privacy.Accountant(0.0, [(100, 10)], 1e-5, kind).epsilon(0) == 0.0
    assert privacy.Accountant(1.0, [(100, 10)], 1e-5, kind).epsilon(0) == 0.0


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_several_tiers_report_the_worst_tier(kind):
    groups = [(1000, 20), (50, 10), (200, 10)]
    rounds, z = 20, 1.2
    tiers = [privacy.Accountant(z, [g], 1e-5, kind).epsilon(rounds) for g in groups]
    accountant = privacy.Accountant(z, groups, 1e-5, kind)
    assert accountant.epsilon(rounds) == max(tiers) == tiers[1]
    assert accountant.dominant_group == (50, 10)
    if kind == "rdp":
        assert max(tiers) == pytest.approx(_rdp_direct(z, 50, 10, rounds, 1e-5), rel=1e-12)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_ledger_round_trips_through_json(kind):
    accountant = privacy.Accountant(1.1, [(300, 12), (90, 3)], 1e-6, kind)
    for _ in range(6):
        accountant.compose()
    accountant.compose(2)
    assert accountant.rounds == 8
    meta = json.loads(json.dumps(accountant.as_dict()))
    rebuilt = privacy.Accountant.from_dict(meta)
    assert rebuilt.rounds == 8 and rebuilt.groups == accountant.groups
    assert rebuilt.epsilon() == accountant.epsilon()
    assert rebuilt.compose() == accountant.compose()
    # Path independent: a fresh ledger asked for round 9 directly reports the same number.
    assert privacy.Accountant(1.1, [(300, 12), (90, 3)], 1e-6, kind).epsilon(9) == accountant.epsilon()
    with pytest.raises(ValueError, match="missing keys"):
        privacy.Accountant.from_dict({k: v for k, v in meta.items() if k != "delta"})
    with pytest.raises(ValueError, match="version"):
        privacy.Accountant.from_dict({**meta, "version": 99})


@pytest.mark.parametrize("kind,target,rounds,groups", [("rdp", 5.0, 100, [(1000, 50)]),
                                                       ("pld", 3.0, 50, [(1000, 50), (100, 1)])])
def test_calibrated_noise_meets_the_target_and_no_less_noise_does(kind, target, rounds, groups):
    z = privacy.calibrate_noise_multiplier(target, 1e-5, rounds, groups, kind, tol=1e-4)
    at = privacy.Accountant(z, groups, 1e-5, kind).epsilon(rounds)
    assert target - 0.01 <= at <= target
    assert privacy.Accountant(z - 1e-3, groups, 1e-5, kind).epsilon(rounds) > target


def test_calibration_refuses_unreachable_targets(monkeypatch):
    # Narrow search ranges keep this fast; the messages are the point.
    from fedms_jax.privacy import accounting

    monkeypatch.setattr(accounting, "_CALIBRATION_CEILING", 8.0)
    monkeypatch.setattr(accounting, "_CALIBRATION_FLOOR", {"rdp": 0.25, "pld": 0.25})
    # RDP's conversion cannot go below log(1/delta) / (max order - 1) ~ 0.011 at any noise.
    with pytest.raises(ValueError, match=r"cannot reach target_epsilon=0\.001 .*rounds=10"):
        privacy.calibrate_noise_multiplier(1e-3, 1e-5, 10, [(100, 10)], "rdp")
    with pytest.raises(ValueError, match="already met"):
        privacy.calibrate_noise_multiplier(1e9, 1e-5, 2, [(100, 10)], "rdp")


def test_pld_accountant_refuses_what_it_cannot_account():
    accountant = privacy.SampledWithoutReplacementPLDAccountant()
    assert accountant.neighboring_relation == NR.REPLACE_ONE
    assert accountant.supports(privacy.round_event(1.0, 100, 10))
    assert not accountant.supports(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)))
    assert not accountant.supports(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.LaplaceDpEvent(1.0)))
    with pytest.raises(dp_accounting.UnsupportedEventError):
        accountant.compose(dp_accounting.LaplaceDpEvent(1.0))
    # An empty ledger costs nothing; a noiseless round is unbounded.
    assert accountant.get_epsilon(1e-5) == 0.0
    assert accountant.compose(privacy.round_event(0.0, 100, 10)).get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("call,match", [
    (lambda: privacy.Accountant(1.0, [(10, 11)], 1e-5), r"m=11 with N=10"),
    (lambda: privacy.Accountant(1.0, [(10, 0)], 1e-5), r"m=0"),
    (lambda: privacy.Accountant(1.0, [(100, 10)], 0.0), r"delta .* got 0\.0"),
    (lambda: privacy.Accountant(1.0, [(100, 10)], 1.0), r"delta .* got 1\.0"),
    (lambda: privacy.Accountant(-0.5, [(100, 10)], 1e-5), r"noise_multiplier .* got -0\.5"),
    (lambda: privacy.Accountant(1.0, [(100, 10)], 1e-5, "gdp"), r"kind .* got 'gdp'"),
    (lambda: privacy.Accountant(1.0, [], 1e-5), r"groups"),
    (lambda: privacy.Accountant(1.0, (100, 10), 1e-5), r"groups\[0\] = 100 is not a pair"),
    (lambda: privacy.Accountant(1.0, [(100.0, 10)], 1e-5), r"groups\[0\].*must be ints"),
    (lambda: privacy.Accountant(1.0, [(100, 10)], 1e-5).epsilon(-1), r"rounds .* got -1"),
    (lambda: privacy.Accountant(1.0, [(100, 10)], 1e-5, "pld", pld_discretization=0), r"pld_discretization"),
    (lambda: privacy.calibrate_noise_multiplier(0.0, 1e-5, 10, [(100, 10)]), r"target_epsilon .* got 0\.0"),
    (lambda: privacy.calibrate_noise_multiplier(1.0, 1e-5, 0, [(100, 10)]), r"rounds .* got 0"),
    (lambda: privacy.clip_by_global_norm({"a": jnp.ones(3)}, 0.0), r"clip .* got 0\.0"),
    (lambda: privacy.gaussian_noise_like({"a": jnp.ones(3)}, jax.random.key(0), -1.0), r"stddev .* got -1\.0"),
])
def test_invalid_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_leaves_are_refused():
    with pytest.raises(TypeError, match="int32"):
        privacy.clip_by_global_norm({"a": jnp.arange(3)}, 1.0)
