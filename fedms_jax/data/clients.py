"""Client data as device-resident padded arrays."""
from __future__ import annotations

import flax.struct
import jax
import numpy as np

from fedms_jax.data.sources import Dataset


@flax.struct.dataclass
class ClientData:
    """Stacked, padded client datasets.

    Attributes:
      images: uint8 [clients, max_n, H, W, C] (rows past ``counts`` are zero padding); with
        ``model.frozen_blocks > 0`` the frozen stem's float32 tokens [clients, max_n, T, D].
      labels: int32 [clients, max_n].
      counts: int32 [clients] real examples per client.
    """

    images: jax.Array
    labels: jax.Array
    counts: jax.Array

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])


def stack_clients(dataset: Dataset, parts: list[np.ndarray], inputs: np.ndarray | None = None) -> ClientData:
    """Gathers each client's examples into padded arrays (on the host; ``jax.device_put`` them).

    ``inputs``: what to stack instead of ``dataset.images`` (one row per example, any shape and
    dtype: e.g. the frozen stem's tokens [N, T, D] float32); the labels are the dataset's."""
    inputs = dataset.images if inputs is None else inputs
    if inputs.shape[0] != len(dataset):
        raise ValueError(f"inputs have {inputs.shape[0]} rows for {len(dataset)} examples")
    max_n = max(1, max(len(p) for p in parts))
    n = len(parts)
    images = np.zeros((n, max_n) + inputs.shape[1:], inputs.dtype)
    labels = np.zeros((n, max_n), np.int32)
    for i, p in enumerate(parts):
        images[i, : len(p)] = inputs[p]
        labels[i, : len(p)] = dataset.labels[p]
    counts = np.array([len(p) for p in parts], np.int32)
    return ClientData(images=images, labels=labels, counts=counts)

