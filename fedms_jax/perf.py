"""Host-side performance defaults, chosen by measurement (experiments/benchmarks/RESULTS.md).

Two findings on XLA:CPU (jaxlib 0.10, 2-core AMD EPYC, the W1 workload) set the defaults here:

* XLA:CPU's YNNPACK fusions made a W1 training round ~20% slower than XLA's own fusions plus
  library dots (its fused backward MLP subgraphs ran at about half the matmul rate), so the CLI
  and the benchmarks turn them off with ``--xla_cpu_experimental_ynn_fusion_type=`` before the
  backend starts. A flag the user already set is left alone; ``FEDMS_JAX_XLA_DEFAULTS=0`` opts
  out.
* Running a whole cohort as one vmapped batch streams every activation through main memory; a
  chunk of clients whose largest activation fits in cache was ~1.25x faster. On CPU the default
  chunk (``placement.chunk_size = 0``) is therefore the largest one under ``CACHE_BUDGET``
  bytes per device; on GPU/TPU it stays the whole cohort, where a wider batch fills the device.
"""
from __future__ import annotations

import os

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
CACHE_BUDGET = 8 << 20  # bytes of one layer's widest activation per device, per chunk


def configure_xla_cpu() -> bool:
    """Adds ``YNN_OFF`` to ``XLA_FLAGS`` if JAX's backends have not started, the user set no
    YNN flag, ``FEDMS_JAX_XLA_DEFAULTS`` is not 0 and jaxlib is a version known to accept the
    flag (an unknown XLA flag aborts the process). Returns whether the flag is in effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return YNN_OFF in flags.split()
    if os.environ.get("FEDMS_JAX_XLA_DEFAULTS", "1") == "0":
        return False
    import jaxlib.version
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    if tuple(int(p) for p in jaxlib.version.__version__.split(".")[:2]) < (0, 10):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
    return True


def auto_chunk_size(
    cohort_size: int, devices: int, activation_bytes_per_client: int, platform: str,
    budget: int = CACHE_BUDGET,
) -> int | None:
    """Clients per vmapped chunk for ``placement.chunk_size = 0``.

    None (the whole cohort at once) off CPU. On CPU: ``devices`` times the largest divisor d of
    ``cohort_size / devices`` with ``d * activation_bytes_per_client <= budget`` (at least 1).
    """
    if platform != "cpu" or cohort_size % devices:
        return None
    per_device = cohort_size // devices
    fits = [d for d in range(1, per_device + 1) if per_device % d == 0 and d * activation_bytes_per_client <= budget]
    chunk = devices * max(fits, default=1)
    return None if chunk == cohort_size else chunk


def activation_bytes(batch_size: int, tokens: int, hidden: int, mlp_dim: int, heads: int, itemsize: int) -> int:
    """Bytes of one client's widest per-layer activation: the MLP's [B, T, mlp] or the
    attention probabilities [B, heads, T, T]."""
    return batch_size * tokens * max(mlp_dim, hidden, heads * tokens) * itemsize
