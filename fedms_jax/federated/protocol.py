"""The protocol between the engine and the algorithms: ``Settings``, the ``Stage`` and
``Algorithm`` records and their composition (``single``, ``staged``), and what a loss reads
(``Features``, ``Batch``). The engine (``federated.rounds``, ``federated.client``) and every
algorithm import this module; it imports neither.

An algorithm is data, in the style of optax's ``GradientTransformation`` and FedJAX's
``FederatedAlgorithm``: a factory (``fedavg(settings)``, ``fedms(settings, ...)``) closes over
typed settings and returns a record of pure functions. Per round the engine runs, in one jitted
program, with ``stage = algorithm.stage(phase)``::

    down = stage.broadcast(server, phase)                 # what the server sends
    per client (placement backend):
      params, ctx = stage.client_init(down, state, phase) # what it trains / holds fixed
      feats       = stage.featurize(backbone, ctx, x, phase)      # frozen part -> Features
      params'     = local steps of stage.loss(params, ctx, backbone, batch, rng, phase)
                    (batch: a client.Batch of featurized examples, labels and mask)
      upload, state' = stage.client_final(down, state, params, params', phase)
    server' = stage.server_update(server, per-unit weighted mean of uploads, totals, phase)

Evaluation reuses the same pieces: a client's personalised model is
``stage.predict(params, ctx, backbone, featurize(...), phase)`` on its ``client_init``; the global
model, where there is one, is ``stage.global_predict(backbone, down, branch, phase)`` (``None``
for methods without a global model).

A two-stage method is ``staged(stage1, stage2)``: the phase's stage number picks the record, no
method dispatches on it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import optax

from fedms_jax import sal
from fedms_jax.data.preprocess import preprocess
from fedms_jax.federated.types import ClientStates, Phase, ServerState
from fedms_jax.models.expert import Expert
from fedms_jax.models.vision import Branch

PyTree = Any


@flax.struct.dataclass
class Features:
    """What a loss (and a prediction) reads for a batch of examples, leading axis = example.

    branch: the SAL branch point (hidden [B, T, D] entering the lowest active block, cls [B, D]).
    frozen: outputs of frozen parts an algorithm asked for (e.g. FedMS's frozen global expert:
      ``{'z_global': [B, C]}``); ``{}`` when there are none.

    ``featurize`` makes it from images; whether the client computes it once per round over all
    its examples and gathers batches from it, or on every step's batch, is the client trainer's
    decision and invisible to algorithms.
    """

    branch: Branch
    frozen: PyTree = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class Batch:
    """A batch a loss reads: ``features`` (leading axis B), ``labels`` [B] int, ``mask`` [B]
    float32 (1 for a real example, 0 for padding), and ``held`` the held-out batch when the
    stage asks for one (``stage.holdout > 0``), else None."""

    features: Features
    labels: jax.Array
    mask: jax.Array
    held: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class Settings:
    """The settings every algorithm takes.

    expert: the model; stats: (mean, std) for preprocessing; schedule: SAL schedule;
    client_optimizer: local optimizer at its peak learning rate (fresh state every round, except
    a stage's ``persistent`` entries); server_optimizer: applied per unit to the pseudo-gradient
    ``-mean delta``; local_steps, batch_size, epochs: local work per round (``epochs > 0``: E
    passes without replacement; else ``local_steps`` batches); lr_scale(step, steps): the
    learning-rate schedule's factor at a segment's step (None: constant);
    init_head: initial head params (CLIP zero-shot embeddings) or None for a fresh head;
    frozen_head: the head when it is not trained (CLIP zero-shot, ``tune_head=False``);
    cache_frozen: featurize once per round when that is less work than every step.
    """

    expert: Expert
    stats: tuple[tuple[float, ...], tuple[float, ...]]
    schedule: sal.SALSchedule
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    local_steps: int
    batch_size: int
    init_head: PyTree | None = None
    frozen_head: PyTree | None = None
    cache_frozen: bool = True
    epochs: int = 0
    lr_scale: Callable[[jax.Array, int], jax.Array] | None = None

    @property
    def use_rng(self) -> bool:
        """Whether local steps need a key (LoRA dropout)."""
        return self.expert.lora.dropout > 0

    def prep(self, images: jax.Array) -> jax.Array:
        """uint8 or float images [..., H0, W0, C0] -> the model's float input [..., H, W, C];
        a tokens-input expert (``model.frozen_blocks > 0``) takes the frozen stem's float
        tokens [..., T, D], passed through unchanged."""
        s = self.expert.spec
        if s.input == "tokens":
            return images
        mean, std = self.stats
        return preprocess(images, s.image_size, mean, std, s.num_channels)

    def with_schedule(self, mode: str) -> Settings:
        return dataclasses.replace(self, schedule=dataclasses.replace(self.schedule, mode=mode))


class Stage(NamedTuple):
    """One stage's pure functions (see the module docstring for when each runs)."""

    broadcast: Callable[[ServerState, Phase], PyTree]
    client_init: Callable[[PyTree, PyTree, Phase], tuple[PyTree, PyTree]]
    featurize: Callable[[PyTree, PyTree, jax.Array, Phase], Features]
    loss: Callable[..., tuple[jax.Array, dict]]
    client_final: Callable[[PyTree, PyTree, PyTree, PyTree, Phase], tuple[PyTree, PyTree]]
    server_update: Callable[[ServerState, PyTree, PyTree, Phase], ServerState]
    predict: Callable[[PyTree, PyTree, PyTree, Features, Phase], tuple[jax.Array, dict]]
    global_predict: Callable[[PyTree, PyTree, Features, Phase], jax.Array] | None
    # How the client trains (``federated.client``): the fraction of its examples held out of
    # ``batch`` and served as ``batch.held``; consecutive segments of the round's steps as
    # ((params entries trained, share of the steps), ...) (() = one segment training all); the
    # params entries whose optimizer state persists in the client state (``state['opt']``).
    holdout: float = 0.0
    # Whether the held-out slice moves each round the client trains (``client.Sampler``), so its
    # other parts see every example over time; False: the same slice every round.
    rotate_holdout: bool = False
    segments: tuple[tuple[tuple[str, ...], float], ...] = ()
    persistent: tuple[str, ...] = ()
    # ((params entry, factor), ...): entries whose optimizer steps are scaled (their learning
    # rate is ``factor`` x the client's; FedMS's small gate, which sees few steps per round)
    lr_factors: tuple[tuple[str, float], ...] = ()
    # The client-state entries the stage reads or writes (None: all of them). A round gathers
    # and scatters only these for its cohort: stage 1 of a two-stage method leaves the local
    # experts' slots alone, and moving them would be most of its program.
    state_keys: tuple[str, ...] | None = None
    # observe(state, labels [max_n], mask [max_n]) -> state: what the stage keeps of the client's
    # own training labels (mask: 1 at its real examples), run before ``client_init`` in every
    # round the client trains (FedMS's label prior); it stays in the client state and is never
    # uploaded. None: nothing.
    observe: Callable[[PyTree, jax.Array, jax.Array], PyTree] | None = None


class Algorithm(NamedTuple):
    """A federated algorithm: its stages and the initial states.

    init(rng, num_clients) -> (ServerState, ClientStates), every client starting from the same
    state (a streamed population keeps one client's as the template for all:
    ``federated.population.template_states``); stages: stage 1 (and 2); rounds
    ``< stage1_rounds`` run stage 1 (single-stage methods: every round).
    """

    name: str
    settings: Settings
    init: Callable[[jax.Array, int], tuple[ServerState, ClientStates]]
    stages: tuple[Stage, ...]
    stage1_rounds: int

    @property
    def has_global_model(self) -> bool:
        """Whether every stage has a global model to evaluate (``local`` and ``fedper`` have none)."""
        return all(s.global_predict is not None for s in self.stages)

    @property
    def two_stage(self) -> bool:
        return len(self.stages) == 2

    def phase(self, round_index: int) -> Phase:
        stage = 1 if not self.two_stage or round_index < self.stage1_rounds else 2
        return Phase(stage, self.settings.schedule.num_active(round_index))

    def phases(self, num_rounds: int) -> list[Phase]:
        """The distinct phases of a run, in order of first use."""
        return list(dict.fromkeys(self.phase(t) for t in range(num_rounds)))

    def stage(self, phase: Phase) -> Stage:
        return self.stages[phase.stage - 1]


def single(name: str, settings: Settings, init, stage: Stage) -> Algorithm:
    return Algorithm(name, settings, init, (stage,), 0)


def staged(name: str, settings: Settings, init, stage1: Stage, stage2: Stage, stage1_rounds: int) -> Algorithm:
    """Stage 1 for ``stage1_rounds`` rounds, then stage 2."""
    return Algorithm(name, settings, init, (stage1, stage2), stage1_rounds)
