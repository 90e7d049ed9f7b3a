"""SAL -- Sparsely Activated LoRA: which blocks are active at each round.

LoRA sits in every block, but at round t only the top ``k(t)`` blocks are active. The schedule
(our reading of the paper; DESIGN.md section 1, marked *choice*) is one of

  * ``progressive``: ``k(t) = min(L, k0 + step * (t // every))`` -- grows from the top down;
  * ``all``: ``k(t) = L`` (plain LoRA, no SAL);
  * ``fixed``: ``k(t) = k0``.

Inactive blocks' LoRA leaves are not in the tree a client differentiates, updates or sends:
``federated.types.select`` takes the active units out of a trainable tree and
``replace_units`` writes the trained ones back.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

PyTree = Any
Mode = Literal["progressive", "all", "fixed"]
_BLOCK = re.compile(r"^blocks_(\d+)$")


@dataclasses.dataclass(frozen=True)
class SALSchedule:
    """Round -> number of active top blocks k in [1, L] (``fixed`` also allows k0 = 0)."""

    num_layers: int
    mode: Mode = "progressive"
    k0: int = 1
    step: int = 1
    every: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("progressive", "all", "fixed"):
            raise ValueError(f"sal.mode must be 'progressive', 'all' or 'fixed', got {self.mode!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        lo = 0 if self.mode == "fixed" else 1
        if not isinstance(self.k0, int) or not lo <= self.k0 <= self.num_layers:
            raise ValueError(f"sal.k0 must be an integer in [{lo}, {self.num_layers}], got {self.k0!r}")
        if not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"sal.step must be a positive integer, got {self.step!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"sal.every must be a positive integer, got {self.every!r}")

    def num_active(self, round_index: int) -> int:
        """k for round ``round_index`` (0-based)."""
        if round_index < 0:
            raise ValueError(f"round must be >= 0, got {round_index}")
        if self.mode == "all":
            return self.num_layers
        if self.mode == "fixed":
            return self.k0
        return min(self.num_layers, self.k0 + self.step * (round_index // self.every))

    def levels(self, num_rounds: int) -> list[int]:
        """The distinct k over the first ``num_rounds`` rounds, in order of first use."""
        return list(dict.fromkeys(self.num_active(t) for t in range(num_rounds)))


def block_index(key: str) -> int | None:
    m = _BLOCK.match(key)
    return int(m.group(1)) if m else None


def active_block_ids(num_active: int, num_layers: int) -> range:
    if not 0 <= num_active <= num_layers:
        raise ValueError(f"num_active must be in [0, {num_layers}], got {num_active}")
    return range(num_layers - num_active, num_layers)
