"""From a validated config to everything a run needs, built once: the ``Experiment``.

``build(config)`` loads and partitions the data, builds the expert, the algorithm, the mesh,
the engine and (with ``dp.*``) the accountant, and resolves ``population.mode``; nothing is
compiled. ``Experiment`` answers what the loop asks: the cohort of a round, the initial states,
their shapes, the programs the rounds will need (to compile them ahead), and the evaluation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax import compiling, perf, privacy, rng, sal, storage
from fedms_jax.algorithms import make_algorithm
from fedms_jax.budgets import ResourceModel
from fedms_jax.builders import build_expert, client_optimizer, lr_scale, split_frozen
from fedms_jax.config import Config, ConfigError, validate
from fedms_jax.data import partition
from fedms_jax.data.clients import ClientData, FlatClients, bucket_sizes, stack_clients
from fedms_jax.data.dataset import DataError, Dataset
from fedms_jax.data.features import FrozenStem, stem_tokens
from fedms_jax.data.sources import load_dataset, subsample
from fedms_jax.federated import population
from fedms_jax.federated.evaluation import personalized_metrics
from fedms_jax.federated.placement import make_placement, replicated
from fedms_jax.federated.protocol import Algorithm, Settings
from fedms_jax.federated.rounds import Engine, sample_cohort
from fedms_jax.federated.server import server_optimizer
from fedms_jax.federated.sharding import client_axes, client_devices, make_mesh
from fedms_jax.federated.store import ClientCheckpoints, StateStore
from fedms_jax.federated.types import ClientStates, Phase, ServerState, server_of
from fedms_jax.rng import Stream
from fedms_jax.simulated import SimulatedTime, make_system
from fedms_jax.system import SystemModel

PyTree = Any


def partition_clients(config: Config, train: Dataset, test: Dataset) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train parts by the configured partitioner; test parts following each client's labels."""
    d, seed = config.data, config.seed
    try:  # two index arrays per client (about 200 bytes each with numpy's overhead), before any is made
        storage.check_fits(400 * d.num_clients, f"config.data.num_clients = {d.num_clients} (the clients' index arrays)",
                           "use fewer clients")
    except storage.MemoryLimitError as e:
        raise ConfigError(str(e)) from None
    if d.partition == "dirichlet":
        parts = partition.dirichlet(train.labels, d.num_clients, d.alpha, rng.numpy_seed(seed, Stream.PARTITION), d.min_examples)
    elif d.partition == "shards":
        parts = partition.shards(train.labels, d.num_clients, d.shards_per_client, rng.numpy_seed(seed, Stream.PARTITION))
    else:
        parts = partition.iid(len(train), d.num_clients, rng.numpy_seed(seed, Stream.PARTITION))
    return parts, partition.split_test_like(train.labels, parts, test.labels, rng.numpy_seed(seed, Stream.TEST_SPLIT))


