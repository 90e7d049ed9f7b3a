"""The round program: cohort sampling, one jitted function per phase, evaluation programs.

A round is ``(server state, client states, round index, cohort ids) -> (new states, metrics)``
(``Engine.run_round``):

1. gather the cohort's data, persistent states and keys (``Engine.gather``);
2. ``down = stage.broadcast(server, phase)``;
3. ``placement.map_reduce(client_update, (backbone, down), cohort)`` -> per-unit means and
   totals, new client states, metrics (``federated.client``, ``federated.placement``);
4. ``stage.server_update`` (``federated.server``), scatter the states back.

With budget tiers (``sal.budgets``, ``fedms_jax.budgets``; the engine's ``tiers``) the cohort
comes tier-major and steps 1-3 run once per *group* of tiers with the same SAL level
``min(k, b)`` (``Engine.groups``): each group is gathered, sent the units of its level
(``stage.broadcast`` at ``Phase(stage, level)``) and mapped with that level's client function;
the groups' per-unit weighted sums and total weights are added, so each unit is averaged over
the clients that trained it, and one ``server_update`` runs at the round's phase. The tier
structure is static, so this is still one program per phase, holding one client body per
distinct level of the phase (a handful), and no Python loop over clients.

With the ``Vmap`` backend that is one program per distinct ``Phase`` (the only static argument;
the round index is traced), compiled once per engine through ``compiling.Programs``: lowered
from the states' abstract shapes (``lower_round``), so a run can compile every phase it will
need ahead, in background threads, before its rounds reach them (``Engine.compile_ahead``), and
the executable is called directly. Every input and output has a fixed sharding (states, round
index, cohort ids and data replicated; the backbone by ``strategy``), so one executable serves
every round of its phase. The backbone and the data are arguments, never closed-over constants
(XLA would embed them in the program). Evaluation programs are made the same way.

Randomness: client c in round t uses the key ``(seed, ROUND, t, c)`` and its held-out split
``(seed, SPLIT, c)``; the cohort of round t is drawn from ``(seed, COHORT, t)`` (``fedms_jax.rng``),
so results do not depend on devices, chunking or resumes.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.budgets import Group, Tiers, uniform_cohort
from fedms_jax import privacy, rng
from fedms_jax.compiling import Programs, abstract
from fedms_jax.data.clients import ClientData
from fedms_jax.federated import evaluation, sharding
from fedms_jax.federated.client import client_update
from fedms_jax.federated.placement import Placement, replicated
from fedms_jax.federated.server import weighted_mean
from fedms_jax.federated.types import ClientOutput, ClientStates, Phase, ServerState, tree_where
from fedms_jax.models.transformer import layer_params_hook

PyTree = Any
EXCLUDED = "excluded"


def sample_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform without replacement, from the stream (seed, COHORT, round): a resumed run draws the same.
    (With budgets the cohort comes from ``budgets.ResourceModel.cohort``, tier-major.)"""
    return uniform_cohort(seed, round_index, num_clients, cohort_size)


def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every float in ``tree`` is finite: one reduction over the leaves concatenated.
    (Per-leaf flags ``and``-ed together compile to a chain that XLA fused into every ``where``
    reading the result: 58 copies of a 207-long chain made up a quarter of a stage-1 round
    program and more than half its compile time.)"""
    floats = [x.ravel().astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(jnp.concatenate(floats)).all() if floats else jnp.ones((), bool)


def guard(update: Callable) -> Callable:
    """A client whose upload, new state or metrics hold NaN/Inf, or that has no examples, gets
    weight 0 in every unit and a zero upload (so it cannot poison a mean), keeps its old state,
    and is counted in the round's ``excluded_clients``."""

    def guarded(broadcast, client):
        out = update(broadcast, client)
        ok = (client["count"] > 0) & _all_finite((out.upload, out.state, out.metrics))
        return ClientOutput(
            upload=jax.tree_util.tree_map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out.upload),
            weight=jax.tree_util.tree_map(lambda w: jnp.where(ok, w, 0.0), out.weight),
            state=tree_where(ok, out.state, client["state"]),
            metrics={
                **jax.tree_util.tree_map(lambda m: jnp.where(ok, m, 0.0), out.metrics),
                EXCLUDED: 1.0 - ok.astype(jnp.float32),
            },
        )

    return guarded


