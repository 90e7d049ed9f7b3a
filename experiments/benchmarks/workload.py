"""The benchmarks' workloads: the sizes (``FULL``: the issue's W1/W2, ``TINY``: the smoke test's),
building a workload (``run.build`` on synthetic data) and timing its rounds.

Imported by ``suite.py`` and ``profile_round.py`` as a sibling module: run a script by its path
(``python experiments/benchmarks/suite.py``) and Python puts this directory on ``sys.path``.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.config import resolve
from fedms_jax.data.sources import load_synthetic
from fedms_jax.federated.placement import Vmap
from fedms_jax.federated.rounds import Engine
from fedms_jax.federated.types import ClientStates, Phase, ServerState
from fedms_jax.run import Experiment, build


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the suite uses; ``FULL`` is the issue's workloads, ``TINY`` the smoke test's."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    image: int
    patch: int
    w1_clients: int
    w1_steps: int
    w1_batch: int
    w1_ks: tuple[int, ...]
    w2_steps: int
    w2_batch: int
    backend_clients: tuple[int, ...]
    compile_rounds: int
    compile_clients: int
    memory_cohorts: tuple[int, ...]
    fedms_ks: tuple[int, ...]
    matmul: int


FULL = Sizes(192, 12, 3, 768, 32, 4, 16, 5, 32, (12, 6, 3, 1), 2, 8, (16, 64, 256), 20, 16, (1, 4, 16, 64), (12, 6), 2048)
TINY = Sizes(32, 2, 2, 64, 8, 4, 2, 2, 4, (2, 1), 1, 4, (2, 4), 4, 2, (1, 2), (1,), 256)


def model_overrides(s: Sizes) -> list[str]:
    return [
        f"model.hidden={s.hidden}", f"model.layers={s.layers}", f"model.heads={s.heads}", f"model.mlp_dim={s.mlp}",
        f"model.image_size={s.image}", f"model.patch_size={s.patch}", "model.dtype=float32",
        "lora.rank=8", "lora.targets=q,v", "data.partition=iid", "data.name=synthetic",
        "client.optimizer=sgd", "client.lr=0.01", "checkpoint.every=0",
    ]


@dataclasses.dataclass
class Workload:
    """A built ``Experiment`` and its current states. Rounds donate their input states, so
    ``timed_rounds`` stores each round's outputs here (the experiment itself is frozen and keeps
    the initial, by then donated, ones)."""

    exp: Experiment
    server: ServerState
    clients: ClientStates

    @property
    def engine(self) -> Engine:
        return self.exp.engine


def chunk_size(engine: Engine) -> int | None:
    """Clients per vmapped chunk (None: the whole cohort at once, or the sequential backend)."""
    return engine.placement.chunk_size if isinstance(engine.placement, Vmap) else None


def make(s: Sizes, clients: int, steps: int, batch: int, *extra: str) -> Workload:
    """``run.build`` on synthetic data at the model's resolution: ``clients`` clients with two
    batches of examples each, every client in the cohort."""
    config = resolve("embedded", model_overrides(s) + [
        f"data.num_clients={clients}", f"cohort_size={clients}", f"client.local_steps={steps}",
        f"client.batch_size={batch}", f"data.min_examples={min(batch, 16)}", "algorithm=fedavg_sal",
        "sal.mode=fixed", *extra,
    ])
    data = load_synthetic(num_train=clients * 2 * batch, num_test=64, image_size=s.image, seed=config.seed)
    exp = build(config, datasets=data)
    return Workload(exp, *exp.init_states())


def timed_rounds(w: Workload, phase: Phase, repeats: int) -> dict:
    """One warm-up round, then ``repeats`` timed rounds at ``phase``: seconds of each."""
    engine, server, clients = w.engine, w.server, w.clients
    cohort = np.arange(w.exp.config.cohort_size, dtype=np.int32)
    times = []
    for t in range(repeats + 1 if repeats else 1):
        start = time.perf_counter()
        server, clients, metrics = engine.run_round(server, clients, t, phase, cohort)
        jax.block_until_ready((server, clients, metrics))
        times.append(time.perf_counter() - start)
    w.server, w.clients = server, clients
    return {"first": times[0], "seconds": times[1:], "median": statistics.median(times[1:] or times)}


def matmul_flops(n: int, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n fp32 matmul (median of ``repeats`` after a warm-up)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)
