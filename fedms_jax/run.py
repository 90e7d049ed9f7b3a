"""The round loop: build everything from the config, sample cohorts, run rounds, evaluate, log.

One JSON line per round goes to ``WORKDIR/metrics.jsonl``: ``round, stage, active_blocks, loss,
cohort, bytes_up, bytes_down, seconds`` every round (plus training-side extras such as FedMS's
``gate_local``), and on evaluation rounds ``personalized_accuracy`` (each client's model on its
own test split, mean weighted by test size; over a seeded sample of ``personalized_clients``
clients when the population is large, ``population.eval_sample``), ``personalized_min``,
``personalized_p10``, ``personalized_loss``, ``accuracy`` and ``test_loss`` (the global model on the whole test set;
absent for algorithms without one: ``local``, ``fedper``) and ``gate_local_weight`` (FedMS
stage 2: the gate's mean weight on the local expert over all test examples). With budget tiers
(``sal.budgets``) the cohort is drawn tier-major by ``budgets.ResourceModel``, ``bytes_*`` sum
each tier's clients at its level ``min(k, b)``, and ``loss_b<b>`` is the loss of the tier of
budget b. With DP (``dp.*``): ``epsilon`` (at ``dp.delta`` after the noisy aggregates so far;
null without noise), ``dp_rounds``, ``dp_noise_multiplier``, ``dp_update_norm`` (mean norm of
the uploads before clipping) and ``dp_clipped`` (the fraction clipped). Epsilon covers what the
server releases (the aggregates, hence the models); the metrics themselves are computed from the
clients' raw data and are not privatised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fedms_jax import compiling, distributed, perf, privacy, rng, sal
from fedms_jax.budgets import ResourceModel
from fedms_jax.algorithms import Algorithm, Settings, make_algorithm
from fedms_jax.builders import build_expert, client_optimizer, lr_scale, split_frozen
from fedms_jax.checkpoint import Checkpointer, config_fingerprint
from fedms_jax.config import Config, ConfigError, validate
from fedms_jax.data import partition
from fedms_jax.data.clients import ClientData, FlatClients, bucket_sizes, stack_clients
from fedms_jax.data.features import FrozenStem, stem_tokens
from fedms_jax.data.sources import DataError, Dataset, load_dataset, subsample
from fedms_jax.federated import accounting, population
from fedms_jax.federated.placement import make_placement, replicated
from fedms_jax.federated.rounds import Engine, sample_cohort
from fedms_jax.federated.store import ClientCheckpoints, StateStore
from fedms_jax.federated.server import server_optimizer
from fedms_jax.federated.sharding import client_axes, client_devices, make_mesh
from fedms_jax.federated.types import ClientStates, Phase, ServerState
from fedms_jax.rng import Stream

PyTree = Any


def partition_clients(config: Config, train: Dataset, test: Dataset) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train parts by the configured partitioner; test parts following each client's labels."""
    d, seed = config.data, config.seed
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
class Experiment:
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

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"

    @property
    def settings(self) -> Settings:
        return self.algorithm.settings

    def cohort(self, round_index: int) -> np.ndarray:
        """Round ``round_index``'s cohort ids: uniform (``rounds.sample_cohort``), or with budgets
        tier-major from the resource model (``budgets.ResourceModel.cohort``)."""
        c = self.config
        if self.resources is None:
            return sample_cohort(c.seed, round_index, c.data.num_clients, c.cohort_size)
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
            return self.engine.place(server), population.Streamed(
                self.engine, self.train_clients, store, checkpoints, self.sizes, self.cohort, self.config.rounds, p.prefetch)
        # One program (op by op, every small initialisation op would be a compile of its own).
        init = jax.jit(self.algorithm.init, static_argnums=1, out_shardings=replicated(self.engine.mesh))
        return init(key, self.config.data.num_clients)

    def states_like(self) -> tuple[PyTree, PyTree]:
        """The shapes of (server, clients) as ``init_states`` makes them (for a streamed
        population: the server and one cohort's states)."""
        key = rng.key(self.config.seed, Stream.INIT)
        if not self.streamed:
            return jax.eval_shape(lambda k: self.algorithm.init(k, self.config.data.num_clients), key)
        server, clients = jax.eval_shape(lambda k: self.algorithm.init(k, 1), key)
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
        for t in range(start, self.config.rounds):
            phase = self.algorithm.phase(t)
            m = self.config.cohort_size
            if self.streamed:
                data = population.cohort_data_like(self.train_clients, self.sizes, self.cohort(t))
                wanted = [(("round", phase, data.images.shape), ("round", phase, server, clients, m, data))]
            else:
                wanted = [(("round", phase), ("round", phase, server, clients, m))]
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

    def evaluated_states(self, clients: ClientStates | population.Streamed) -> ClientStates:
        """The states of the clients personalised evaluation covers (``eval_ids``, or all)."""
        if isinstance(clients, population.Streamed):
            ids = self.eval_ids if self.eval_ids is not None else np.arange(self.config.data.num_clients)
            return clients.read(ids)
        if self.eval_ids is None:
            return clients
        ids = jnp.asarray(self.eval_ids)
        return jax.tree_util.tree_map(lambda x: x[ids], clients)

    def evaluate(self, server: ServerState, clients: ClientStates | population.Streamed, phase: Phase) -> dict[str, float]:
        """Personalised (each evaluated client, own test split; ``personalized_clients`` says how
        many) and global (whole test set) metrics."""
        states = self.evaluated_states(clients)
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
                                min_examples=config.data.min_examples)
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
        mode=mode, eval_ids=evaluated, train_clients=train_clients, sizes=sizes,
    )


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
    return population.choose_mode(config.population.mode, n, data + state,
                                  population.device_memory_bytes(mesh.devices.flat[0]))


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


