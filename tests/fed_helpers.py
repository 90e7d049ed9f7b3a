"""Small federated configs and helpers shared by the engine tests (also run in subprocesses)."""
from __future__ import annotations

import jax
import numpy as np

from fedms_jax.config import apply_overrides, load_config, validate

TINY = [
    "data.name=synthetic", "data.num_clients=8", "data.min_examples=8", "data.alpha=0.5",
    "cohort_size=8", "model.image_size=8", "model.patch_size=4", "model.hidden=32",
    "model.layers=2", "model.heads=4", "model.mlp_dim=64", "lora.rank=4",
    "client.local_steps=2", "client.batch_size=8", "client.optimizer=sgd", "client.lr=0.1",
    "sal.k0=1", "sal.every=1", "rounds=2", "algorithm=fedavg_sal",
]


# DP-FedAvg that clips every update and adds noise; reproducible (from the seed), so that runs
# can be compared (the default draws the noise from a secret: tests/test_reliability.py)
DP = ("dp.clip=0.05", "dp.noise_multiplier=1.0", "dp.reproducible_noise=true")


def tiny_config(*extra: str):
    return validate(apply_overrides(load_config("embedded"), TINY + list(extra)))


def run_experiment(config, rounds: int, *, mesh=None):
    """Builds the experiment and runs rounds through its engine: -> (exp, server, clients, metrics)."""
    from fedms_jax.federated.rounds import sample_cohort
    from fedms_jax.run import build

    exp = build(config, mesh=mesh)
    server, clients = exp.init_states()
    metrics = []
    for t in range(rounds):
        phase = exp.algorithm.phase(t)
        cohort = sample_cohort(config.seed, t, config.data.num_clients, config.cohort_size)
        server, clients, m = exp.engine.run_round(server, clients, t, phase, cohort)
        metrics.append({n: float(v) for n, v in m.items()})
    return exp, server, clients, metrics


def run_rounds(config, rounds: int, *, mesh=None):
    """Runs rounds through the engine directly; returns (server, clients, engine, metrics)."""
    exp, server, clients, metrics = run_experiment(config, rounds, mesh=mesh)
    return server, clients, exp.engine, metrics


def evaluation(exp, server, clients, phase) -> dict:
    """Per-client personalised sums and the global (loss, accuracy), as numpy."""
    out = {f"personal_{k}": v for k, v in exp.engine.evaluate_clients(server, clients, phase, exp.client_test).items()}
    out["global"] = np.asarray(exp.engine.evaluate_global(server, phase, exp.test_images, exp.test_labels))
    return out


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])
