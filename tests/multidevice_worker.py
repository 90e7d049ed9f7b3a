"""Run in a subprocess with 8 simulated CPU devices: 2 rounds, plus a sharding probe."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fed_helpers import flat, run_rounds, tiny_config
from fedms_jax.federated import placement

server, clients, engine, _ = run_rounds(tiny_config(), 2)

# Probe: the per-client inputs of a round are sharded over the mesh's 'clients' axis.
probe = {}


def fn(broadcast, client):
    return placement.ClientOutput(client["x"], jnp.float32(1.0), {}, {"m": client["x"].sum()})


@jax.jit
def probe_fn(x):
    return placement.map_reduce(fn, None, {"x": x}, mesh=engine.mesh)[3]["m"]


x = jax.device_put(jnp.arange(8.0 * 3).reshape(8, 3), placement.clients_sharding(engine.mesh))
m = probe_fn(x)
np.savez(
    sys.argv[1],
    trainable=flat(server.trainable),
    num_devices=len(jax.devices()),
    cohort_shards=len({s.device for s in m.addressable_shards if s.data.shape[0] == 1}),
)
