"""DP-FedAvg through the engine and the run: clipping, noise, equality with FedAvg, epsilon."""
from __future__ import annotations

import dp_accounting
import jax
import numpy as np
import pytest

from fed_helpers import flat, run_experiment, tiny_config
from fedms_jax.config import ConfigError


def _server_change(config, rounds=1):
    """Round 0's change of the server's trainable tree, and the round metrics."""
    exp, server, _, metrics = run_experiment(config, rounds)
    start = flat(exp.init_states()[0].trainable)
    return flat(server.trainable) - start, metrics


IID = ("data.partition=iid", "algorithm=fedavg", "sal.mode=fixed", "sal.k0=2")  # equal client sizes


def test_without_noise_and_a_large_clip_dp_fedavg_is_fedavg():
    plain, _ = _server_change(tiny_config(*IID))
    private, metrics = _server_change(tiny_config(*IID, "dp.clip=1e6"))
    assert np.abs(plain).max() > 1e-3  # something was learned
    np.testing.assert_allclose(private, plain, atol=1e-6)
    assert metrics[0]["dp_clipped"] == 0.0


def test_an_update_above_the_clip_is_scaled_to_the_clip_exactly():
    clip = 1e-3
    change, metrics = _server_change(tiny_config(*IID, "cohort_size=1", f"dp.clip={clip}"))
    assert metrics[0]["dp_update_norm"] > 10 * clip and metrics[0]["dp_clipped"] == 1.0
    # One client, no noise: the server moves by its clipped update, of norm exactly clip.
    np.testing.assert_allclose(np.linalg.norm(change), clip, rtol=1e-5)


def test_the_noise_on_the_mean_has_std_noise_multiplier_times_clip_over_cohort():
    z, clip, m = 1e-6, 1e6, 8  # (the clean run is the first test's: its program comes from the cache)
    # The same round with and without noise (the same clipped updates): the difference is the noise.
    clean, _ = _server_change(tiny_config(*IID, f"dp.clip={clip}"))
    noisy, _ = _server_change(tiny_config(*IID, f"dp.clip={clip}", f"dp.noise_multiplier={z}"))
    trained = (noisy - clean)[clean != 0]
    assert trained.size > 2000  # the std is then within 5% with 3 standard errors to spare
    np.testing.assert_allclose(trained.std(), z * clip / m, rtol=0.05)
    assert abs(trained.mean()) < 4 * z * clip / m / np.sqrt(trained.size)


def dp_accounting_epsilon(z: float, population: int, cohort: int, rounds: int, delta: float) -> float:
    """dp-accounting's epsilon for DP-FedAvg with a fixed-size cohort without replacement:
    replace-one neighbours, so the sum's sensitivity is 2 * clip and dp-accounting's multiplier
    (std / sensitivity) is z / 2."""
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    return accountant.get_epsilon(delta)


def test_target_epsilon_calibrates_the_noise_before_the_run():
    from fedms_jax.run import build

    exp = build(tiny_config("rounds=5", "dp.clip=1.0", "dp.target_epsilon=8.0"))
    z = exp.accountant.noise_multiplier
    assert exp.engine.dp == (1.0, z)
    assert exp.accountant.epsilon(5) <= 8.0 < type(exp.accountant)(z * 0.99, exp.accountant.groups, 1e-5).epsilon(5)


@pytest.mark.parametrize("overrides, message", [
    (["dp.noise_multiplier=1.0"], "config.dp.noise_multiplier = 1.0: needs config.dp.clip > 0"),
    (["dp.clip=1", "dp.noise_multiplier=1", "dp.target_epsilon=3"], "set one of the two"),
    (["dp.clip=1", "dp.delta=0"], "config.dp.delta = 0.0: must be in (0, 1)"),
    (["dp.clip=1", "algorithm=local"], "there is nothing to privatise"),
    (["dp.clip=1", "dp.accountant=moments"], "config.dp.accountant = 'moments'"),
])
def test_bad_dp_configs_are_named(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny_config(*overrides)
    assert message in str(e.value)


def test_dp_noise_key_is_its_own_stream():
    from fedms_jax import rng

    noise = rng.key(0, rng.Stream.DP_NOISE, 0)
    others = [rng.key(0, rng.Stream.ROUND, 0), rng.key(0, rng.Stream.INIT), rng.client_keys(0, 0, np.arange(1))[0]]
    assert all(not np.array_equal(jax.random.key_data(noise), jax.random.key_data(k)) for k in others)


DP_BUDGETS = ("model.layers=3", "sal.budgets=1,2,3", "sal.budget_shares=0.25,0.25,0.5", "sal.k0=3",
              "dp.clip=0.05", "dp.noise_multiplier=1.0", "dp.reproducible_noise=true")


def test_dp_with_budget_tiers_and_chunks():
    whole, _ = _server_change(tiny_config(*DP_BUDGETS))
    chunked, metrics = _server_change(tiny_config(*DP_BUDGETS, "placement.chunk_size=2"))
    np.testing.assert_allclose(chunked, whole, atol=1e-6)  # the same noise, sums in another order
    assert metrics[0]["dp_clipped"] == 1.0
    from fedms_jax.run import build

    exp = build(tiny_config(*DP_BUDGETS))
    # A client is in one static tier; each tier samples its share: 2 of 2, 2 of 2, 4 of 4 clients.
    assert exp.accountant.groups == ((2, 2), (2, 2), (4, 4))


def test_a_calibrated_run_cannot_change_its_rounds_on_resume():
    from fedms_jax.checkpoint import config_changes, config_fingerprint

    saved = config_fingerprint(tiny_config("dp.clip=1", "dp.target_epsilon=5", "rounds=4"))
    assert config_changes(saved, tiny_config("dp.clip=1", "dp.target_epsilon=5", "rounds=6")) == [("rounds", 4, 6)]
    # Without calibration more rounds are just more rounds (epsilon keeps growing, reported).
    saved = config_fingerprint(tiny_config("dp.clip=1", "dp.noise_multiplier=1", "rounds=4"))
    assert config_changes(saved, tiny_config("dp.clip=1", "dp.noise_multiplier=1", "rounds=6")) == []
