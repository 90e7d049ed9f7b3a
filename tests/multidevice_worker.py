"""Run in a subprocess with 8 simulated CPU devices: 2 rounds, plus a sharding probe."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fed_helpers import DP, evaluation, flat, run_experiment, tiny_config
from fedms_jax.federated import placement
from fedms_jax.federated.types import ClientOutput

exp, server, clients, _ = run_experiment(tiny_config(), 2)
engine = exp.engine
phase = exp.algorithm.phase(1)
evals = evaluation(exp, server, clients, phase)
# Evaluation is placed like training (``placement.map``): each device computes one client's sums.
from fedms_jax.federated.evaluation import personal_eval_fn  # noqa: E402

eval_fn = personal_eval_fn(exp.algorithm, phase, engine.eval_batch)
per_client = {"images": exp.client_test.images, "labels": exp.client_test.labels,
              "count": exp.client_test.counts, "state": clients.local}
down = exp.algorithm.stage(phase).broadcast(server, phase)
personal = jax.jit(lambda pc: engine.placement.map(eval_fn, (engine.backbone, down), pc, chunk_size=8))(per_client)

# Probe: the per-client inputs of a round are sharded over the mesh's 'clients' axis.
probe = {}


def fn(broadcast, client):
    return ClientOutput({"u": client["x"]}, {"u": jnp.float32(1.0)}, {}, {"m": client["x"].sum()})


@jax.jit
def probe_fn(x):
    return placement.Vmap(engine.mesh).map_reduce(fn, None, {"x": x})[3]["m"]


x = jax.device_put(jnp.arange(8.0 * 3).reshape(8, 3), placement.clients_sharding(engine.mesh))
# DP-FedAvg: the server's noise is drawn once (replicated), the same as on one device.
_, dp_server, _, _ = run_experiment(tiny_config(*DP), 1)
m = probe_fn(x)
np.savez(
    sys.argv[1],
    trainable=flat(server.trainable),
    dp_trainable=flat(dp_server.trainable),
    num_devices=len(jax.devices()),
    cohort_shards=len({s.device for s in m.addressable_shards if s.data.shape[0] == 1}),
    eval_shards=len({s.device for s in personal["correct"].addressable_shards if s.data.shape[0] == 1}),
    **evals,
)