def personalized_metrics(per_client: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-client evaluation sums -> the weighted mean accuracy and loss, the minimum and 10th
    percentile of the clients' accuracies (clients with no test examples left out), the mean
    of every per-example extra (e.g. ``gate_local`` -> ``gate_local_weight``, with
    ``gate_local_std`` from ``gate_local_sq``), and for a mixture each expert's accuracy alone
    (``personalized_accuracy_global``/``_local``) and the per-client margin of the mixture
    over its best expert."""
    count = per_client["count"].astype(np.float64)
    has = count > 0
    acc = per_client["correct"][has] / count[has]
    out = {
        "personalized_accuracy": float(per_client["correct"].sum() / count.sum()),
        "personalized_min": float(acc.min()),
        "personalized_p10": float(np.percentile(acc, 10)),
        "personalized_loss": float(per_client["nll"].sum() / count.sum()),
    }
    for name, v in per_client.items():
        if name in ("count", "correct", "nll") or name.endswith("_sq"):
            continue
        if name.startswith("correct_"):  # one expert of a mixture alone
            out[f"personalized_accuracy_{name[len('correct_'):]}"] = float(v.sum() / count.sum())
            continue
        mean = float(v.sum() / count.sum())
        out[f"{name}_weight"] = mean
        if f"{name}_sq" in per_client:  # its spread over the test examples
            out[f"{name}_std"] = float(np.sqrt(max(per_client[f"{name}_sq"].sum() / count.sum() - mean**2, 0.0)))
    experts = [per_client[n][has] / count[has] for n in per_client if n.startswith("correct_")]
    if experts:  # per client: the mixture's accuracy minus its best expert's
        margin = acc - np.max(experts, axis=0)
        out["mixture_minus_best_expert"] = float(margin.mean())
        out["clients_mixture_at_least_best"] = float((margin >= 0).mean())
    return out


# --- the loop and its callbacks ---------------------------------------------------------------
@dataclasses.dataclass
class RoundEnd:
    """What callbacks see after round ``round`` (``done = round + 1`` rounds are finished)."""

    round: int
    phase: Phase
    record: dict
    server: ServerState
    clients: ClientStates

    @property
    def done(self) -> int:
        return self.round + 1


class Callback:
    """Hooks of ``run``'s loop; each is a no-op unless overridden. ``on_end`` always runs (in
    reverse order), also when a round or another callback raised. The states in a ``RoundEnd``
    are valid only during ``on_round``: the next round donates their buffers."""

    def on_start(self, exp: Experiment, start: int) -> None: ...

    def on_round(self, end: RoundEnd) -> None: ...

    def on_end(self) -> None: ...


class MetricsWriter(Callback):
    """Appends one JSON line per round to ``path`` (process 0 only); on a resume, first drops the
    lines of rounds at or after the resumed round (written after that checkpoint)."""

    def __init__(self, path: Path, primary: bool = True) -> None:
        self.path, self.primary, self.file = path, primary, None

    def on_start(self, exp, start):
        if self.primary:
            _keep_metrics_before(self.path, start)
            self.file = self.path.open("a")

    def on_round(self, end):
        if self.file is not None:
            self.file.write(json.dumps(end.record) + "\n")
            self.file.flush()

    def on_end(self):
        if self.file is not None:
            self.file.close()


class ProgressBar(Callback):
    """A tqdm bar over the rounds with the latest loss and accuracies."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.bar = enabled, None

    def on_start(self, exp, start):
        if self.enabled:
            rounds = exp.config.rounds
            self.bar = tqdm(total=rounds, initial=start, unit="round", dynamic_ncols=True)

    def on_round(self, end):
        if self.bar is not None:
            r = end.record
            self.bar.update(1)
            self.bar.set_postfix(
                stage=end.phase.stage, k=end.phase.num_active, loss=f"{r['loss']:.3f}",
                pacc=f"{r.get('personalized_accuracy', float('nan')):.3f}",
                acc=f"{r.get('accuracy', float('nan')):.3f}", s=f"{r['seconds']:.2f}",
            )

    def on_end(self):
        if self.bar is not None:
            self.bar.close()


