"""What a round costs one client: bytes sent each way, parameters trained, FLOPs.

Bytes and parameter counts come from abstract shapes (``jax.eval_shape``: no compile). FLOPs
come from XLA's cost analysis of the compiled client, which counts a ``scan`` body once: the
client is the once-per-round work (``featurize`` over all examples, when the client caches it)
plus one step, so its training FLOPs are ``once + local_steps * (compiled - once)``.

With budget tiers (``fedms_jax.budgets``) a round's clients train at their tiers' levels
``min(k, b)``: ``tier_phases`` lists (budget, phase of its clients, clients per round),
``round_bytes`` sums a round's bytes over the tiers, ``tier_flops`` predicts each tier's FLOPs
from the per-level client cost (clients x ``client_flops`` at the tier's level), and
``group_flops`` measures what the round program actually runs for each group of tiers (the
engine's ``train_group`` over the group's clients, compiled alone): the two must agree.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.federated.client import client_update, num_steps, uses_cache
from fedms_jax.budgets import Group
from fedms_jax.federated.types import ClientStates, Phase, ServerState, tree_bytes
from fedms_jax.models.transformer import unrolled_layers

PyTree = Any


def _one_client(engine, server: ServerState, clients: ClientStates, phase: Phase):
    """Abstract shapes of one client's round inputs at ``phase``: (stage, down, client)."""
    cohort = jax.eval_shape(
        lambda d, c: engine.gather(d, c, jnp.zeros((1,), jnp.int32), jnp.zeros((), jnp.int32)), engine.data_spec, clients
    )
    one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), cohort)
    stage = engine.algorithm.stage(phase)
    down = jax.eval_shape(lambda s: stage.broadcast(s, phase), server)
    return stage, down, one


def bytes_per_client(engine, server: ServerState, clients: ClientStates, phase: Phase) -> tuple[int, int]:
    """(download, upload) bytes of one client in a round at ``phase``: the broadcast tree and
    the upload tree (for a frozen global expert the broadcast is an upper bound: a real client
    could cache it). Local training keeps its params' shapes, so the upload's shapes come from
    ``client_init`` and ``client_final`` alone, without tracing the training (which a run's
    start-up would wait for)."""
    stage, down, one = _one_client(engine, server, clients, phase)

    def upload(down, state):
        params, _ = stage.client_init(down, state, phase)
        return stage.client_final(down, state, params, params, phase)[0]

    return tree_bytes(down), tree_bytes(jax.eval_shape(upload, down, one["state"]))


def trainable_params(engine, server: ServerState, clients: ClientStates, phase: Phase) -> int:
    """How many parameters one client trains at ``phase`` (its local problem's params)."""
    stage, down, one = _one_client(engine, server, clients, phase)
    params, _ = jax.eval_shape(lambda d, st: stage.client_init(d, st, phase), down, one["state"])
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def _flops(lower: Callable[[], Any]) -> float:
    """FLOPs of the program ``lower()`` lowers, traced with unrolled layers (XLA's cost analysis
    counts a loop body once, so a scanned encoder would count as one block)."""
    with unrolled_layers():
        lowered = lower()
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def client_flops(engine, server: ServerState, clients: ClientStates, phase: Phase) -> float:
    """FLOPs of one client's local training at ``phase`` (compiles the client: off the
    critical path, for benchmarks and comparisons)."""
    settings = engine.algorithm.settings
    stage, down, one = _one_client(engine, server, clients, phase)
    broadcast = (engine.backbone, down)
    total = _flops(lambda: jax.jit(client_update(stage, phase, settings)).lower(broadcast, one))
    once = 0.0
    if uses_cache(settings, one["images"].shape[0]):
        once = _flops(lambda: jax.jit(_featurize(stage, settings, phase)).lower(*broadcast, one))
    return once + num_steps(settings, one["images"].shape[0]) * (total - once)


def _featurize(stage, settings, phase: Phase):
    """One client's once-per-round frozen work (what a caching client runs before its steps)."""
    def featurize(backbone, down, client):
        _, ctx = stage.client_init(down, client["state"], phase)
        return stage.featurize(backbone, ctx, settings.prep(client["images"]), phase)

    return featurize


# --- budget tiers ---------------------------------------------------------------------------
class Tier(NamedTuple):
    """One tier of a round: its budget (None without budgets), the phase its clients train at
    (``Phase(stage, min(k, budget))``) and its clients per round."""

    budget: int | None
    phase: Phase
    clients: int


