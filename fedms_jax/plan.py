"""``fedms-jax plan``: bytes per device of each sharding layout, before spending accelerator hours.

For every layout (``clients x model`` mesh and strategy) it places the backbone by the
strategy's rules, compiles the round program of the run's heaviest phase (the last: most active
blocks, stage 2 when there is one) and reports, per device:

  * backbone: the bytes of the backbone's shards on one device (from the placed arrays);
  * client states: the stacked persistent client states (replicated on every device);
  * arguments / temporaries / outputs: XLA's ``memory_analysis()`` of the compiled program
    (temporaries = activations, gradients and workspace of the vmapped local training);
  * peak estimate: arguments + temporaries + outputs - aliased (donated) bytes.

Nothing runs; only compilation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax.config import Config
from fedms_jax.federated import sharding

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Layout:
    clients: int
    model: int
    strategy: str

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """'2x4:fsdp' -> Layout(2, 4, 'fsdp')."""
        try:
            shape, strategy = text.split(":")
            clients, model = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"layout {text!r} must look like CLIENTSxMODEL:STRATEGY, e.g. 2x4:fsdp") from None
        return cls(clients, model, strategy)

    def __str__(self) -> str:
        return f"{self.clients}x{self.model}:{self.strategy}"


def default_layouts(num_devices: int) -> list[Layout]:
    out = [Layout(num_devices, 1, "replicated")]
    for model in range(2, num_devices + 1):
        if num_devices % model == 0:
            out += [Layout(num_devices // model, model, s) for s in ("fsdp", "tensor")]
    return out


def tree_mb(tree: Any) -> float:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)) / MB


def one_chunk(config: Config) -> Config:
    """``config`` with the placement every layout is compiled with: the vmap backend, the whole
    cohort in one chunk. (The run's own chunk, sized for the one device the base experiment is
    built on, need not split over a layout's client devices; ``Engine.with_layout`` keeps it.)"""
    return dataclasses.replace(config, placement=dataclasses.replace(
        config.placement, backend="vmap", chunk_size=config.cohort_size))


def plan(config: Config, layouts: list[Layout]) -> list[dict]:
    """One row per layout (see the module docstring); a layout that does not fit the shapes gets
    an ``error`` instead of numbers."""
    from fedms_jax.run import build

    exp = build(one_chunk(config), mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    algorithm, base = exp.algorithm, exp.engine
    phase = algorithm.phase(config.rounds - 1)
    cohort = np.arange(config.cohort_size, dtype=np.int32)
    rows = []
    for layout in layouts:
        row: dict = {"layout": str(layout), "phase": f"stage {phase.stage}, k={phase.num_active}"}
        try:
            engine = base.with_layout(sharding.make_mesh(layout.clients, layout.model), layout.strategy)
        except ValueError as e:
            rows.append({**row, "error": str(e)})
            continue
        # From the states' shapes (a streamed population: one cohort's states and data).
        server, clients = exp.states_like()
        compiled = engine.lower_round(phase, server, clients, len(cohort), base.data_like if exp.streamed else None).compile()
        mem = compiled.memory_analysis()
        per_device = sharding.bytes_per_device(engine.backbone)
        row.update(
            backbone_mb=max(per_device.values()) / MB,
            backbone_total_mb=tree_mb(engine.backbone),
            client_states_mb=tree_mb(clients),
            arguments_mb=mem.argument_size_in_bytes / MB,
            temporaries_mb=mem.temp_size_in_bytes / MB,
            outputs_mb=mem.output_size_in_bytes / MB,
            peak_mb=(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes) / MB,
        )
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| layout | phase | backbone MB/device (of total) | client states MB/device | arguments MB "
        "| temporaries MB | outputs MB | peak estimate MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['layout']} | {r['phase']} | not possible: {r['error']} | | | | | |")
            continue
        out.append(
            f"| {r['layout']} | {r['phase']} | {r['backbone_mb']:.2f} (of {r['backbone_total_mb']:.2f}) "
            f"| {r['client_states_mb']:.2f} | {r['arguments_mb']:.2f} | {r['temporaries_mb']:.2f} "
            f"| {r['outputs_mb']:.2f} | {r['peak_mb']:.2f} |"
        )
    return "\n".join(out)
