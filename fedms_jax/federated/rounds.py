"""The engine: one round program per phase, from cohort to server update.

A round is ``(server state, client states, round index, cohort ids, depths) -> (new states, metrics)``
(``Engine.run_round``), traced once per ``Phase`` (the only static argument) as ``_round``:

1. the cohort in groups (``Engine.groups``: the whole cohort; with budget tiers, the tiers of
   one SAL level ``min(k, b)`` each, the cohort tier-major); per group (``train_group``): gather
   its data, states and keys, ``down = stage.broadcast(server, phase at its level)``, and
   ``placement.map_reduce`` of the guarded client update (``federated.guards`` around
   ``federated.client.client_update``) -> per-unit weighted sums and totals, new states, metrics;
2. ``aggregate.aggregate`` of the groups' sums (added unit by unit, DP noise, divided by each
   unit's total) -> one ``stage.server_update`` at the round's phase;
3. the states scattered back, the metrics weighted (``aggregate.round_metrics``).

The tier structure is static, so this is one program per phase holding one client body per
distinct level (a handful), and no Python loop over clients. Programs are lowered from the
states' shapes and compiled ahead or on demand (``federated.programs``); evaluation programs are
made the same way (``federated.evaluation``).

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
from jax.sharding import NamedSharding

from fedms_jax import rng
from fedms_jax.budgets import Group, Tiers, uniform_cohort
from fedms_jax.compiling import Programs, shapes
from fedms_jax.data.clients import ClientData
from fedms_jax.federated import aggregate, programs, sharding
from fedms_jax.federated import buffered as buffered_round
from fedms_jax.federated.client import client_update
from fedms_jax.federated.guards import EXCLUDED, SERVER_FINITE, all_finite, guard, privatized
from fedms_jax.federated.placement import Placement, clients_sharding, make_placement, put_tree, replicated
from fedms_jax.federated.protocol import Algorithm
from fedms_jax.federated.types import ClientStates, Phase, ServerState
from fedms_jax.models.transformer import layer_params_hook

PyTree = Any
FULL_DEPTH = 1 << 20  # a depth no level reaches: the client trains its group's whole level


def sample_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform without replacement, from the stream (seed, COHORT, round): a resumed run draws the same.
    (With budgets the cohort comes from ``budgets.ResourceModel.cohort``, tier-major.)"""
    return uniform_cohort(seed, round_index, num_clients, cohort_size)


