"""One process of a multi-host run (``jax.distributed`` over gloo on CPU), or a single process.

    python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Runs 3 FedMS rounds (one of stage 1, two of stage 2) on the tiny config; process 0 saves the
final server tree to OUT_DIR/server_<NUM_PROCESSES>.npy.
"""
import os
import sys

pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if n > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(pid))

from fedms_jax import distributed  # noqa: E402

assert distributed.maybe_initialize() == (n > 1)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from fed_helpers import flat, tiny_config  # noqa: E402
from fedms_jax.run import run  # noqa: E402

assert jax.process_count() == n and len(jax.devices()) == n * len(jax.local_devices())
result = run(tiny_config("algorithm=fedms", "rounds=3", "stage1_rounds=1"), os.path.join(out, f"w{n}"), progress=False)
gather = lambda x: np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))
server = jax.tree_util.tree_map(gather, result.server.trainable)
if pid == 0:
    np.save(os.path.join(out, f"server_{n}.npy"), flat(server))