def tier_phases(engine, phase: Phase, cohort_size: int) -> list[Tier]:
    """The tiers of a round at ``phase`` (one tier of the whole cohort at k without budgets)."""
    if engine.tiers is None:
        return [Tier(None, phase, cohort_size)]
    t = engine.tiers
    return [Tier(b, Phase(phase.stage, level), n) for b, level, n in zip(t.budgets, t.levels(phase.num_active), t.counts)]


def round_bytes(engine, server: ServerState, clients: ClientStates, phase: Phase, cohort_size: int) -> tuple[int, int]:
    """(download, upload) bytes of a whole round at ``phase``: each tier's clients x one client's
    bytes at the tier's level (``bytes_per_client``)."""
    per = [(t.clients, bytes_per_client(engine, server, clients, t.phase)) for t in tier_phases(engine, phase, cohort_size)]
    return sum(n * d for n, (d, _) in per), sum(n * u for n, (_, u) in per)


def tier_flops(engine, server: ServerState, clients: ClientStates, phase: Phase, cohort_size: int,
               per_level: dict[Phase, float] | None = None) -> list[float]:
    """Predicted training FLOPs of each tier in a round at ``phase``: its clients x one client's
    FLOPs at its level (``client_flops``, memoised per level in ``per_level`` if given)."""
    per_level = {} if per_level is None else per_level
    out = []
    for t in tier_phases(engine, phase, cohort_size):
        if t.phase not in per_level:
            per_level[t.phase] = client_flops(engine, server, clients, t.phase)
        out.append(t.clients * per_level[t.phase])
    return out


def group_flops(engine, server: ServerState, clients: ClientStates, phase: Phase, cohort_size: int) -> list[tuple[Group, float]]:
    """Measured training FLOPs of each group of a round at ``phase`` (tiers of one level merged,
    ``Engine.groups``): XLA's cost analysis of the engine's ``train_group`` -- the gather, the
    broadcast at the group's level, the vmapped clients and the weighted sums, as the round program
    runs them -- compiled alone over the group's clients (unchunked), with the scan correction
    of ``client_flops``: ``once + steps * (compiled - once)``, ``once`` the group's frozen work."""
    settings = engine.algorithm.settings
    t = jnp.zeros((), jnp.int32)
    out = []
    for g in engine.groups(phase, cohort_size):
        level = Phase(phase.stage, g.level)
        ids = jnp.arange(g.size, dtype=jnp.int32)
        body = lambda s, c, t, ids, b, d, level=level, n=g.size: engine.train_group(s, c, t, ids, b, d, level, chunk_size=n)[:5]
        total = _flops(lambda: jax.jit(body).lower(server, clients, t, ids, engine.backbone, engine.data_spec))
        stage, down, one = _one_client(engine, server, clients, level)
        once = 0.0
        if uses_cache(settings, one["images"].shape[0]):
            cohort = jax.eval_shape(lambda d, c: engine.gather(d, c, ids, t), engine.data_spec, clients)
            many = jax.vmap(_featurize(stage, settings, level), in_axes=(None, None, 0))
            once = _flops(lambda: jax.jit(many).lower(engine.backbone, down, cohort))
        out.append((g, once + num_steps(settings, one["images"].shape[0]) * (total - once)))
    return out


# --- the system model's costs -----------------------------------------------------------------
def level_costs(engine, server: ServerState, clients: ClientStates, stage: int, levels: list[int],
                flops_at: dict[Phase, float] | None = None):
    """``system.Costs`` of one client of ``stage`` at every SAL level up to ``max(levels)``: bytes
    each way at each level (``bytes_per_client``, from shapes) and training FLOPs measured on the
    compiled client (``client_flops``) at the smallest and largest of ``levels`` and linear in
    between: every block has the same shapes, so a level adds the same backward and LoRA work
    and takes the same frozen forward away (checked against the compiled client at a middle
    level: ``tests/test_system.py``). ``flops_at``: memo of measured levels (shared over calls)."""
    from fedms_jax.system import Costs

    flops_at = {} if flops_at is None else flops_at
    lo, hi = min(levels), max(levels)
    for level in {lo, hi}:
        if Phase(stage, level) not in flops_at:
            flops_at[Phase(stage, level)] = client_flops(engine, server, clients, Phase(stage, level))
    f_lo, f_hi = flops_at[Phase(stage, lo)], flops_at[Phase(stage, hi)]
    slope = 0.0 if hi == lo else (f_hi - f_lo) / (hi - lo)
    n = hi + 1
    flops, down, up = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)  # levels below lo: never run
    for d in range(lo, n):
        flops[d] = f_lo + slope * (d - lo)
        down[d], up[d] = bytes_per_client(engine, server, clients, Phase(stage, d))
    return Costs(flops, down, up)
