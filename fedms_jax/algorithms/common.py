"""What every algorithm is made of: ``Settings``, the ``Stage`` and ``Algorithm`` records, their
composition (``single``, ``staged``), and the shared expert primitives.

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

import jax
import jax.numpy as jnp
import optax

from fedms_jax import sal
from fedms_jax.data.preprocess import preprocess
from fedms_jax.federated import server as srv
from fedms_jax.federated.client import featurize_branch, init_opt_states, masked_mean
from fedms_jax.federated.types import (
    ClientStates, Features, Phase, ServerState, active_units, replace_units, select, tree_where,
)
from fedms_jax.models.expert import Expert

PyTree = Any


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


# --- shared primitives ----------------------------------------------------------------------
def delta(new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, new, old)


def stack(tree: PyTree, n: int) -> PyTree:
    """n copies of ``tree`` along a new leading (client) axis."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def fresh_clients(num_clients: int, local: PyTree | None = None) -> ClientStates:
    return ClientStates(jnp.zeros((num_clients,), jnp.int32), {} if local is None else local)


def active(settings: Settings, trainable: PyTree, phase: Phase, head: bool = True) -> dict:
    """The active units of an expert's trainable tree (head + top-k blocks' LoRA)."""
    return select(trainable, active_units(phase.num_active, settings.expert.num_layers, head=head))


def expert_logits(settings: Settings, backbone: PyTree, trainable: PyTree, hidden: jax.Array, phase: Phase, rng=None) -> jax.Array:
    """The expert's top k blocks and head from the branch point [B, T, D] -> logits [B, C]."""
    return settings.expert.logits_from_branch(
        backbone, trainable, hidden, phase.num_active, frozen_head=settings.frozen_head, rng=rng
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over the real examples. logits [B, C] float, labels [B] int,
    mask [B] (1 = real example; None: all)."""
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels), mask)


def expert_stage(settings: Settings, **overrides: Callable) -> Stage:
    """The stage where the client trains one expert (``params``) with cross-entropy: FedAvg's
    defaults for every function; ``overrides`` replace some (the other methods' stages)."""

    def featurize(backbone, ctx, images, phase):
        return featurize_branch(settings.expert, backbone, images, phase)

    def loss(params, ctx, backbone, batch, rng, phase):
        logits = expert_logits(settings, backbone, params, batch.features.branch.hidden, phase, rng)
        return cross_entropy(logits, batch.labels, batch.mask), {}

    def predict(params, ctx, backbone, feats, phase):
        return jax.nn.log_softmax(expert_logits(settings, backbone, params, feats.branch.hidden, phase)), {}

    def global_predict(backbone, down, feats, phase):
        return expert_logits(settings, backbone, down, feats.branch.hidden, phase)

    def server_update(server, mean, totals, phase):
        return srv.server_update(settings.server_optimizer, server, mean, totals)

    defaults = dict(
        broadcast=lambda server, phase: active(settings, server.trainable, phase),
        client_init=lambda down, state, phase: (down, None),
        featurize=featurize,
        loss=loss,
        client_final=lambda down, state, old, new, phase: (delta(new, old), state),
        server_update=server_update,
        predict=predict,
        global_predict=global_predict,
        # FedAvg's client ignores its state and returns it as it was.
        state_keys=None if {"client_init", "client_final"} & set(overrides) else (),
    )
    return Stage(**{**defaults, **overrides})


# --- persistent local experts (two-stage methods) --------------------------------------------
def opt_states(settings: Settings, **entries: PyTree) -> dict:
    """One client's initial persistent optimizer states ({entry: {unit: state}}) for the full
    trees of the params entries a stage keeps state for (e.g. ``local=expert``): the client
    state's ``'opt'`` entry (``federated.client.OPT``)."""
    return init_opt_states(settings.client_optimizer, entries)


def local_expert_states(expert: PyTree, num_clients: int, **extra: PyTree) -> ClientStates:
    """Every client's slot for a local expert (a copy of ``expert``, not ``ready`` yet) and the
    ``extra`` per-client entries (one client's value each, copied to every client)."""
    local = {"ready": jnp.zeros((num_clients,), bool), "expert": stack(expert, num_clients)}
    local.update({name: stack(v, num_clients) for name, v in extra.items()})
    return fresh_clients(num_clients, local)


def local_expert(settings: Settings, global_active: PyTree, state: PyTree, phase: Phase) -> PyTree:
    """The client's local expert (active units), or the global expert if it has none yet: with
    the global expert frozen in stage 2 that equals copying it at the stage boundary, and a
    client never sampled in stage 2 is served the global expert."""
    return tree_where(state["ready"], active(settings, state["expert"], phase), global_active)


def store_local(state: PyTree, trained: PyTree) -> dict:
    return {**state, "ready": jnp.ones((), bool), "expert": replace_units(state["expert"], trained)}
