"""Multi-host start-up: ``jax.distributed.initialize`` when the environment asks for it.

On TPU pods and SLURM/Kubernetes clusters ``jax.distributed.initialize()`` finds the
coordinator itself; elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (with ``JAX_LOCAL_DEVICE_IDS`` optional), or pass
``--multihost``. On CPU the processes talk through gloo collectives.

Once initialised, ``jax.devices()`` lists every process's devices, the 'clients' mesh axis spans
them all, each process computes its share of the cohort, and only process 0 writes metrics
(checkpoints are written by orbax, which coordinates the processes itself).
"""
from __future__ import annotations

import os

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize(force: bool = False) -> bool:
    """Initialises ``jax.distributed`` if ``force`` or ``JAX_COORDINATOR_ADDRESS`` is set.

    Returns whether it did. Must run before any other JAX call.
    """
    if not force and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    import jax

    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in _ENV if not os.environ.get(k)]
        if missing:
            raise ValueError(f"multi-host start-up needs {list(_ENV)}; missing {missing}")
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    # Only the CPU client reads this; asking for the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
