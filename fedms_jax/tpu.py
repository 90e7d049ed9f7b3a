"""TPU targets with no TPU attached: topologies, their devices and meshes, and the chips' specs.

``libtpu`` (``pip install -e '.[tpu]'``) compiles for a TPU topology on a CPU-only host:
``jax.experimental.topologies.get_topology_desc`` gives the devices of, e.g., a v5e 16x16 slice
(256 chips, 64 hosts), and a program lowered with shardings over them compiles for that target
(nothing can run). ``fedms-jax plan --topology`` is built on this (``tpu_plan``).

Names: ``GEN:SHAPE`` with GEN one of ``CHIPS`` (v4, v5e, v5p, v6e) and SHAPE the slice's chips
per axis (``v5e:16x16``, ``v4:2x2x2``); ``Nx`` in front asks for N slices joined over the data
centre network (``2xv5e:16x16``), where the 'clients' axis spans the slices and 'model' stays
inside one.

Specs per chip are the public Cloud TPU documentation's (``Chip.source``). A topology's devices
are the chips, except on v4, whose topology descriptions list each chip's two TensorCores as
two devices: a device then has half the chip's HBM and compute (``Chip.devices_per_chip``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import numpy as np

INSTALL = "pip install -e '.[tpu]' (jax[tpu], with libtpu, pinned to this jax)"
# libtpu looks for a TPU VM's metadata when it loads and prints warnings when there is none;
# the first three make it load quietly on a host with no TPU (a TPU VM sets its own, which are
# kept). The last lets several processes load it at once (it takes a host-wide lock file,
# /tmp/libtpu_lockfile, meant for processes that open the chips; compiling opens none).
QUIET_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


class TopologyError(ValueError):
    """A topology name, mesh or cohort that cannot be planned, or no libtpu."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s, bidirectional ICI bytes/s."""

    generation: str
    device_kind: str
    hbm_bytes: float
    bf16_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    devices_per_chip: int
    source: str


GB, GiB = 1e9, float(1 << 30)
# HBM in GiB: the documentation's "16 GB" of a v5e is what XLA:TPU budgets as 16 GiB (it reports
# 15.75 GiB available after its reservations, and refuses a program that needs more).
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200 * GB, 300 * GB, 2,
               "https://cloud.google.com/tpu/docs/v4 (ICI: 6 links of ~50 GB/s)"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819 * GB, 400 * GB, 1, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765 * GB, 600 * GB, 1, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1638 * GB, 800 * GB, 1, "https://cloud.google.com/tpu/docs/v6e"),
}
NAME = re.compile(r"^(?:(\d+)x)?(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    shape: tuple[int, ...]
    slices: int
    devices: tuple  # jax Devices of the target (not attached)

    @property
    def chips(self) -> int:
        return int(np.prod(self.shape)) * self.slices

    @property
    def hosts(self) -> int:
        return len({(getattr(d, "slice_index", 0), d.process_index) for d in self.devices})

    @property
    def device_hbm(self) -> float:
        return self.chip.hbm_bytes / self.chip.devices_per_chip

    @property
    def device_flops(self) -> float:
        return self.chip.bf16_flops / self.chip.devices_per_chip


def parse_name(name: str) -> tuple[int, str, tuple[int, ...]]:
    """'2xv5e:16x16' -> (2, 'v5e', (16, 16)); a one-line ``TopologyError`` otherwise."""
    m = NAME.match(name.strip().lower())
    if not m:
        raise TopologyError(f"--topology {name!r}: write GEN:SHAPE with GEN one of {list(CHIPS)} and SHAPE the "
                            "chips per axis, e.g. v5e:16x16 or v4:2x2x2 (2xv5e:16x16 for two slices)")
    slices = int(m.group(1) or 1)
    if slices < 1:
        raise TopologyError(f"--topology {name!r}: the number of slices must be at least 1")
    return slices, m.group(2), tuple(int(s) for s in m.group(3).split("x"))


def available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def quiet_libtpu() -> None:
    """Sets ``QUIET_ENV`` (where unset) before libtpu loads; JAX itself stays on the CPU."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def topology(name: str) -> Topology:
    """The devices of topology ``name`` (see the module docstring), compiled for, not attached."""
    slices, gen, shape = parse_name(name)
    if not available():
        raise TopologyError(f"--topology needs libtpu, which is not installed: {INSTALL}")
    quiet_libtpu()
    from jax.experimental import topologies

    text = f"{gen}:{'x'.join(map(str, shape))}"
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=text,
                                            **({"num_slices": slices} if slices > 1 else {}))
    except Exception as e:  # noqa: BLE001 - libtpu's INVALID_ARGUMENT, one line of it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"--topology {name!r}: libtpu cannot make it ({first.removeprefix('INVALID_ARGUMENT: ')})") from None
    return Topology(name, CHIPS[gen], shape, slices, tuple(desc.devices))


def mesh(topo: Topology, clients: int, model: int):
    """A ('clients', 'model') mesh over the topology's devices: 'model' groups neighbouring chips
    of a slice (``mesh_utils`` knows the ICI rings); with several slices 'clients' spans them."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from fedms_jax.federated.sharding import CLIENTS, MODEL

    n = len(topo.devices)
    if model < 1 or n % model or clients * model != n:
        raise TopologyError(f"mesh {clients}x{model} (clients x model) does not divide the {n} devices of "
                            f"{topo.name}: clients x model must equal {n}")
    devices = list(topo.devices)
    try:
        if topo.slices > 1:
            if clients % topo.slices:
                raise TopologyError(f"mesh {clients}x{model} on {topo.name}: the clients axis ({clients}) must be a "
                                    f"multiple of the {topo.slices} slices")
            grid = mesh_utils.create_hybrid_device_mesh((clients // topo.slices, model), (topo.slices, 1), devices)
        else:
            grid = mesh_utils.create_device_mesh((clients, model), devices=devices)
    except (AssertionError, NotImplementedError, ValueError) as e:
        if isinstance(e, TopologyError):
            raise
        grid = np.asarray(devices).reshape(clients, model)  # a shape mesh_utils has no layout for
    return Mesh(grid, (CLIENTS, MODEL))