class Checkpointing(Callback):
    """Saves the states every ``checkpoint.every`` rounds and after the last one."""

    def __init__(self, checkpointer: Checkpointer, meta) -> None:
        self.checkpointer, self.meta, self.rounds, self.saved = checkpointer, meta, 0, -1
        # per save: the round, the seconds the loop waited (orbax writes in the background when
        # asynchronous), and streamed, the client states written and their bytes
        self.saves: list[dict] = []
        self._streamed: population.Streamed | None = None

    def on_start(self, exp, start):
        self.rounds = exp.config.rounds

    def save(self, end: RoundEnd, *, wait: bool = False) -> None:
        """Saves after ``end`` (once: a second call for the same round only waits, if asked).
        A streamed population's clients changed since the last save are written first
        (``population.Streamed.checkpoint``), then the server state with orbax: a checkpoint
        orbax lists is complete."""
        if end.done != self.saved:
            began = time.perf_counter()
            record: dict = {"round": end.done}
            streamed = isinstance(end.clients, population.Streamed)
            # (Asynchronous orbax lists a new step, and stops listing the ones it will delete,
            # before the new one is on disk: the steps that may still be restored are these.)
            kept = self.checkpointer.steps()
            if streamed:
                written = end.clients.checkpoint(end.done)
                record.update(client_states=written["clients"], client_bytes=written["bytes"])
                state = {"server": end.server}
            else:
                state = {"server": end.server, "clients": end.clients}
            self.checkpointer.save(end.done, state, self.meta(end))
            if streamed:  # client files no checkpoint orbax may still restore needs
                end.clients.checkpoints.prune([*kept, end.done])
                self._streamed = end.clients
            self.saves.append({**record, "seconds": time.perf_counter() - began})
            self.saved = end.done
        if wait:
            self.checkpointer.wait()

    def on_round(self, end):
        if self.checkpointer.due(end.done) or end.done == self.rounds:
            self.save(end)

    def on_end(self):
        self.checkpointer.wait()
        if self._streamed is not None:  # every save is on disk: the older steps orbax dropped are gone
            self._streamed.checkpoints.prune(self.checkpointer.steps())
        self.checkpointer.close()


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; exit with ``128 + signum``."""

    def __init__(self, signum: int, rounds_done: int, directory: Path, processes: tuple[int, ...] = ()) -> None:
        self.signum, self.rounds_done, self.directory = signum, rounds_done, directory
        name = signal.Signals(signum).name
        where = f" (on process {', '.join(map(str, processes))})" if processes else ""
        super().__init__(
            f"caught {name}{where}: saved the state after round {rounds_done} to {directory}; "
            "rerun the same command to resume"
        )


class Preemption(Callback):
    """Records SIGTERM/SIGINT instead of dying; after the round in flight, saves a checkpoint
    (waiting for it) and raises ``Preempted``.

    In a job of several processes the decision is agreed after every round
    (``distributed.all_gather_ints``: one key-value exchange through the coordination service),
    so when only one process is signalled (one VM of a slice reclaimed) every process saves the
    same round, together (orbax's save is collective), and stops with the same signal number.
    """

    def __init__(self, checkpointing: Checkpointing, signums=(signal.SIGTERM, signal.SIGINT)) -> None:
        self.checkpointing, self.signums = checkpointing, signums
        self.caught: list[int] = []
        self._previous: dict = {}

    def on_start(self, exp, start):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, lambda signum, frame: self.caught.append(signum)) for s in self.signums}

    def on_round(self, end):
        signums = distributed.all_gather_ints(f"preempt/{end.round}", self.caught[0] if self.caught else 0)
        signum = next((s for s in signums if s), 0)
        if signum:
            self.checkpointing.save(end, wait=True)
            caught = tuple(p for p, s in enumerate(signums) if s) if len(signums) > 1 else ()
            raise Preempted(signum, end.done, self.checkpointing.checkpointer.directory, caught)

    def on_end(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StartupTiming(Callback):
    """Writes ``timing.json`` (process 0) at the end of a run: seconds to build, to the end of the
    first round, in all; XLA compilations and persistent-cache hits (``compiling.CompileLog``);
    and per program its lower and compile seconds, whether it was compiled ahead, and how long
    the rounds waited for it; each checkpoint save (``Checkpointing.saves``); the population's
    mode, padded sizes and evaluated clients."""

    def __init__(self, path: Path, primary: bool, began: float, built: float, log: compiling.CompileLog,
                 saves: list[dict] | None = None) -> None:
        self.path, self.primary, self.began, self.built, self.log = path, primary, began, built, log
        self.saves = saves if saves is not None else []
        self.exp: Experiment | None = None
        self.first_round: float | None = None
        self.rounds = 0

    def on_start(self, exp, start):
        self.exp = exp

    def on_round(self, end):
        if self.first_round is None:
            self.first_round = time.perf_counter() - self.began
        self.rounds += 1

    def on_end(self):
        if not self.primary or self.exp is None:
            return
        c = self.exp.config.compile
        out = {
            "build_s": self.built - self.began,
            "first_round_done_s": self.first_round,
            "total_s": time.perf_counter() - self.began,
            "rounds": self.rounds,
            **self.log.snapshot(),
            "ahead": c.ahead, "threads": self.exp.engine.executables.threads,
            "cache_dir": jax.config.jax_compilation_cache_dir,
            "programs": self.exp.engine.executables.report(),
            "checkpoints": self.saves,
            "population": {"mode": self.exp.mode, "clients": self.exp.config.data.num_clients,
                           "padded_sizes": list(self.exp.sizes),
                           "evaluated_clients": int(self.exp.client_test.counts.shape[0])},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, self.path)


def _keep_metrics_before(path: Path, start: int) -> None:
    """Drops the metric lines of rounds >= start (written after the checkpoint we resume from),
    by writing a new file and renaming it over the old one."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["round"] < start]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    os.replace(tmp, path)


def _population_summary(exp: Experiment) -> str:
    """One line about a large population (``partition.summary`` prints a line per client)."""
    sizes = np.array([len(p) for p in exp.parts])
    line = (f"{len(sizes)} clients, {sizes.sum()} examples; per client min {sizes.min()}, median "
            f"{int(np.median(sizes))}, max {sizes.max()}; population mode {exp.mode}")
    if exp.streamed:
        line += f" (padded sizes {list(exp.sizes)})"
    if exp.eval_ids is not None:
        line += f"; personalised evaluation over {len(exp.eval_ids)} sampled clients"
    return line


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, eq=False)
class RunResult:
    """metrics: the last metrics line; server/clients: the final states; experiment: ``build``'s."""

    metrics: dict
    server: ServerState
    clients: ClientStates
    experiment: Experiment