def make_run_mesh(config: Config):
    """The ('clients', 'model') mesh of ``config.mesh`` over every device (of every process)."""
    m = config.mesh
    try:
        mesh = make_mesh(m.clients, m.model)
    except ValueError as e:
        raise ConfigError(f"config.mesh = {m.clients} x {m.model}: {e}") from None
    # The clients are split over sharding.client_axes(strategy): 'clients', or the whole mesh (fsdp).
    axes, span = client_axes(m.strategy), client_devices(mesh, m.strategy)
    per_chunk = config.placement.chunk_size or config.cohort_size
    if per_chunk % span:
        raise ConfigError(
            f"config.cohort_size = {config.cohort_size} (chunk {per_chunk}) must be a multiple of the "
            f"{span} devices on the mesh axes {axes} the clients are split over (mesh {dict(mesh.shape)}, "
            f"strategy {m.strategy!r})"
        )
    resources = ResourceModel.from_config(config)
    if resources is not None and config.placement.backend == "vmap":  # each tier group is sharded
        counts = resources.tiers.counts
        if any(n % span for n in counts):
            raise ConfigError(
                f"config.sal.budget_shares = {resources.shares}: the tiers get {counts} clients per round; "
                f"each must be a multiple of the {span} devices on the mesh axes {axes} the clients are split over"
            )
    return mesh


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment(SimulatedTime):
    """Everything a run needs, built once from a validated config (no compilation happens).

    train/test: the (subsampled) datasets (uint8 images); parts/test_parts: each client's
    example indices; algorithm, engine: what runs; client_test: every client's padded test
    split; test_images/labels: the whole test set, as the model takes it. With
    ``model.frozen_blocks = F > 0`` the model's inputs are the frozen stem's float32 tokens
    [N, T, D] (in ``engine.data``, ``client_test`` and ``test_images``; ``stem`` computes them
    from uint8 images) and the engine's backbone is the top L - F blocks;
    backbone_params: the parameters of the whole backbone (all L blocks: what "trainable % of
    the backbone" divides by). It holds no training state: rounds donate their input states,
    so ``init_states()`` makes fresh ones for each use.

    ``mode``: ``population.mode`` resolved (``federated.population``). ``streamed``: the engine
    holds no data; ``train_clients`` is every client's training data on the host, ``sizes``
    its bucket sizes, ``test_images``/``test_labels`` host arrays (evaluated in chunks of
    ``GLOBAL_CHUNK``), and ``init_states`` returns a ``population.Streamed`` in place of the
    stacked client states. ``eval_ids``: the clients of personalised evaluation (None: all);
    ``client_test`` holds their test splits, in that order.
    """

    config: Config
    train: Dataset
    test: Dataset
    parts: list[np.ndarray]
    test_parts: list[np.ndarray]
    algorithm: Algorithm
    engine: Engine
    client_test: ClientData
    test_images: jax.Array
    test_labels: jax.Array
    backbone_params: int = 0
    stem: FrozenStem | None = None
    resources: ResourceModel | None = None  # budget tiers (``sal.budgets``); None: no budgets
    accountant: privacy.Accountant | None = None  # DP-FedAvg's (``dp.*``); None: no DP
    mode: str = "device"
    eval_ids: np.ndarray | None = None
    train_clients: FlatClients | None = None
    sizes: tuple[int, ...] = ()
    # DP without dp.reproducible_noise: the cohorts' seed, a secret drawn from the OS (the noise's
    # key is the engine's ``noise_key``); in memory only, never printed. None: config.seed.
    cohort_seed: int | None = dataclasses.field(default=None, repr=False)
    system: SystemModel | None = None  # clients as devices in simulated time (``system.*``)
    _memo: dict = dataclasses.field(default_factory=dict, repr=False)  # the timeline, the costs per stage

    @property
    def secret_noise(self) -> bool:
        """Whether the DP noise and cohorts come from a secret (not from ``config.seed``)."""
        return self.engine.noise_key is not None

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"

    @property
    def settings(self) -> Settings:
        return self.algorithm.settings

    def cohort(self, round_index: int) -> np.ndarray:
        """Round ``round_index``'s cohort ids: uniform (``rounds.sample_cohort``), or with budgets
        tier-major from the resource model (``budgets.ResourceModel.cohort``); with a system
        model, the plan's (``system.Timeline``: among the clients available at its start)."""
        c = self.config
        if self.system is not None:
            return self.timeline.plan(round_index).ids
        if self.resources is None:
            seed = c.seed if self.cohort_seed is None else self.cohort_seed
            return sample_cohort(seed, round_index, c.data.num_clients, c.cohort_size)
        return self.resources.cohort(round_index)

    def init_states(self, workdir: str | Path | None = None) -> tuple[ServerState, ClientStates | population.Streamed]:
        """The initial (server, client) states from the run's init key, placed on the mesh.
        Streamed: the clients are a ``population.Streamed`` whose store (every client at its
        initial state, nothing written) is ``workdir/client_store`` and its incremental
        checkpoints ``workdir/client_checkpoints`` (default: a new temporary directory)."""
        key = rng.key(self.config.seed, Stream.INIT)
        if self.streamed:
            server, template = population.template_states(self.algorithm.init, key)
            if workdir is None:
                import tempfile

                workdir = tempfile.mkdtemp(prefix="fedms_population_")
            store = StateStore(Path(workdir) / "client_store", template, self.config.data.num_clients)
            checkpoints = ClientCheckpoints(Path(workdir) / "client_checkpoints")
            p = self.config.population
            return self.engine.place(self._buffered(server)), population.Streamed(
                self.engine, self.train_clients, store, checkpoints, self.sizes, self.cohort, self.config.rounds, p.prefetch)
        # One program (op by op, every small initialisation op would be a compile of its own).
        init = jax.jit(lambda k, n: (lambda s, c: (self._buffered(s), c))(*self.algorithm.init(k, n)),
                       static_argnums=1, out_shardings=replicated(self.engine.mesh))
        return init(key, self.config.data.num_clients)

    def states_like(self) -> tuple[PyTree, PyTree]:
        """The shapes of (server, clients) as ``init_states`` makes them (for a streamed
        population: the server and one cohort's states)."""
        key = rng.key(self.config.seed, Stream.INIT)
        if not self.streamed:
            return jax.eval_shape(lambda k: (lambda s, c: (self._buffered(s), c))(
                *self.algorithm.init(k, self.config.data.num_clients)), key)
        server, clients = jax.eval_shape(lambda k: (lambda s, c: (self._buffered(s), c))(*self.algorithm.init(k, 1)), key)
        m = self.config.cohort_size
        return server, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((m,) + x.shape[1:], x.dtype), clients)

    def evaluates(self, round_index: int) -> bool:
        """Whether the run evaluates after round ``round_index``: every ``eval_every`` rounds and
        after the last one."""
        c = self.config
        return (round_index + 1) % c.eval_every == 0 or round_index + 1 == c.rounds

    def programs(self, server: ServerState, clients: ClientStates, start: int = 0) -> list[tuple]:
        """Every program rounds ``start ..`` will run, in the order they first need them, as
        ``Engine.compile_ahead`` takes them: the round program of each phase (streamed: of each
        phase and bucket its cohorts take), then (when the run evaluates in that phase) its
        personalised and global evaluation programs. ``server``, ``clients``: the states'
        shapes (``states_like``)."""
        out, seen = [], set()
        evaluated = self._evaluated_like(clients)
        round_server, server = server, server_of(server)  # evaluations take the ServerState
        for t in range(start, self.config.rounds):
            phase = self.algorithm.phase(t)
            m = self.config.cohort_size
            if self.streamed:
                data = population.cohort_data_like(self.train_clients, self.sizes, self.cohort(t))
                wanted = [(("round", phase, data.images.shape), ("round", phase, round_server, clients, m, data))]
            else:
                wanted = [(("round", phase), ("round", phase, round_server, clients, m))]
            if self.evaluates(t):
                wanted.append((("personal", phase), ("personal", phase, server, evaluated, self.client_test)))
                if self.algorithm.has_global_model:
                    for images, labels in self._test_chunks():
                        wanted.append((("global", phase, images.shape),
                                       ("global", phase, server, _like(images), _like(labels))))
            for key, program in wanted:
                if key not in seen:
                    seen.add(key)
                    out.append(program)
        return out

    def _evaluated_like(self, clients: PyTree) -> PyTree:
        """The shapes of the evaluated clients' states, given the run's client-state shapes."""
        if self.eval_ids is None and not self.streamed:
            return clients
        n = len(self.eval_ids) if self.eval_ids is not None else self.config.data.num_clients
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype), clients)

    def _test_chunks(self):
        """The global test set in the pieces it is evaluated in: whole on the devices; streamed,
        host chunks of ``GLOBAL_CHUNK`` examples (the last one shorter)."""
        if not self.streamed:
            yield self.test_images, self.test_labels
            return
        n = len(self.test_labels)
        for i in range(0, n, GLOBAL_CHUNK):
            yield self.test_images[i:i + GLOBAL_CHUNK], self.test_labels[i:i + GLOBAL_CHUNK]

    def population(self, clients: ClientStates | population.Streamed):
        """The clients as a population (``federated.population``): stacked ``ClientStates`` become
        a ``population.Device``; a population is returned as it is."""
        return population.Device(self.engine, clients) if isinstance(clients, ClientStates) else clients

    def evaluated_states(self, clients: ClientStates | population.Streamed) -> ClientStates:
        """The states of the clients personalised evaluation covers (``eval_ids``, or all)."""
        return self.population(clients).read(self.eval_ids)

    def evaluate(self, server: ServerState, clients: ClientStates | population.Streamed, phase: Phase) -> dict[str, float]:
        """Personalised (each evaluated client, own test split; ``personalized_clients`` says how
        many) and global (whole test set) metrics."""
        states = self.evaluated_states(clients)
        server = server_of(server)
        out = personalized_metrics(self.engine.evaluate_clients(server, states, phase, self.client_test))
        out["personalized_clients"] = int(self.client_test.counts.shape[0])
        if self.algorithm.has_global_model:
            sums = [self.engine.global_sums(server, phase, x, y) for x, y in self._test_chunks()]
            n = len(self.test_labels)
            out.update(test_loss=sum(s[0] for s in sums) / n, accuracy=sum(s[1] for s in sums) / n)
        return out


