"""fedms_jax.perf: the automatic client chunk (hand-computed cases) and the XLA flag defaults
(in fresh processes, since XLA reads its flags once, when the backend starts)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedms_jax.perf import YNN_OFF, activation_bytes, auto_chunk_size

MIB = 1 << 20


def test_activation_bytes_is_the_widest_layer_activation() -> None:
    # W1: batch 32, 65 tokens, MLP 768 is wider than 3 heads x 65 keys
    assert activation_bytes(32, 65, 192, 768, 3, 4) == 32 * 65 * 768 * 4
    # attention probabilities win when heads x tokens exceeds the MLP width
    assert activation_bytes(2, 197, 64, 128, 12, 2) == 2 * 197 * 12 * 197 * 2


@pytest.mark.parametrize(
    "cohort, devices, per_client, platform, want",
    [
        (16, 1, 6.4 * MIB, "cpu", 1),  # W1: one client per chunk fits the budget
        (64, 1, 1.6 * MIB, "cpu", 4),  # W2: 5 would fit 8 MiB but does not divide 64
        (64, 8, 1.6 * MIB, "cpu", 32),  # 4 clients per device on each of 8 devices
        (8, 1, 0.3 * MIB, "cpu", None),  # the whole cohort fits: no chunking
        (16, 1, 20 * MIB, "cpu", 1),  # nothing fits: one client at a time
        (16, 1, 6.4 * MIB, "gpu", None),  # accelerators take the whole cohort
        (12, 8, 1.0 * MIB, "cpu", None),  # cohort not divisible by devices: left to the mesh check
    ],
)
def test_auto_chunk_size(cohort, devices, per_client, platform, want) -> None:
    assert auto_chunk_size(cohort, devices, int(per_client), platform) == want


def _flags_in_fresh_process(env: dict[str, str]) -> str:
    code = (
        "import os\nfrom fedms_jax.perf import configure_xla_cpu\nconfigure_xla_cpu()\n"
        "import jax; jax.devices()\nprint(os.environ.get('XLA_FLAGS', ''))"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDMS_JAX_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_configure_xla_cpu_adds_keeps_or_opts_out() -> None:
    assert _flags_in_fresh_process({}).split() == [YNN_OFF]
    # the user's own flags are kept, and the YNN flag is appended after them
    assert _flags_in_fresh_process({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).split() == [
        "--xla_force_host_platform_device_count=2", YNN_OFF]
    # a YNN setting of the user's own is left exactly as it was
    own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert _flags_in_fresh_process({"XLA_FLAGS": own}) == own
    assert _flags_in_fresh_process({"FEDMS_JAX_XLA_DEFAULTS": "0"}) == ""