def train_loop(exp: Experiment, server: ServerState, clients: ClientStates, start: int, callbacks: list[Callback],
               ledger: dict | None = None):
    """Rounds ``start .. config.rounds - 1``: sample, run, evaluate when due, hand each round's
    record to the callbacks. ``ledger``: the DP accountant's ledger of the checkpoint resumed
    from (checked against the rounds before ``start``). -> (last record, server, clients)."""
    config, engine, algorithm = exp.config, exp.engine, exp.algorithm
    # A round's bytes depend only on the phase (the trees' shapes; with budgets each tier's
    # level): computed once per phase.
    like = exp.states_like()[1] if exp.streamed else clients
    bytes_per_phase = {p: accounting.round_bytes(engine, server, like, p, config.cohort_size)
                       for p in algorithm.phases(config.rounds)}
    # DP: each round that uploads something releases one noisy aggregate (what the accountant composes).
    releases = lambda t: sum(bytes_per_phase[algorithm.phase(r)][1] > 0 for r in range(t))
    if ledger is not None:
        now = {**exp.accountant.as_dict(), "rounds": releases(start)} if exp.accountant is not None else {}
        changed = sorted(k for k in set(ledger) | set(now) if ledger.get(k) != now.get(k))
        if changed:  # e.g. another dp-accounting calibrated another noise multiplier
            k = changed[0]
            raise ConfigError(f"the checkpoint's DP ledger has {k} = {ledger.get(k)!r}, this run {now.get(k)!r}: "
                              "refusing to resume with another mechanism or a wrong epsilon")
    record: dict = {}
    with contextlib.ExitStack() as stack:  # every on_end runs, in reverse, even if one raises
        for cb in callbacks:
            stack.callback(cb.on_end)
            cb.on_start(exp, start)
        for t in range(start, config.rounds):
            phase = algorithm.phase(t)
            cohort = exp.cohort(t)
            start_time = time.perf_counter()
            if exp.streamed:
                server, metrics = clients.run_round(server, t, phase, cohort)
            else:
                server, clients, metrics = engine.run_round(server, clients, t, phase, cohort)
            metrics = {name: float(v) for name, v in metrics.items()}  # host sync ends the timing
            if exp.streamed:
                clients.finish_round()  # the cohort's new states to the host; their write is queued
            seconds = time.perf_counter() - start_time
            down, up = bytes_per_phase[phase]
            record = {
                "round": t, "stage": phase.stage, "active_blocks": phase.num_active, "loss": metrics.pop("loss"),
                "cohort": len(cohort), "bytes_up": up, "bytes_down": down,
                "seconds": seconds, **metrics,
            }
            if exp.accountant is not None:
                record["dp_noise_multiplier"] = exp.accountant.noise_multiplier
                record["dp_rounds"] = releases(t + 1)
                eps = exp.accountant.epsilon(releases(t + 1))
                record["epsilon"] = eps if np.isfinite(eps) else None  # None: no noise, no guarantee
            if exp.evaluates(t):
                record.update(exp.evaluate(server, clients, phase))
            end = RoundEnd(t, phase, record, server, clients)
            for cb in callbacks:
                cb.on_round(end)
    return record, server, clients