def privatized(update: Callable, clip: float) -> Callable:
    """DP-FedAvg's client side (``fedms_jax.privacy``; after ``guard``): the whole upload (every
    unit together) scaled to L2 norm at most ``clip``, and every unit weighted 1, so the server
    divides each unit's noisy sum by the number of clients asked to train it (public; an
    excluded client counts, with its zero upload) instead of by their example counts, which
    are private. Adds the metrics ``dp_update_norm`` (before clipping) and ``dp_clipped``."""

    def private(broadcast, client):
        out = update(broadcast, client)
        upload, norm = privacy.clip_by_global_norm(out.upload, clip)
        return ClientOutput(
            upload=upload,
            weight=jax.tree_util.tree_map(jnp.ones_like, out.weight),
            state=out.state,
            metrics={**out.metrics, "dp_update_norm": norm, "dp_clipped": (norm > clip).astype(jnp.float32)},
        )

    return private


class Engine:
    """Runs rounds and evaluations of an algorithm over stacked client data.

    Args:
      algorithm: the federated algorithm (``algorithms.Algorithm``).
      backbone: the frozen backbone params (laid out by ``strategy`` on ``mesh``).
      data: every client's training data (``ClientData``; placed replicated here), or None for a
        streamed population (``federated.population``), whose rounds get the cohort's data.
      seed: the run's seed.
      placement: ``placement.Vmap`` (one jitted round) or ``placement.Sequential``; its mesh
        (default: every device on 'clients') is where the backbone, data and states live.
      strategy: how the backbone is laid out over the 'model' axis (``sharding.RULES``).
      eval_clients: clients evaluated at once (vmapped) in personalised evaluation.
      eval_batch: examples per evaluation batch inside a client (and per global-test batch).
      tiers: budget tiers (``budgets.Tiers``): every cohort is then tier-major with
        ``tiers.counts`` clients per tier, and a tier of budget b trains at level min(k, b).
        None: every client trains at k.
      compile_threads: background threads for ``compile_ahead`` (0: every program is compiled
        when first used).
      dp: ``(clip, noise_multiplier)`` for DP-FedAvg (``privatized`` clients; the server adds
        N(0, (noise_multiplier * clip)^2) per coordinate to each unit's sum, from the stream
        ``(seed, DP_NOISE, round)``), or None.
    """

    def __init__(
        self, algorithm, backbone: PyTree, data: ClientData, *, seed: int, placement: Placement,
        strategy: str = "replicated", eval_clients: int = 8, eval_batch: int = 256,
        tiers: Tiers | None = None, compile_threads: int = 0, dp: tuple[float, float] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.placement = placement
        mesh = placement.mesh if placement.mesh is not None else sharding.make_mesh()
        self.mesh = mesh
        self.strategy = strategy
        self.backbone = jax.device_put(backbone, sharding.shardings(backbone, mesh, strategy))
        self.data = None if data is None else jax.device_put(data, replicated(mesh))
        self.data_like: ClientData | None = None  # streamed: a cohort's data shapes (``data_spec``)
        self.seed = seed
        self.eval_clients = eval_clients
        self.eval_batch = eval_batch
        self.tiers = tiers
        self.dp = dp
        self.num_traces = 0  # how many round programs were traced (= compiled)
        self._programs: dict[tuple, Callable] = {}  # (kind, phase, ...) -> jitted function or client fn
        self.executables = Programs(compile_threads)  # (kind, phase, ...) -> compiled program
        self._lock = threading.RLock()

    def _cached(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        with self._lock:  # compile threads trace programs concurrently
            if key not in self._programs:
                self._programs[key] = make()
            return self._programs[key]

    def place(self, tree: PyTree) -> PyTree:
        """Commits states or data to the mesh (replicated), as the round's outputs are, so the
        first round and every later one see the same input shardings (one executable per phase).
        Arrays already placed so are returned as they are. Host (numpy) arrays are taken as the
        same on every process, as the run's are by construction (device_put would check that
        with a collective on every call in a multi-process job)."""
        rep = replicated(self.mesh)

        def put(x):
            if isinstance(x, jax.Array):
                return jax.device_put(x, rep)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, rep, lambda index: x[index])

        return jax.tree_util.tree_map(put, tree)

    @property
    def data_spec(self) -> PyTree:
        """The clients' data as a round reads it: the engine's data, or for a streamed
        population the shapes of a cohort's at its largest bucket (``data_like``, set by
        ``run.build``)."""
        return self.data if self.data is not None else self.data_like

    @property
    def compiled_phases(self) -> list[Phase]:
        """The phases whose round program was compiled (none for the sequential backend)."""
        return [key[1] for key in self.executables.timings if key[0] == "round"] if self.placement.jitted else []

    @property
    def client_phases(self) -> list[Phase]:
        """The phases (stage, level) whose client function was made: the distinct client programs
        (inlined into the round programs for ``Vmap``; jitted one each for ``Sequential``)."""
        return [key[1] for key in self._programs if key[0] == "client"]

    def groups(self, phase: Phase, cohort_size: int) -> tuple[Group, ...]:
        """The round's client groups at ``phase``: cohort slices trained at one SAL level each
        (budget tiers with equal ``min(k, b)`` merged), or the whole cohort at k without tiers."""
        if self.tiers is None:
            return (Group(phase.num_active, 0, cohort_size, ()),)
        if cohort_size != self.tiers.cohort_size:
            raise ValueError(f"a cohort of {cohort_size} clients, but the budget tiers take {self.tiers.counts} "
                             f"= {self.tiers.cohort_size} clients per round, tier by tier")
        return self.tiers.groups(phase.num_active)

    def group_chunk(self, size: int) -> int:
        """Clients per vmapped chunk for a group of ``size``: the largest divisor of ``size`` not
        above the backend's chunk (whole cohort: ``size``) that is a multiple of its devices."""
        d = self.placement.num_devices
        target = min(getattr(self.placement, "chunk_size", None) or size, size)
        fits = [c for c in range(d, target + 1, d) if size % c == 0]
        if not fits:
            raise ValueError(f"a budget tier group of {size} clients cannot be split over the {d} devices the "
                             f"clients are spread over: clients per tier per round must be multiples of {d}")
        return max(fits)

    # --- training ---------------------------------------------------------------------------
    def client_fn(self, phase: Phase) -> Callable:
        """The guarded ``client_update`` of the phase's stage (one per phase, per engine)."""
        def make():
            fn = guard(client_update(self.algorithm.stage(phase), phase, self.algorithm.settings))
            return fn if self.dp is None else privatized(fn, self.dp[0])

        return self._cached(("client", phase), make)

    def _noisy(self, summed: PyTree, round_index: jax.Array) -> PyTree:
        """DP: the units' sums plus Gaussian noise of std noise_multiplier * clip (the same on
        every device: one key, replicated); without DP, the sums."""
        if self.dp is None:
            return summed
        clip, z = self.dp
        return jax.tree_util.tree_map(jnp.add, summed, privacy.gaussian_noise_like(
            summed, rng.key(self.seed, rng.Stream.DP_NOISE, round_index), z * clip))

    def gather(self, data: ClientData, clients: ClientStates, cohort_ids: jax.Array, round_index: jax.Array,
               state_keys: tuple[str, ...] | None = None, positions: jax.Array | None = None) -> PyTree:
        """One round's per-client inputs [cohort, ...]: id, images, labels, count, key, split_key,
        participation (rounds each has trained in before), state (the entries ``state_keys`` of
        the client states; None: all). ``positions``: the
        cohort's rows in ``data`` and ``clients`` (None: its ids, as when they hold every
        client; a streamed cohort's arrays hold just the cohort)."""
        rows = cohort_ids if positions is None else positions
        take = lambda x: x[rows]
        return {
            "id": cohort_ids,
            "images": take(data.images),
            "labels": take(data.labels),
            "count": take(data.counts),
            "key": rng.client_keys(self.seed, round_index, cohort_ids),
            # The same every round: a client's held-out split (``client.Sampler``) never moves.
            "split_key": rng.split_keys(self.seed, cohort_ids),
            "participation": take(clients.participation),
            "state": jax.tree_util.tree_map(take, _entries(clients.local, state_keys)),
        }

    def train_group(self, server, clients, round_index, ids, backbone, data, phase: Phase, *, chunk_size=None,
                    positions=None):
        """One group of a budget-aware round: the clients ``ids`` (at ``positions`` of ``data``
        and ``clients``; None: at their ids) trained at ``phase`` (the group's level) ->
        (summed uploads, totals, new states, metrics, example counts)."""
        stage = self.algorithm.stage(phase)
        cohort = self.gather(data, clients, ids, round_index, stage.state_keys, positions)
        broadcast = (backbone, stage.broadcast(server, phase))
        summed, totals, states, metrics = self.placement.map_reduce(
            self.client_fn(phase), broadcast, cohort, chunk_size=chunk_size or self.group_chunk(ids.shape[0]), mean=False)
        return summed, totals, states, metrics, cohort["count"]

    def _tiered_round(self, stage, server, clients, round_index, cohort_ids, positions, backbone, data, phase):
        """A round over a tier-major cohort: one ``train_group`` per level, the groups' sums and
        totals added unit by unit (a unit only some groups trained is averaged over those)."""
        summed, totals, local = {}, {}, clients.local
        add = lambda acc, part: {**acc, **{u: v if u not in acc else jax.tree_util.tree_map(jnp.add, acc[u], v)
                                           for u, v in part.items()}}
        metrics, counts = [], []
        for g in self.groups(phase, cohort_ids.shape[0]):
            ids, rows = cohort_ids[g.start:g.start + g.size], positions[g.start:g.start + g.size]
            s, t, states, m, n = self.train_group(server, clients, round_index, ids, backbone, data,
                                                  Phase(phase.stage, g.level), positions=rows)
            summed, totals = add(summed, s), add(totals, t)
            local = _scatter(local, states, rows)
            metrics.append(m)
            counts.append(n)
        server = stage.server_update(server, weighted_mean(self._noisy(summed, round_index), totals), totals, phase)
        metrics = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *metrics)
        excluded = metrics.pop(EXCLUDED)
        clients = ClientStates(
            participation=clients.participation.at[positions].add(1 - excluded.astype(jnp.int32)),
            local=local,
        )
        weights = jnp.concatenate(counts).astype(jnp.float32) * (1.0 - excluded)
        mean_of = lambda v, w: jnp.sum(v * w) / jnp.maximum(w.sum(), 1.0)
        out = {name: mean_of(v, weights) for name, v in metrics.items()}
        out["excluded_clients"] = excluded.sum()
        for b, start, n in zip(self.tiers.budgets, self.tiers.starts, self.tiers.counts):  # per tier
            out[f"loss_b{b}"] = mean_of(metrics["loss"][start:start + n], weights[start:start + n])
        return server, clients, out

    def _round(self, server, clients, round_index, cohort_ids, backbone, data, positions=None, *, phase):
        positions = cohort_ids if positions is None else positions
        with layer_params_hook(sharding.gather_layers(self.mesh, self.strategy)):  # fsdp: gather per layer
            stage = self.algorithm.stage(phase)
            if self.placement.jitted:
                self.num_traces += 1
                backbone = sharding.for_compute(backbone, self.mesh, self.strategy)
            if self.tiers is not None:
                return self._tiered_round(stage, server, clients, round_index, cohort_ids, positions, backbone, data, phase)
            cohort = self.gather(data, clients, cohort_ids, round_index, stage.state_keys, positions)
            broadcast = (backbone, stage.broadcast(server, phase))
            summed, totals, states, metrics = self.placement.map_reduce(self.client_fn(phase), broadcast, cohort, mean=False)
            server = stage.server_update(server, weighted_mean(self._noisy(summed, round_index), totals), totals, phase)
            excluded = metrics.pop(EXCLUDED)
            clients = ClientStates(
                participation=clients.participation.at[positions].add(1 - excluded.astype(jnp.int32)),
                local=_scatter(clients.local, states, positions),
            )
            weights = cohort["count"].astype(jnp.float32) * (1.0 - excluded)
            out = {name: jnp.sum(v * weights) / jnp.maximum(weights.sum(), 1.0) for name, v in metrics.items()}
            out["excluded_clients"] = excluded.sum()
            return server, clients, out

    def round_fn(self, phase: Phase) -> Callable:
        """The round at ``phase``: jitted (donating the states; every output replicated) for
        ``Vmap``; for ``Sequential`` a Python function driving one jitted client at a time.
        Arguments: (server, clients, round index, cohort ids, backbone, data[, positions]):
        without ``positions`` the cohort is at its ids in ``data`` and ``clients`` (every client
        there); with them (a streamed cohort: ``arange(cohort)``), at those rows."""
        body = lambda s, c, t, ids, b, d, pos=None: self._round(s, c, t, ids, b, d, pos, phase=phase)
        jitted = lambda: jax.jit(body, donate_argnums=(0, 1), out_shardings=replicated(self.mesh))
        return self._cached(("round", phase), jitted if self.placement.jitted else lambda: body)

    def lower_round(self, phase: Phase, server: PyTree, clients: PyTree, cohort_size: int, data: PyTree = None):
        """The round program at ``phase`` for a cohort of ``cohort_size``, lowered (traced) from
        the states' shapes: ``server`` and ``clients`` may be arrays or ShapeDtypeStructs.
        ``data``: a streamed cohort's data (its shapes; then ``clients`` is the cohort's states
        and the program takes their positions), or None for the engine's data."""
        rep = replicated(self.mesh)
        index = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
        head = (abstract(server, rep), abstract(clients, rep), index(()), index((cohort_size,)), abstract(self.backbone))
        if data is None:
            return self.round_fn(phase).lower(*head, abstract(self.data))
        return self.round_fn(phase).lower(*head, abstract(data, rep), index((cohort_size,)))

    def compile_ahead(self, programs: list[tuple]) -> None:
        """Starts compiling ``programs`` in the background threads, in order: each is
        ``('round', phase, server, clients, cohort_size[, data])``, ``('personal', phase, server,
        clients, test)`` or ``('global', phase, server, images, labels)``, with the arguments'
        arrays or ShapeDtypeStructs (their shapes are taken now: the arrays may be donated)."""
        if not self.placement.jitted:
            return
        for kind, phase, *args in programs:
            args = [a if isinstance(a, int) else abstract(a) for a in args]
            key, lower = self._lowering(kind, phase, *args)
            self.executables.submit(key, lower)

    def _lowering(self, kind: str, phase: Phase, *args) -> tuple[tuple, Callable]:
        """(key, lower) of a program: ``lower()`` traces and lowers it from ``args``' shapes."""
        if kind == "round":
            server, clients, cohort_size, *data = args
            if not data or data[0] is None:
                return ("round", phase, cohort_size), lambda: self.lower_round(phase, server, clients, cohort_size)
            # A streamed cohort's program: one per padded size (bucket).
            key = ("round", phase, cohort_size, "streamed", tuple(data[0].images.shape))
            return key, lambda: self.lower_round(phase, server, clients, cohort_size, data[0])
        if kind == "personal":
            server, clients, test = args
            key = ("personal", phase, self.eval_batch, self.eval_clients)
            return key, lambda: self._personal_fn(phase).lower(
                *(abstract(x, replicated(self.mesh)) for x in (server, clients)), abstract(self.backbone),
                abstract(test, replicated(self.mesh)))
        if kind == "global":
            server, images, labels = args
            key = ("global", phase, self.eval_batch, tuple(images.shape))
            return key, lambda: self._global_fn(phase).lower(
                abstract(server, replicated(self.mesh)), abstract(self.backbone),
                *(abstract(x, replicated(self.mesh)) for x in (images, labels)))
        raise ValueError(f"unknown program kind {kind!r}")

    def run_round(
        self, server: ServerState, clients: ClientStates, round_index: int, phase: Phase, cohort_ids: np.ndarray,
        data: ClientData | None = None,
    ) -> tuple[ServerState, ClientStates, dict]:
        """One round at ``phase`` (``algorithm.phase(round_index)``) over ``cohort_ids`` (with
        budget tiers: tier-major, as ``budgets.ResourceModel.cohort`` draws it).

        ``data``: None when ``clients`` and the engine's data hold every client; for a streamed
        cohort, the cohort's data [cohort, bucket, ...], with ``clients`` the cohort's states
        (in cohort order): the returned states are then the cohort's new states."""
        m = len(cohort_ids)
        positions = None if data is None else np.arange(m, dtype=np.int32)
        if not self.placement.jitted:
            ids, t = jnp.asarray(cohort_ids, jnp.int32), jnp.asarray(round_index, jnp.int32)
            if data is None:
                return self.round_fn(phase)(server, clients, t, ids, self.backbone, self.data)
            clients, data = jax.tree_util.tree_map(jnp.asarray, (clients, data))  # host arrays have no .at[]
            return self.round_fn(phase)(server, clients, t, ids, self.backbone, data, jnp.asarray(positions))
        ids, t = self.place((np.asarray(cohort_ids, np.int32), np.asarray(round_index, np.int32)))
        server, clients = self.place((server, clients))
        key, lower = self._lowering("round", phase, server, clients, m, data)
        if data is None:
            return self.executables.get(key, lower)(server, clients, t, ids, self.backbone, self.data)
        data, positions = self.place((data, positions))
        return self.executables.get(key, lower)(server, clients, t, ids, self.backbone, data, positions)

    # --- evaluation -------------------------------------------------------------------------
    def _program(self, key: tuple, make_body: Callable[[], Callable]) -> Callable:
        """The evaluation program ``key`` (everything read at trace time is in it), made once."""
        def make():
            body = make_body()
            return jax.jit(body) if self.placement.jitted else body

        return self._cached(key, make)

    def _replicate(self, tree: PyTree) -> PyTree:
        """Evaluation sums, gathered onto every device (a few scalars per client), so every
        process of a multi-host job can read them."""
        if not self.placement.jitted:
            return tree
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, replicated(self.mesh)), tree)

    def _personal_fn(self, phase: Phase) -> Callable:
        """``(server, clients, backbone, test) -> per-client sums``, jitted for ``Vmap``."""
        batch, chunk = self.eval_batch, self.eval_clients

        def make_body():
            fn = evaluation.personal_eval_fn(self.algorithm, phase, batch)

            def body(server, clients, backbone, test):
                down = self.algorithm.stage(phase).broadcast(server, phase)
                per_client = {"images": test.images, "labels": test.labels, "count": test.counts, "state": clients.local}
                if self.placement.jitted:
                    backbone = sharding.for_compute(backbone, self.mesh, self.strategy)
                with layer_params_hook(sharding.gather_layers(self.mesh, self.strategy)):
                    return self._replicate(self.placement.map(fn, (backbone, down), per_client, chunk_size=chunk))

            return body

        return self._program(("personal", phase, batch, chunk), make_body)

    def _global_fn(self, phase: Phase) -> Callable:
        """``(server, backbone, images, labels) -> summed nll and correct``, jitted for ``Vmap``."""
        batch, shards = self.eval_batch, self.placement.num_devices

        def make_body():
            fn = evaluation.global_eval_fn(self.algorithm, phase, batch)

            def body(server, backbone, images, labels):
                down = self.algorithm.stage(phase).broadcast(server, phase)
                if self.placement.jitted:
                    backbone = sharding.for_compute(backbone, self.mesh, self.strategy)
                with layer_params_hook(sharding.gather_layers(self.mesh, self.strategy)):
                    out = self.placement.map(fn, (backbone, down), evaluation.shard_test_set(images, labels, shards))
                return self._replicate({name: v.sum() for name, v in out.items()})

            return body

        return self._program(("global", phase, batch), make_body)

    def _call(self, kind: str, phase: Phase, *args) -> PyTree:
        """Runs evaluation program ``kind`` on ``args`` (the backbone goes in second place)."""
        if not self.placement.jitted:
            fn = self._personal_fn(phase) if kind == "personal" else self._global_fn(phase)
            return fn(*_with_backbone(kind, args, self.backbone))
        args = self.place(args)
        key, lower = self._lowering(kind, phase, *args)
        return self.executables.get(key, lower)(*_with_backbone(kind, args, self.backbone))

    def evaluate_clients(self, server: ServerState, clients: ClientStates, phase: Phase, test: ClientData) -> dict[str, np.ndarray]:
        """Every client's personalised model on its own test split (``test``: padded per-client
        test data [clients, max_t, ...]). Returns per-client arrays [clients]: ``count``,
        ``correct``, ``nll`` (summed) and the sum of every per-example extra (e.g. ``gate_local``)."""
        out = self._call("personal", phase, server, clients, test)
        return {"count": np.asarray(test.counts), **{name: np.asarray(v) for name, v in out.items()}}

    def evaluate_global(self, server: ServerState, phase: Phase, images: jax.Array, labels: jax.Array) -> tuple[float, float]:
        """The global model on a whole test set, split over the devices: -> (mean loss, accuracy)."""
        nll, correct = self.global_sums(server, phase, images, labels)
        n = labels.shape[0]
        return nll / n, correct / n

    def global_sums(self, server: ServerState, phase: Phase, images: jax.Array, labels: jax.Array) -> tuple[float, float]:
        """The global model's summed loss and number correct over ``images`` / ``labels`` (a
        test set or a piece of one: pieces add up exactly)."""
        if not self.algorithm.has_global_model:
            raise TypeError(f"algorithm {self.algorithm.name!r} has no global model")
        out = self._call("global", phase, server, images, labels)
        return float(out["nll"]), float(out["correct"])


def _entries(local: PyTree, keys: tuple[str, ...] | None) -> PyTree:
    """The client-state entries ``keys`` (None: the whole state)."""
    return local if keys is None else {k: local[k] for k in keys}


def _scatter(local: PyTree, states: PyTree, ids: jax.Array) -> PyTree:
    """Writes the cohort's new states (all, or some of the entries) back at ``ids``."""
    if isinstance(local, dict) and isinstance(states, dict) and states.keys() != local.keys():
        return {**local, **{k: _scatter(local[k], v, ids) for k, v in states.items()}}
    return jax.tree_util.tree_map(lambda all_, new: all_.at[ids].set(new), local, states)


def _with_backbone(kind: str, args: tuple, backbone: PyTree) -> tuple:
    """An evaluation program's arguments: personal (server, clients, backbone, test); global
    (server, backbone, images, labels)."""
    if kind == "personal":
        server, clients, test = args
        return server, clients, backbone, test
    server, images, labels = args
    return server, backbone, images, labels