GLOBAL_CHUNK = 16384  # streamed: test examples per piece of the global evaluation


def _like(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def build(config: Config, *, mesh=None, datasets: tuple[Dataset, Dataset] | None = None,
          log: Callable[[str], None] | None = None) -> Experiment:
    """The ``Experiment`` of a config (validated here if it is not yet).

    ``datasets``: (train, test) to use instead of loading ``config.data.name`` (benchmarks pass
    synthetic data at the model's resolution). ``log``: gets a line per featurized set when
    ``model.frozen_blocks > 0`` (computed, or read from ``data.feature_cache``).
    """
    config = validate(config)
    if datasets is None:
        datasets = load_dataset(config.data.name, config.data.data_dir or None, seed=rng.numpy_seed(config.seed, Stream.DATA),
                                image_size=config.data.image_size, num_clients=config.data.num_clients,
                                min_examples=config.data.min_examples, max_bytes=config.data.max_bytes)
    train, test = datasets
    train = subsample(train, config.data.train_examples, seed=rng.numpy_seed(config.seed, Stream.SUBSAMPLE, 0))
    test = subsample(test, config.data.test_examples, seed=rng.numpy_seed(config.seed, Stream.SUBSAMPLE, 1))
    parts, test_parts = partition_clients(config, train, test)
    validation = None  # data.validation: the clients' validation splits stand in for the test split
    if config.data.validation > 0:
        parts, val_parts = partition.validation_split(parts, config.data.validation,
                                                      rng.numpy_seed(config.seed, Stream.VALIDATION))
        validation = np.concatenate(val_parts).astype(np.int64)
        test = Dataset(train.images[validation], train.labels[validation], train.class_names)
        ends = np.cumsum([len(v) for v in val_parts])
        test_parts = [np.arange(e - len(v), e) for v, e in zip(val_parts, ends)]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"client(s) {empty[:10]} have no training examples under data.partition="
            f"{config.data.partition!r} with data.num_clients={config.data.num_clients} "
            f"({len(train)} examples): use fewer clients or another partition"
        )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"train images are {train.images.shape[1:]} but test images {test.images.shape[1:]}")
    built = build_expert(config, train.class_names, rng.key(config.seed, Stream.BACKBONE))
    depth, frozen = built.expert.num_layers, config.model.frozen_blocks
    if frozen >= depth:  # a pretrained backbone's depth is known only now
        raise ConfigError(f"config.model.frozen_blocks = {frozen}: must be < the {depth} blocks of "
                          f"model.pretrained={config.model.pretrained!r} (at least one block must be trainable)")
    backbone_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(built.backbone))
    stem = None
    if frozen:  # the federated model is the top L - F blocks; blocks [0, F) run once per image
        built, stem = split_frozen(built, frozen)
    expert = built.expert
    tuned = expert.tune_head
    if config.sal.k0 > expert.num_layers:
        of = f"the {depth} blocks" if not frozen else f"the {depth} - {frozen} = {expert.num_layers} blocks above model.frozen_blocks"
        raise ConfigError(f"config.sal.k0 = {config.sal.k0}: must be <= {of} of model.pretrained={config.model.pretrained!r}")
    resources = ResourceModel.from_config(config)
    if resources is not None and max(resources.budgets) > expert.num_layers:
        raise ConfigError(f"config.sal.budgets = {resources.budgets}: each must be <= the {expert.num_layers} "
                          f"trainable blocks of model.pretrained={config.model.pretrained!r}")
    settings = Settings(
        expert=expert,
        stats=built.stats,
        schedule=sal.SALSchedule(expert.num_layers, config.sal.mode, config.sal.k0, config.sal.step, config.sal.every),
        client_optimizer=client_optimizer(config),
        server_optimizer=server_optimizer(config.server.optimizer, config.server.lr),
        local_steps=config.client.local_steps,
        batch_size=config.client.batch_size,
        init_head=built.head if tuned else None,
        frozen_head=None if tuned else built.head,
        cache_frozen=config.client.cache_frozen,
        epochs=config.client.epochs,
        lr_scale=lr_scale(config),
    )
    algorithm = make_algorithm(config, settings)
    accountant = make_accountant(config, resources, log)
    secret = None  # DP: the noise and the cohorts from a secret nobody holding the config can replay
    if accountant is not None and not config.dp.reproducible_noise:
        secret = shared_secret()
        if resources is not None:
            resources = dataclasses.replace(resources, cohort_seed=secret)
    if mesh is None:
        mesh = make_run_mesh(config)
    spec = expert.spec
    tokens = (spec.image_size // spec.patch_size) ** 2 + 1
    enc = spec.encoder
    chunk = config.placement.chunk_size or perf.auto_chunk_size(
        config.cohort_size, client_devices(mesh, config.mesh.strategy),
        perf.activation_bytes(config.client.batch_size, tokens, enc.hidden_size, enc.mlp_dim, enc.num_heads,
                              jnp.dtype(config.model.dtype).itemsize),
        mesh.devices.flat[0].platform,
    )
    train_inputs, test_inputs = train.images, test.images
    if stem is not None:
        cache = config.data.feature_cache or None
        train_inputs = stem_tokens(stem, train.images, cache, name="train images", log=log)
        test_inputs = (train_inputs[validation] if validation is not None
                       else stem_tokens(stem, test.images, cache, name="test images", log=log))
    if jax.process_count() > 1:  # the streamed mode runs in one process for now
        if config.population.mode == "streamed":
            raise ConfigError(f"config.population.mode = 'streamed' runs in one process for now (this job has "
                              f"{jax.process_count()}): use population.mode=device (or auto)")
        mode = "device"
    else:
        mode = population_mode(config, algorithm, parts, test_parts, train_inputs, mesh)
    streamed = mode == "streamed"
    engine = Engine(
        algorithm, built.backbone, None if streamed else stack_clients(train, parts, train_inputs), seed=config.seed,
        placement=make_placement(config.placement.backend, mesh, chunk, config.mesh.strategy), strategy=config.mesh.strategy, eval_clients=config.eval_clients, eval_batch=config.eval_batch,
        tiers=resources.tiers if resources is not None else None,
        compile_threads=(config.compile.threads or compiling.default_threads()) if config.compile.ahead else 0,
        dp=(config.dp.clip, accountant.noise_multiplier) if accountant is not None else None,
        noise_key=None if secret is None else rng.secret_key_data(secret),
        deadline_depth=config.sal.budget_mode == "deadline",
        versions=config.system.max_staleness if config.system.buffered else 0,
    )
    evaluated = population.eval_ids(config.seed, config.data.num_clients, config.population.eval_sample)
    tested = test_parts if evaluated is None else [test_parts[i] for i in evaluated]
    client_test = engine.place(stack_clients(test, tested, test_inputs))
    train_clients, sizes = None, ()
    if streamed:  # the data stay on the host: the rounds move their cohort's, the evaluation its chunks
        train_clients = FlatClients.from_parts(train, parts, train_inputs)
        # With epochs the round's steps follow the padded size, and so does an lr schedule's
        # horizon: one size then (the device mode's), so what trains does not depend on the cohort.
        one_size = config.client.epochs > 0 and config.client.schedule != "constant"
        sizes = bucket_sizes(train_clients.counts, 1 if one_size else config.population.buckets)
        # What accounting and plans trace a round with: a cohort at the largest padded size.
        engine.data_like = population.cohort_data_like(
            train_clients, sizes, np.full(config.cohort_size, int(train_clients.counts.argmax())))
        test_images, test_labels = np.asarray(test_inputs), np.asarray(test.labels, np.int32)
    else:
        test_images, test_labels = engine.place((np.asarray(test_inputs), np.asarray(test.labels)))
    return Experiment(
        config=config, train=train, test=test, parts=parts, test_parts=test_parts, algorithm=algorithm,
        engine=engine, client_test=client_test, test_images=test_images, test_labels=test_labels,
        backbone_params=backbone_params, stem=stem, resources=resources, accountant=accountant,
        mode=mode, eval_ids=evaluated, train_clients=train_clients, sizes=sizes, cohort_seed=secret,
        system=make_system(config, secret),
    )


def shared_secret() -> int:
    """A 63-bit secret from the OS (``secrets``), the same on every process of the job: process
    0's, passed through the coordination service's key-value store (memory, never a file)."""
    import secrets

    from fedms_jax import distributed

    mine = secrets.randbits(63) if jax.process_index() == 0 else 0
    return distributed.all_gather_ints("dp/secret", mine)[0]


def population_mode(config: Config, algorithm: Algorithm, parts: list[np.ndarray], test_parts: list[np.ndarray],
                    inputs: np.ndarray, mesh) -> str:
    """``population.mode`` resolved (``federated.population.choose_mode``), from the bytes the
    device mode would hold: every client's training and test data padded to the largest
    client's, and every client's persistent state."""
    n = config.data.num_clients
    row = int(np.prod(inputs.shape[1:])) * inputs.dtype.itemsize + 4  # an example and its label
    data = n * (max(map(len, parts)) + max(map(len, test_parts), default=0)) * row
    _, one = jax.eval_shape(lambda k: algorithm.init(k, 1), rng.key(config.seed, Stream.INIT))
    state = n * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(one))
    memory = population.device_memory_bytes(mesh.devices.flat[0])
    mode = population.choose_mode(config.population.mode, n, data + state, memory)
    if mode == "device" and data + state > memory:
        raise ConfigError(f"config.population.mode = {config.population.mode!r}: {n} clients' padded data and states "
                          f"need {storage.human(data + state)} on each device, which has {storage.human(memory)}: "
                          "use population.mode=streamed (or auto)")
    return mode