def _put(tree: PyTree, shardings: PyTree) -> PyTree:
    """Arrays placed by ``shardings``; a ShapeDtypeStruct (an engine that only lowers programs,
    e.g. for a TPU topology with no device attached: ``tpu_plan``) gets the sharding instead."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if isinstance(x, jax.ShapeDtypeStruct)
        else jax.device_put(x, s), tree, shardings)


class Engine:
    """Runs rounds and evaluations of an algorithm over stacked client data.

    Args:
      algorithm: the federated algorithm (``algorithms.Algorithm``).
      backbone: the frozen backbone params (laid out by ``strategy`` on ``mesh``).
      data: every client's training data (``ClientData``; placed replicated here), or None for a
        streamed population (``federated.population``), whose rounds get the cohort's data.
        Both may be ShapeDtypeStructs: an engine that only lowers (``lower_round``, ``lowering``).
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
        N(0, (noise_multiplier * clip)^2) per coordinate to each unit's sum), or None.
      noise_key: DP: the secret key data (``rng.secret_key_data``: uint32, drawn from the OS)
        the noise comes from, ``(secret, DP_NOISE, round)``; it is an argument of the round
        program, never a constant in it, so no compiled program (nor the persistent cache)
        holds it. None: the reproducible stream ``(seed, DP_NOISE, round)`` (``dp.reproducible_noise``).
      deadline_depth: each client trains only the top ``depth`` blocks of its group's level
        (``sal.budget_mode = deadline``; the depths an input of every round, ``run_round``).
      versions: FedBuff (``system.aggregation = fedbuff``): the server is a ``BufferedServer``
        keeping this many versions; every round (a server step) takes each client's version
        and staleness weight, trains each client from its version's broadcast, scales its
        upload by its weight, and writes the new version into the ring. 0: synchronous.

    Every round takes each cohort slot's **depth** [cohort] int32 (``system.Plan.depth``): 0 for
    a client that contributes nothing (unavailable, dropped out, late: weight 0 in every unit, its
    state unchanged, not counted as trained); otherwise it trains (with ``deadline_depth``: the
    top ``min(depth, level)`` blocks). Without a system model every depth is the level.
    """

    def __init__(
        self, algorithm, backbone: PyTree, data: ClientData, *, seed: int, placement: Placement,
        strategy: str = "replicated", eval_clients: int = 8, eval_batch: int = 256,
        tiers: Tiers | None = None, compile_threads: int = 0, dp: tuple[float, float] | None = None,
        noise_key: np.ndarray | None = None, deadline_depth: bool = False, versions: int = 0,
    ) -> None:
        self.algorithm: Algorithm = algorithm
        self.placement = placement
        self._options = dict(eval_clients=eval_clients, eval_batch=eval_batch, tiers=tiers,
                             compile_threads=compile_threads, dp=dp, noise_key=noise_key,
                             deadline_depth=deadline_depth, versions=versions)
        mesh = placement.mesh if placement.mesh is not None else sharding.make_mesh()
        self.mesh = mesh
        self.strategy = strategy
        self.backbone = _put(backbone, sharding.shardings(backbone, mesh, strategy))
        self.data = None if data is None else _put(data, jax.tree_util.tree_map(lambda _: replicated(mesh), data))
        self.data_like: ClientData | None = None  # streamed: a cohort's data shapes (``data_spec``)
        self.seed = seed
        self.eval_clients = eval_clients
        self.eval_batch = eval_batch
        self.tiers = tiers
        self.dp = dp
        # sal.budget_mode=deadline: each client trains the top ``depth`` blocks of its group's
        # level (``client.local_train``), its depth an input of the round (``system.Plan.depth``)
        self.deadline_depth = deadline_depth
        self.versions = versions
        self.noise_key = None if noise_key is None or dp is None else np.asarray(noise_key, np.uint32)
        self.num_traces = 0  # how many round programs were traced (= compiled)
        self._programs: dict[tuple, Callable] = {}  # (kind, phase, ...) -> jitted function or client fn
        self.executables = Programs(compile_threads)  # (kind, phase, ...) -> compiled program
        self._lock = threading.RLock()

    def _cached(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        with self._lock:  # compile threads trace programs concurrently
            if key not in self._programs:
                self._programs[key] = make()
            return self._programs[key]

    def with_layout(self, mesh=None, strategy: str | None = None, *, algorithm=None, backbone: PyTree = None,
                    abstract: bool = False, chunk_size: int | None = -1) -> "Engine":
        """A new engine (nothing compiled) for the same run on another layout: ``mesh`` and
        ``strategy`` (None: this engine's), and optionally another ``algorithm`` or ``backbone``;
        the data, seed, evaluation sizes, tiers and DP as here. The placement keeps its backend
        and chunk size (``Vmap`` re-split over ``sharding.client_axes(strategy)``) unless
        ``chunk_size`` is given (None: the whole cohort). ``abstract``: the backbone and data
        only as shapes, for lowering on a mesh of devices that are not attached (a TPU topology)."""
        mesh = self.mesh if mesh is None else mesh
        strategy = strategy or self.strategy
        kind = "vmap" if self.placement.jitted else "sequential"
        chunk = getattr(self.placement, "chunk_size", None) if chunk_size == -1 else chunk_size
        placement = make_placement(kind, mesh, chunk, strategy)
        backbone, data = self.backbone if backbone is None else backbone, self.data
        if abstract:
            backbone, data = shapes((backbone, data))
        engine = Engine(algorithm or self.algorithm, backbone, data,
                        seed=self.seed, placement=placement, strategy=strategy, **self._options)
        engine.data_like = self.data_like
        return engine

    def place(self, tree: PyTree) -> PyTree:
        """Commits states or data to the mesh (replicated), as the round's outputs are, so the
        first round and every later one see the same input shardings (one executable per phase).
        Arrays already placed so are returned as they are. Host (numpy) arrays are taken as the
        same on every process, as the run's are by construction (device_put would check that
        with a collective on every call in a multi-process job)."""
        return put_tree(tree, replicated(self.mesh))

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
            raise ValueError(f"a group of {size} clients (a cohort, or a budget tier's clients in it) cannot be "
                             f"split over the {d} devices the clients are spread over: it must be a multiple of {d}")
        return max(fits)

    # --- training ---------------------------------------------------------------------------
    def client_fn(self, phase: Phase) -> Callable:
        """The guarded ``client_update`` of the phase's stage (one per phase, per engine)."""
        def make():
            fn = guard(client_update(self.algorithm.stage(phase), phase, self.algorithm.settings))
            return fn if self.dp is None else privatized(fn, self.dp[0])

        return self._cached(("client", phase), make)

    def _noise(self, round_index: jax.Array, noise_key: jax.Array | None) -> tuple[jax.Array, float] | None:
        """DP: (key, stddev) of the round's noise on the units' sums: noise_multiplier * clip, from
        the stream (secret, DP_NOISE, round) (``noise_key``: the traced secret key data), or
        without one (seed, DP_NOISE, round); None without DP."""
        if self.dp is None:
            return None
        clip, z = self.dp
        if noise_key is None:
            return rng.key(self.seed, rng.Stream.DP_NOISE, round_index), z * clip
        return rng.secret_key(noise_key, rng.Stream.DP_NOISE, round_index), z * clip

    def gather(self, data: ClientData, clients: ClientStates, cohort_ids: jax.Array, round_index: jax.Array,
               state_keys: tuple[str, ...] | None = None, rows: jax.Array | slice | None = None,
               depth: jax.Array | None = None) -> PyTree:
        """One round's per-client inputs [cohort, ...]: id, images, labels, count, key, split_key,
        participation (rounds each has trained in before), state (the entries ``state_keys`` of
        the client states; None: all), present (depth > 0; ``depth`` [cohort] None: all), and
        with ``deadline_depth`` the depth itself. ``rows``: the cohort's rows in ``data`` and ``clients``
        (None: its ids, as when they hold every client; a streamed cohort's arrays hold just the
        cohort, split over the client devices, and its groups are static slices of them, so
        nothing is gathered across devices)."""
        rows = cohort_ids if rows is None else rows
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
            "present": jnp.ones(cohort_ids.shape, bool) if depth is None else depth > 0,
            **({"depth": depth} if self.deadline_depth and depth is not None else {}),
        }

    def train_group(self, server, clients, round_index, ids, backbone, data, phase: Phase, *, chunk_size=None,
                    rows=None, depth=None, buffered=None):
        """One group of a round (the whole cohort, or the budget tiers of one level): the clients
        ``ids`` (at ``rows`` of ``data`` and ``clients``; None: at their ids; ``depth``: theirs,
        None: all present) trained at ``phase`` (the group's level) -> (summed uploads, totals,
        new states, metrics, example counts, present). ``buffered`` (FedBuff): (the clients' server
        trainables [m, ...], staleness weights [m]): each trains from its own version's broadcast."""
        stage = self.algorithm.stage(phase)
        cohort = self.gather(data, clients, ids, round_index, stage.state_keys, rows, depth)
        fn = self.client_fn(phase)
        if buffered is None:
            broadcast = (backbone, stage.broadcast(server, phase))
        else:
            broadcast, cohort, fn = buffered_round.own_versions(stage, server, phase, backbone, cohort, fn, *buffered)
        summed, totals, states, metrics = self.placement.map_reduce(
            fn, broadcast, cohort, chunk_size=chunk_size or self.group_chunk(ids.shape[0]), mean=False)
        return summed, totals, states, metrics, cohort["count"], cohort["present"]

    def _round(self, server, clients, round_index, cohort_ids, depth, backbone, data, *rest, phase, streamed):
        """The round body (traced once per phase): one ``train_group`` per group of the cohort
        (``groups``: the whole cohort without budget tiers), their sums aggregated once
        (``aggregate.aggregate``: added unit by unit, DP noise, divided by each unit's total) -> one
        ``server_update`` at the round's phase, the states scattered back, the metrics weighted.
        ``streamed``: ``clients`` and ``data`` hold just the cohort, in cohort order. ``rest``:
        FedBuff's (versions [cohort] int32, staleness weights [cohort]), then DP's secret key data."""
        stage = self.algorithm.stage(phase)
        ring = None
        if self.versions:  # FedBuff: server is a BufferedServer
            version, weight, *rest = rest
            ring, server = server, server.server
        noise_key = rest[0] if rest else None
        with layer_params_hook(sharding.gather_layers(self.mesh, self.strategy)):  # fsdp: gather per layer
            if self.placement.jitted:
                self.num_traces += 1
                backbone = sharding.for_compute(backbone, self.mesh, self.strategy)
            parts, local, metrics, counts, present = [], clients.local, [], [], []
            for g in self.groups(phase, cohort_ids.shape[0]):
                ids = cohort_ids[g.start:g.start + g.size]
                rows = slice(g.start, g.start + g.size) if streamed else ids
                own = None
                if ring is not None:
                    own = (ring.trainables_of(version[g.start:g.start + g.size]), weight[g.start:g.start + g.size])
                summed, totals, states, m, n, p = self.train_group(server, clients, round_index, ids, backbone, data,
                                                                   Phase(phase.stage, g.level), rows=rows,
                                                                   depth=depth[g.start:g.start + g.size], buffered=own)
                parts.append((summed, totals))
                local = _scatter(local, states, rows)
                metrics.append(m)
                counts.append(n)
                present.append(p)
            mean, totals = aggregate.aggregate(parts, self._noise(round_index, noise_key))
            server = stage.server_update(server, mean, totals, phase)
            finite = all_finite(server)  # the run stops on a diverged server (``run.Diverged``)
            if ring is not None:
                server = ring.stepped(server, round_index)
        metrics = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *metrics)
        excluded = metrics.pop(EXCLUDED)
        trained = 1 - excluded.astype(jnp.int32)
        clients = ClientStates(
            participation=clients.participation + trained if streamed else clients.participation.at[cohort_ids].add(trained),
            local=local,
        )
        out = aggregate.round_metrics(metrics, jnp.concatenate(counts), excluded, self.tiers, jnp.concatenate(present))
        return server, clients, {**out, SERVER_FINITE: finite.astype(jnp.float32)}

    def round_fn(self, phase: Phase, streamed: bool = False) -> Callable:
        """The round at ``phase``: jitted (donating the states) for ``Vmap``; for ``Sequential`` a
        Python function driving one jitted client at a time. Arguments: (server, clients, round
        index, cohort ids, depths, backbone, data[, DP secret]). Device population (``streamed=False``):
        ``clients`` and ``data`` hold every client, replicated, the cohort at its ids; every
        output replicated. Streamed: they hold just the cohort, in cohort order, split over the
        client devices (``cohort_sharding``), and so are its new states; the rest replicated."""
        body = lambda s, c, t, ids, depth, b, d, *rest: self._round(s, c, t, ids, depth, b, d, *rest, phase=phase,
                                                                    streamed=streamed)
        rep = replicated(self.mesh)
        out = (rep, self.cohort_sharding if streamed else rep, rep)
        jitted = lambda: jax.jit(body, donate_argnums=(0, 1), out_shardings=out)
        return self._cached(("round", phase, streamed), jitted if self.placement.jitted else lambda: body)

    @property
    def cohort_sharding(self) -> NamedSharding:
        """A streamed cohort's states and data: the client axis split over the devices its
        clients train on (``placement.axes``), so each device holds only its clients' rows."""
        if not self.placement.jitted:
            return replicated(self.mesh)
        return clients_sharding(self.mesh, self.placement.axes)

    def place_cohort(self, tree: PyTree) -> PyTree:
        """A streamed cohort's host (or device) arrays, split over the client devices
        (``cohort_sharding``); like ``place``, host arrays are taken as the same on every process."""
        return put_tree(tree, self.cohort_sharding)

    def lower_round(self, phase: Phase, server: PyTree, clients: PyTree, cohort_size: int, data: PyTree = None):
        """The round program at ``phase`` for a cohort of ``cohort_size``, lowered from the states'
        shapes (``programs.lower_round``)."""
        return programs.lower_round(self, phase, server, clients, cohort_size, data)

    def lowering(self, kind: str, phase: Phase, *args) -> tuple[tuple, Callable]:
        """(key, lower) of program ``kind`` (``programs.lowering``)."""
        return programs.lowering(self, kind, phase, *args)

    def compile_ahead(self, wanted: list[tuple]) -> None:
        """Starts compiling ``wanted`` programs in the background threads (``programs.compile_ahead``)."""
        programs.compile_ahead(self, wanted)

    def run_round(
        self, server: ServerState, clients: ClientStates, round_index: int, phase: Phase, cohort_ids: np.ndarray,
        data: ClientData | None = None, depth: np.ndarray | None = None,
        buffered: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[ServerState, ClientStates, dict]:
        """One round at ``phase`` (``algorithm.phase(round_index)``) over ``cohort_ids`` (with
        budget tiers: tier-major, as ``budgets.ResourceModel.cohort`` draws it).

        ``data``: None when ``clients`` and the engine's data hold every client; for a streamed
        cohort, the cohort's data [cohort, bucket, ...], with ``clients`` the cohort's states
        (in cohort order): the returned states are then the cohort's new states.
        ``depth`` [cohort]: each slot's depth (``system.Plan.depth``; 0: takes no part); None:
        every client trains at its group's level. ``buffered`` (FedBuff; ``server`` a
        ``BufferedServer``): (each client's server version [cohort], staleness weight [cohort])."""
        if depth is None:
            depth = np.full(len(cohort_ids), FULL_DEPTH, np.int32)
        if bool(self.versions) != (buffered is not None):
            raise ValueError("a FedBuff engine's rounds take (versions, weights), and only its rounds do")
        extra = () if buffered is None else (np.asarray(buffered[0], np.int32), np.asarray(buffered[1], np.float32))
        secret = () if self.noise_key is None else (self.noise_key,)  # an argument: never in a program
        streamed = data is not None
        if not self.placement.jitted:
            ids, t, depth = (jnp.asarray(x, jnp.int32) for x in (cohort_ids, round_index, depth))
            secret = tuple(jnp.asarray(x) for x in extra + secret)
            if streamed:
                clients = jax.tree_util.tree_map(jnp.asarray, clients)  # host arrays have no .at[]
            return self.round_fn(phase, streamed)(server, clients, t, ids, depth, self.backbone,
                                                  self.data if data is None else data, *secret)
        ids, t, depth = self.place((np.asarray(cohort_ids, np.int32), np.asarray(round_index, np.int32),
                                    np.asarray(depth, np.int32)))
        server, secret = self.place((server, extra + secret))  # FedBuff's inputs, then DP's key
        clients, data = (self.place_cohort((clients, data)) if streamed else (self.place(clients), self.data))
        key, lower = self.lowering("round", phase, server, clients, len(cohort_ids), data if streamed else None)
        return self.executables.get(key, lower)(server, clients, t, ids, depth, self.backbone, data, *secret)

    # --- evaluation ---------------------------------------------------------------------------
    def program(self, key: tuple, make_body: Callable[[], Callable]) -> Callable:
        """The evaluation program ``key`` (everything read at trace time is in it), made once:
        jitted for ``Vmap``, the body itself for ``Sequential``."""
        def make():
            body = make_body()
            return jax.jit(body) if self.placement.jitted else body

        return self._cached(key, make)

    def evaluate_clients(self, server: ServerState, clients: ClientStates, phase: Phase, test: ClientData) -> dict[str, np.ndarray]:
        """Every client's personalised model on its own test split (``test``: padded per-client
        test data [clients, max_t, ...]). Returns per-client arrays [clients]: ``count``,
        ``correct``, ``nll`` (summed) and the sum of every per-example extra (e.g. ``gate_local``)."""
        out = programs.call(self, "personal", phase, server, clients, test)
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
        out = programs.call(self, "global", phase, server, images, labels)
        return float(out["nll"]), float(out["correct"])


def _entries(local: PyTree, keys: tuple[str, ...] | None) -> PyTree:
    """The client-state entries ``keys`` (None: the whole state)."""
    return local if keys is None else {k: local[k] for k in keys}


def _scatter(local: PyTree, states: PyTree, rows: jax.Array | slice) -> PyTree:
    """Writes the cohort's new states (all, or some of the entries) back at ``rows`` (indices, or
    a streamed group's static slice)."""
    if isinstance(local, dict) and isinstance(states, dict) and states.keys() != local.keys():
        return {**local, **{k: _scatter(local[k], v, rows) for k, v in states.items()}}
    if isinstance(rows, slice):
        return jax.tree_util.tree_map(
            lambda all_, new: new if new.shape == all_.shape else jax.lax.dynamic_update_slice_in_dim(all_, new, rows.start, 0),
            local, states)
    return jax.tree_util.tree_map(lambda all_, new: all_.at[rows].set(new), local, states)
