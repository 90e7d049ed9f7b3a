"""The dataset record every data source returns, and the error for data that cannot be used."""
from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """Malformed or unusable data: wrong image shape or dtype, labels out of range, a client
    with no examples, an unknown dataset."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """images: uint8 [N, H, W, C]; labels: int32 [N] in [0, num_classes)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"dataset images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"dataset labels must have shape [{self.images.shape[0]}], got {self.labels.shape}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            bad = self.labels[(self.labels < 0) | (self.labels >= self.num_classes)][0]
            raise DataError(
                f"label {int(bad)} is out of range [0, {self.num_classes}) ({self.num_classes} class names)"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])
