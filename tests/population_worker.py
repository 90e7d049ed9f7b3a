"""Run in a subprocess with 4 simulated CPU devices: the same FedMS run (budget tiers, two
chunks per group) with every client on the device and streamed, whose cohort states and data
are split over the devices. Writes both runs' servers, client states and metrics lines."""
import json
import sys
from pathlib import Path

import jax
import numpy as np

from fed_helpers import flat, tiny_config
from fedms_jax.federated import population
from fedms_jax.run import run

out, work = Path(sys.argv[1]), Path(sys.argv[2])
assert len(jax.devices()) == 4
N = 16
POP = ["algorithm=fedms", "stage1_rounds=1", f"data.num_clients={N}", "cohort_size=16", "data.min_examples=4",
       "rounds=3", "eval_every=3", "population.buckets=1", "sal.budgets=1,2", "sal.budget_shares=0.5,0.5",
       "placement.chunk_size=4", "mesh.clients=4"]
seen = set()  # rows per device shard of each round's new cohort states, before they go to the host
finish = population.Streamed.finish_round


def recording_finish(self):
    if self._out is not None:
        seen.update(s.data.shape[0] for leaf in jax.tree_util.tree_leaves(self._out[1]) for s in leaf.addressable_shards)
    finish(self)


population.Streamed.finish_round = recording_finish
result = {}
for mode in ("device", "streamed"):
    r = run(tiny_config(*POP, f"population.mode={mode}"), work / mode, progress=False)
    clients = r.clients
    if isinstance(clients, population.Streamed):
        states = clients.read(np.arange(N))
    else:
        states = jax.device_get(clients)
    lines = [{k: v for k, v in json.loads(l).items() if k != "seconds"}
             for l in (work / mode / "metrics.jsonl").read_text().splitlines()]
    result[f"{mode}_server"], result[f"{mode}_states"] = flat(r.server), flat(states)
    result[f"{mode}_lines"] = np.array(json.dumps(lines))
np.savez(out, shard_rows=np.array(sorted(seen)), **result)