def run(config: Config, workdir: str | Path, *, progress: bool = True, mesh=None,
        callbacks: list[Callback] = ()) -> RunResult:
    """Runs ``config.rounds`` rounds, resuming from the newest checkpoint in ``workdir``.

    The loop's side effects are callbacks: metrics lines, a progress bar, periodic checkpoints
    and preemption (on SIGTERM/SIGINT the round in flight finishes, a checkpoint is written and
    ``Preempted`` is raised; the CLI exits with 128 + signal number); ``callbacks`` run after
    the metrics writer, the progress bar and checkpointing, before the preemption check.
    """
    config = validate(config)
    workdir = Path(workdir)
    began = time.perf_counter()
    compiling.configure_cache(config.compile.cache, config.compile.cache_dir)
    compile_log = compiling.CompileLog().__enter__()
    try:
        return _run(config, workdir, progress=progress, mesh=mesh, callbacks=callbacks, began=began,
                    compile_log=compile_log)
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        lost = distributed.lost_peer_error(e)
        if lost is None:
            raise
        raise lost from e
    finally:
        compile_log.__exit__()


def _run(config: Config, workdir: Path, *, progress: bool, mesh, callbacks, began: float,
         compile_log: compiling.CompileLog) -> RunResult:
    exp = build(config, mesh=mesh, log=_log_stderr if jax.process_index() == 0 else None)
    try:
        return _run_built(exp, workdir, progress=progress, callbacks=callbacks, began=began, compile_log=compile_log)
    finally:
        exp.engine.executables.close()  # compiles not yet started are not needed any more