def make_accountant(config: Config, resources: ResourceModel | None, log: Callable[[str], None] | None = None):
    """DP-FedAvg's accountant (``privacy.Accountant``) for ``config.dp``, or None without DP.

    The cohort is a fixed-size uniform sample without replacement: of all clients, or with
    static budget tiers of each tier's clients (a client is in one tier). With
    ``dp.target_epsilon`` the noise multiplier is calibrated here for ``config.rounds`` rounds."""
    dp = config.dp
    if not dp.enabled:
        return None
    if resources is not None and resources.mode == "static":
        groups = list(zip(resources.population, resources.tiers.counts))
    else:
        groups = [(config.data.num_clients, config.cohort_size)]
    z = dp.noise_multiplier
    if dp.target_epsilon > 0:
        try:
            z = privacy.calibrate_noise_multiplier(dp.target_epsilon, dp.delta, config.rounds, groups, dp.accountant)
        except ValueError as e:
            raise ConfigError(f"config.dp.target_epsilon = {dp.target_epsilon}: {e}") from None
        if log is not None:
            log(f"dp: noise multiplier {z:.4f} gives epsilon <= {dp.target_epsilon} at delta {dp.delta} "
                f"after {config.rounds} rounds ({dp.accountant})")
    return privacy.Accountant(z, groups, dp.delta, dp.accountant)
