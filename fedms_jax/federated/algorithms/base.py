"""What every algorithm shares: phases, the generic client function, expert forward helpers.

An algorithm is a handful of pure functions over pytrees (the FedJAX shape), and the engine
runs them. Per round the engine calls, inside one jitted program,

    down = broadcast(server, phase)                       # what the server sends
    per client (vmapped):
      params, ctx = local_problem(down, state, phase)     # what the client trains / holds fixed
      params'     = local steps of loss(params, ctx, ...) # lax.scan, fresh client optimizer
      upload, state' = finish(down, state, params, params', phase)
    server' = server_update(server, weighted mean of uploads, phase)

and, for evaluation, ``predict`` (a client's personalised model) and ``predict_global`` (the
global model, if the algorithm has one).

A ``Phase`` is the static part of a round: the algorithm's stage (1, or 2 for the two-stage
algorithms) and the SAL level k. Each distinct phase compiles once.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedms_jax import sal
from fedms_jax.data.preprocess import preprocess
from fedms_jax.federated import server as srv
from fedms_jax.federated.client import caches_frozen, make_local_train
from fedms_jax.federated.placement import ClientOutput
from fedms_jax.models.expert import Expert
from fedms_jax.models.vision import Branch
from fedms_jax.train import cross_entropy

PyTree = Any


@dataclasses.dataclass(frozen=True, order=True)
class Phase:
    """The static shape of a round: ``stage`` (1 or 2) and the SAL level ``num_active`` (k)."""

    stage: int
    num_active: int


@dataclasses.dataclass(frozen=True)
class Common:
    """The settings every algorithm takes.

    expert: the model; stats: (mean, std) for preprocessing; schedule: SAL schedule;
    client_optimizer: local optimizer (fresh state every round); server_optimizer: applied to the
    pseudo-gradient ``-mean delta`` per unit; local_steps, batch_size: local work per round;
    init_head: initial head params (CLIP zero-shot embeddings) or None for a fresh head;
    frozen_head: the head when it is not trained (CLIP zero-shot, ``tune_head=False``);
    cache_frozen: run the frozen part of the loss once per round over a client's examples
    (``client.make_local_train``'s ``precompute``) when that is less work than every step.
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


def delta(new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, new, old)


def stack(tree: PyTree, n: int) -> PyTree:
    """n copies of ``tree`` along a new leading (client) axis."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def choose(flag: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    """Per-leaf ``where`` on a scalar flag (e.g. 'this client has its own model yet')."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


class Algorithm(abc.ABC):
    """Base class: a single-stage algorithm on the SAL schedule. Subclasses fill in the rest."""

    name = "base"
    has_global_model = True  # whether ``predict_global`` means anything
    two_stage = False

    def __init__(self, common: Common) -> None:
        self.c = common
        self.expert = common.expert

    # --- phases -------------------------------------------------------------------------
    def phase(self, round_index: int) -> Phase:
        return Phase(1, self.c.schedule.num_active(round_index))

    def phases(self, num_rounds: int) -> list[Phase]:
        """The distinct phases of a run, in order of first use."""
        return list(dict.fromkeys(self.phase(t) for t in range(num_rounds)))

    # --- what subclasses define ------------------------------------------------------------
    @abc.abstractmethod
    def init(self, rng: jax.Array, num_clients: int):  # -> (ServerState, ClientStates)
        ...

    @abc.abstractmethod
    def broadcast(self, server, phase: Phase) -> PyTree:
        ...

    @abc.abstractmethod
    def local_problem(self, down: PyTree, state: PyTree, phase: Phase) -> tuple[PyTree, PyTree]:
        ...

    @abc.abstractmethod
    def loss(self, params, ctx, backbone, images, labels, rng, *, phase: Phase) -> tuple[jax.Array, dict]:
        ...

    @abc.abstractmethod
    def finish(self, down, state, old, new, phase: Phase) -> tuple[PyTree, PyTree]:
        ...

    @abc.abstractmethod
    def predict(self, backbone, down, state, images, phase: Phase) -> tuple[jax.Array, dict]:
        """A client's personalised model: images [B,H,W,C] float -> (log-probs [B, C], extras),
        extras being per-example scalars [B] (e.g. the gate's weight on the local expert)."""
        ...

    def predict_global(self, backbone, down, images, phase: Phase) -> jax.Array:
        """The global model's logits [B, C] (only if ``has_global_model``)."""
        raise TypeError(f"algorithm {self.name!r} has no global model (has_global_model is False)")

    def server_update(self, server, mean_upload: PyTree, phase: Phase):
        from fedms_jax.federated.engine import ServerState

        trainable, opt_state = srv.apply_server_update(
            self.c.server_optimizer, server.trainable, server.opt_state, mean_upload
        )
        return ServerState(trainable, opt_state)

    # --- shared machinery ----------------------------------------------------------------
    def prep(self, images: jax.Array) -> jax.Array:
        s = self.expert.spec
        mean, std = self.c.stats
        return preprocess(images, s.image_size, mean, std, s.num_channels)

    @functools.lru_cache(maxsize=None)
    def client_fn(self, phase: Phase) -> Callable[[PyTree, PyTree], ClientOutput]:
        """One client's round at ``phase``: ``(backbone, down), client -> ClientOutput``."""
        local_train = make_local_train(
            functools.partial(self.loss, phase=phase), self.c.client_optimizer, self.c.local_steps,
            self.c.batch_size, self.prep, use_rng=self.expert.lora.dropout > 0,
            precompute=functools.partial(self.precompute, phase=phase) if self.c.cache_frozen else None,
        )

        def client_fn(broadcast, client):
            backbone, down = broadcast
            params, ctx = self.local_problem(down, client["state"], phase)
            new, loss, aux = local_train(
                backbone, params, ctx, client["images"], client["labels"], client["count"], client["key"]
            )
            upload, state = self.finish(down, client["state"], params, new, phase)
            weight = client["count"].astype(jnp.float32)
            return ClientOutput(upload=upload, weight=weight, state=state, metrics={"loss": loss, **aux})

        return client_fn

    def precompute(self, backbone, ctx, images, *, phase: Phase) -> PyTree:
        """What the loss computes from images that no local step changes: by default the SAL
        trunk's branch point (blocks below the active ones are frozen and LoRA-free).
        images float [n, H, W, C] -> a per-example pytree [n, ...] that ``loss`` accepts in place
        of images (``expert_logits`` takes either)."""
        return self.expert.trunk(backbone, images, phase.num_active)

    def uses_cache(self, max_examples: int) -> bool:
        """Whether local training runs ``precompute`` once per round (see make_local_train)."""
        return self.c.cache_frozen and caches_frozen(max_examples, self.c.local_steps, self.c.batch_size)

    def active_names(self, phase: Phase, head: bool = True) -> list[str]:
        return srv.active_units(phase.num_active, self.expert.num_layers, head=head)

    def active(self, trainable: PyTree, phase: Phase, head: bool = True) -> dict:
        """The active units of an expert's trainable tree (head + top-k blocks' LoRA)."""
        return srv.select(trainable, self.active_names(phase, head))

    def expert_logits(self, backbone, trainable, images, phase: Phase, rng=None) -> jax.Array:
        """The SAL forward of one expert: images [B,H,W,C] float, or their precomputed branch
        point (a ``Branch``), -> logits [B, C]."""
        if isinstance(images, Branch):
            return self.logits_from_branch(backbone, trainable, images.hidden, phase, rng)
        return self.expert.logits(
            backbone, trainable, images, phase.num_active, frozen_head=self.c.frozen_head, rng=rng
        )

    def logits_from_branch(self, backbone, trainable, hidden, phase: Phase, rng=None) -> jax.Array:
        return self.expert.logits_from_branch(
            backbone, trainable, hidden, phase.num_active, frozen_head=self.c.frozen_head, rng=rng
        )

    def init_expert(self, rng: jax.Array) -> dict:
        return self.expert.init_trainable(rng, head=self.c.init_head)

    def expert_loss(self, backbone, trainable, images, labels, phase: Phase, rng=None) -> jax.Array:
        return cross_entropy(self.expert_logits(backbone, trainable, images, phase, rng), labels)
