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
      images: uint8 [clients, max_n, H, W, C] (rows past ``counts`` are zero padding).
      labels: int32 [clients, max_n].
      counts: int32 [clients] real examples per client.
    """

    images: jax.Array
    labels: jax.Array
    counts: jax.Array

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])


def stack_clients(dataset: Dataset, parts: list[np.ndarray]) -> ClientData:
    """Gathers each client's examples into padded arrays (on the host; ``jax.device_put`` them)."""
    max_n = max(1, max(len(p) for p in parts))
    n = len(parts)
    images = np.zeros((n, max_n) + dataset.images.shape[1:], np.uint8)
    labels = np.zeros((n, max_n), np.int32)
    for i, p in enumerate(parts):
        images[i, : len(p)] = dataset.images[p]
        labels[i, : len(p)] = dataset.labels[p]
    counts = np.array([len(p) for p in parts], np.int32)
    return ClientData(images=images, labels=labels, counts=counts)

