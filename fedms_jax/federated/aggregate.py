"""Aggregation: every sum and mean a round takes over its clients, in one place.

* uploads: per unit, the weighted sum ``sum_c w_c u_c`` (``weighted_sum``, inside the placement
  backend as it goes, chunk by chunk), the sums of a round's client groups added unit by unit
  (``add_units``: with budget tiers a unit only some groups trained is averaged over those),
  DP noise added to each unit's sum (``noisy``), then divided by the unit's total weight
  (``weighted_mean``). ``aggregate`` does the last three, once per round, just before
  ``stage.server_update``;
* metrics: the clients' per-round metrics as example-weighted means over the clients that were
  not excluded, the number excluded, and with tiers each tier's loss (``round_metrics``).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fedms_jax.federated.ops import masked_mean
from fedms_jax.privacy.mechanism import gaussian_noise_like

PyTree = Any


def weighted_sum(uploads: PyTree, weights: PyTree) -> PyTree:
    """uploads {unit: leaves [m, ...]}, weights {unit: [m]} -> {unit: sum_c w_c u_c}."""
    return {
        name: jax.tree_util.tree_map(
            lambda u, w=weights[name]: jnp.tensordot(w.astype(jnp.float32), u.astype(jnp.float32), axes=1).astype(u.dtype),
            sub,
        )
        for name, sub in uploads.items()
    }


def weighted_mean(summed: PyTree, totals: PyTree) -> PyTree:
    """{unit: summed} / {unit: total}; a unit with total 0 gets zeros."""
    return {
        name: jax.tree_util.tree_map(lambda s, t=totals[name]: s / jnp.maximum(t, 1e-12).astype(s.dtype), sub)
        for name, sub in summed.items()
    }


def add_units(acc: dict, part: dict) -> dict:
    """Two {unit: tree} dicts added unit by unit; a unit in only one is taken as it is."""
    return {**acc, **{u: v if u not in acc else jax.tree_util.tree_map(jnp.add, acc[u], v) for u, v in part.items()}}


def noisy(summed: PyTree, key: jax.Array, stddev: float) -> PyTree:
    """DP-FedAvg's server side: N(0, stddev^2) added to every coordinate of every unit's sum (the
    same on every device: one key, replicated)."""
    return jax.tree_util.tree_map(jnp.add, summed, gaussian_noise_like(summed, key, stddev))


def aggregate(parts: Sequence[tuple[dict, dict]], noise: tuple[jax.Array, float] | None = None) -> tuple[dict, dict]:
    """A round's client groups' (per-unit sums, per-unit total weights) -> (per-unit means, totals):
    the groups added, ``noise = (key, stddev)`` added to the sums (DP), divided by the totals."""
    summed, totals = {}, {}
    for s, t in parts:
        summed, totals = add_units(summed, s), add_units(totals, t)
    if noise is not None:
        summed = noisy(summed, *noise)
    return weighted_mean(summed, totals), totals


def round_metrics(metrics: dict, counts: jax.Array, excluded: jax.Array, tiers=None,
                  present: jax.Array | None = None) -> dict:
    """Per-client metrics {name: [m]} -> the round's: each weighted by the client's example count
    (an excluded client weighs 0), ``excluded_clients`` (how many of the ``present`` [m] ones the
    guard excluded: a client that takes no part is excluded, but not counted), and with budget
    tiers (``budgets.Tiers``; the cohort tier-major) ``loss_b<b>`` for each tier of budget b."""
    weights = counts.astype(jnp.float32) * (1.0 - excluded)
    out = {name: masked_mean(v, weights) for name, v in metrics.items()}
    out["excluded_clients"] = excluded.sum() if present is None else (excluded * present).sum()
    if tiers is not None:
        for b, start, n in zip(tiers.budgets, tiers.starts, tiers.counts):
            out[f"loss_b{b}"] = masked_mean(metrics["loss"][start:start + n], weights[start:start + n])
    return out