def _run_built(exp: Experiment, workdir: Path, *, progress: bool, callbacks, began: float,
               compile_log: compiling.CompileLog) -> RunResult:
    config = exp.config
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir / "checkpoints", every=ck.every, keep=ck.keep, asynchronous=ck.asynchronous)
    if config.compile.ahead:
        # Every program the rounds will need, in the order they need them, from the states'
        # shapes alone: the compile threads start while the states are initialised and restored.
        resume_at = min(max(checkpointer.steps(), default=0), config.rounds)
        exp.engine.compile_ahead(exp.programs(*exp.states_like(), resume_at))
    server, clients = exp.init_states(workdir)
    built = time.perf_counter()
    primary = jax.process_index() == 0
    start, ledger = 0, None
    like = {"server": server} if exp.streamed else {"server": server, "clients": clients}
    restored = checkpointer.restore_latest(like, config, population=exp.mode)
    if restored is not None:
        start, state, saved_meta = restored
        ledger = saved_meta.get("dp")
        if exp.streamed:  # the clients: the checkpoint's manifest and the deltas it names
            clients.checkpoints.restore(start, clients.store)
            server = exp.engine.place(state["server"])
        else:
            server, clients = exp.engine.place((state["server"], state["clients"]))
    if progress and primary:
        print(partition.summary(exp.train.labels, exp.parts, exp.train.num_classes) if len(exp.parts) <= 100
              else _population_summary(exp))
        if restored is not None:
            print(f"resuming {workdir} after round {start} of {config.rounds}")
    meta = lambda end: {
        "config": config_fingerprint(config),
        "next_phase": list(dataclasses.astuple(exp.algorithm.phase(min(end.done, config.rounds - 1)))),
        "rng": {"seed": config.seed, "recipe": rng.RECIPE},
        "population": exp.mode,
        # DP: the accountant's ledger (its parameters and the noisy aggregates released so far)
        **({"dp": {**exp.accountant.as_dict(), "rounds": end.record["dp_rounds"]}} if exp.accountant is not None else {}),
    }
    checkpointing = Checkpointing(checkpointer, meta)
    # Preemption goes last: every other callback sees the round before it saves and stops the run.
    timing = StartupTiming(workdir / "timing.json", primary, began, built, compile_log, checkpointing.saves)
    loop_callbacks = [MetricsWriter(workdir / "metrics.jsonl", primary), ProgressBar(progress and primary),
                      checkpointing, timing, *callbacks, Preemption(checkpointing)]
    try:
        record, server, clients = train_loop(exp, server, clients, start, loop_callbacks, ledger=ledger)
    finally:
        if exp.streamed:
            clients.stop()  # every write done; the store stays readable
    if not record and start:  # nothing left to run: report the last line written
        lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
        record = json.loads(lines[-1]) if lines else {}
    return RunResult(record, server, clients, exp)
