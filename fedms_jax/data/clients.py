"""Client data: padded per-client arrays (``ClientData``, what a round program reads) and the
unpadded host layout of a streamed population (``FlatClients``), with its bucket sizes."""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import numpy as np

from fedms_jax.data.dataset import Dataset


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



@dataclasses.dataclass(frozen=True, eq=False)
class FlatClients:
    """Every client's examples unpadded, in one host array (a streamed population's data).

    Attributes:
      inputs: [N, ...] (uint8 images, or the frozen stem's float32 tokens): client c's rows are
        ``inputs[offsets[c]:offsets[c + 1]]``.
      labels: int32 [N].
      offsets: int64 [clients + 1].

    A cohort is gathered with ``gather(ids, size)``: its clients' rows padded to ``size`` (a
    bucket, ``bucket_of``), so memory and compute follow the cohort, not the population's
    largest client.
    """

    inputs: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_parts(cls, dataset: Dataset, parts: list[np.ndarray], inputs: np.ndarray | None = None) -> FlatClients:
        """The clients' examples (``parts``: each client's indices into ``dataset``) laid out
        one client after another; ``inputs`` as in ``stack_clients``."""
        inputs = dataset.images if inputs is None else inputs
        if inputs.shape[0] != len(dataset):
            raise ValueError(f"inputs have {inputs.shape[0]} rows for {len(dataset)} examples")
        counts = np.array([len(p) for p in parts], np.int64)
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(np.ascontiguousarray(inputs[order]), np.asarray(dataset.labels, np.int32)[order], offsets)

    @property
    def counts(self) -> np.ndarray:
        """int32 [clients]: examples per client."""
        return np.diff(self.offsets).astype(np.int32)

    @property
    def num_clients(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def gather(self, ids: np.ndarray, size: int) -> ClientData:
        """The clients ``ids`` as padded host arrays [len(ids), size, ...] (rows past a client's
        count are zeros; ``size`` must hold the largest of them)."""
        ids = np.asarray(ids, np.int64)
        counts = self.counts[ids]
        if len(ids) and counts.max() > size:
            raise ValueError(f"client {int(ids[counts.argmax()])} has {counts.max()} examples, more than the padded size {size}")
        # One fancy index for the whole cohort: row r of client i reads example offsets[i] + r,
        # padding rows read row 0 and are zeroed after.
        rows = np.arange(size)
        index = self.offsets[ids][:, None] + rows[None, :]
        real = rows[None, :] < counts[:, None]
        index = np.where(real, index, 0)
        images = self.inputs[index]
        labels = self.labels[index]
        images[~real] = 0
        labels[~real] = 0
        return ClientData(images=images, labels=labels, counts=counts.astype(np.int32))


def bucket_sizes(counts: np.ndarray, buckets: int, multiple: int = 8) -> tuple[int, ...]:
    """A few padded client sizes, ascending: the largest client's count (what the device mode
    pads every client to), then halvings of it rounded up to ``multiple``, at most ``buckets``
    of them and none below the smallest client. A cohort is padded to the smallest size holding its
    largest client (``bucket_of``): at most 2x padding, and at most ``buckets`` round programs
    per phase."""
    top = int(max(1, counts.max(initial=1)))
    round_up = lambda n: -(-n // multiple) * multiple
    sizes = [top]
    floor = int(max(1, counts.min(initial=1)))
    while len(sizes) < buckets:
        nxt = round_up(-(-sizes[-1] // 2))
        if nxt >= sizes[-1] or nxt < floor:
            break
        sizes.append(nxt)
    return tuple(sorted(sizes))


def bucket_of(sizes: tuple[int, ...], largest: int) -> int:
    """The smallest of ``sizes`` that holds ``largest`` examples."""
    for s in sizes:
        if s >= largest:
            return s
    raise ValueError(f"a client of {largest} examples is larger than every bucket {sizes}")
