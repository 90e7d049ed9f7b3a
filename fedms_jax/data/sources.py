"""Image-classification data sources: embedded offline set, synthetic, local files (IDX, image
folders: ``files.py``), TFDS.

Every source returns ``(train, test)`` ``Dataset``s of uint8 images [N, H, W, C] and int32
labels [N]; resizing and normalisation happen later, inside the jitted step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fedms_jax.choices import FILE_SOURCES
from fedms_jax.data import files
from fedms_jax.data.dataset import DataError, Dataset


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test index split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's digits (1797 real 8x8 grey handwritten digits, shipped in its wheel)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    names = tuple(str(n) for n in d.target_names)
    tr, te = _split(images, labels, test_fraction, seed)
    return Dataset(images[tr], labels[tr], names), Dataset(images[te], labels[te], names)


def load_synthetic(
    num_train: int = 1024,
    num_test: int = 256,
    num_classes: int = 10,
    image_size: int = 8,
    channels: int = 3,
    noise: float = 0.35,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """A learnable synthetic task: each class is a fixed random template plus pixel noise.

    ``num_train`` / ``num_test`` examples (default 1024 / 256) of ``image_size`` x
    ``image_size`` x ``channels`` uint8 pixels in ``num_classes`` classes. Images are generated
    in blocks of ``_SYNTHETIC_CHUNK`` rows drawn in turn from one seeded stream, so the values
    do not depend on the block size (the same as one draw of all n) and the memory beyond the
    uint8 output is bounded by the block, not by n: millions of examples take seconds.
    """
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0.0, 1.0, (num_classes, image_size, image_size, channels))
    shape = (image_size, image_size, channels)

    def make(n: int, r: np.random.Generator) -> Dataset:
        labels = r.integers(0, num_classes, n).astype(np.int32)
        images = np.empty((n, *shape), np.uint8)
        buf = np.empty((min(n, _SYNTHETIC_CHUNK), *shape), np.float64)
        for start in range(0, n, _SYNTHETIC_CHUNK):
            stop = min(start + _SYNTHETIC_CHUNK, n)
            x = buf[: stop - start]
            # Element for element the same float64 operations as the one-shot
            # templates[labels] + noise * standard_normal((n, ...)), so bitwise the same.
            r.standard_normal(out=x)
            x *= noise
            x += templates[labels[start:stop]]
            x *= 255.0
            np.round(x, out=x)
            np.clip(x, 0, 255, out=x)
            images[start:stop] = x  # exact: whole numbers in [0, 255]
        return Dataset(images, labels, tuple(f"class_{i}" for i in range(num_classes)))

    return make(num_train, np.random.default_rng(seed + 1)), make(num_test, np.random.default_rng(seed + 2))


# Rows per block in load_synthetic: 16384 x 8 x 8 x 3 float64 is 24 MiB (plus one template
# gather of the same size).
_SYNTHETIC_CHUNK = 16384


def load_tfds(
    name: str,
    data_dir: str | None = None,
    splits: Sequence[str] = ("train", "test"),
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[Dataset, Dataset]:
    """A TFDS image-classification dataset through ``tfds.data_source`` (no TensorFlow needed).

    The dataset must already be prepared in ``data_dir`` (or be downloadable there).
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"data.name {name!r} is not a TFDS dataset ({e})") from e
    names = tuple(builder.info.features[label_key].names)
    out = []
    for split in splits:
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} split {split!r} is not prepared in data_dir "
                f"{data_dir or builder.data_dir!r} ({type(e).__name__}); prepare it first, e.g. "
                f"`tfds build {name} --data_dir=DIR` on a machine with network access"
            ) from e
        records = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(r[image_key], np.uint8) for r in records])
        if images.ndim == 3:
            images = images[..., None]
        labels = np.asarray([r[label_key] for r in records], np.int32)
        out.append(Dataset(images, labels, names))
    return out[0], out[1]


def subsample(dataset: Dataset, n: int, seed: int | Sequence[int]) -> Dataset:
    """A stratified random subset of n examples (each class in proportion, largest remainders),
    in the original order; the whole dataset when n <= 0 or n >= len(dataset)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    idx = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(dataset.labels == c), k, replace=False) for c, k in enumerate(take) if k
    ]))
    return Dataset(dataset.images[idx], dataset.labels[idx], dataset.class_names)


LOCAL_SOURCES = ("digits", "synthetic", "idx", "folder")


def load_dataset(
    name: str,
    data_dir: str | None = None,
    seed: int = 0,
    image_size: int = 0,
    num_clients: int = 0,
    min_examples: int = 1,
    max_bytes: int = 0,
) -> tuple[Dataset, Dataset]:
    """By name: 'digits' (embedded), 'synthetic', 'idx' (MNIST-family IDX files in data_dir),
    'folder' (data_dir/{train,test}/<class>/ images; ``image_size`` > 0 resizes them), or any
    TFDS image-classification name.

    'synthetic' grows with the population: max(1024, 2 * min_examples * num_clients) train and
    max(256, 2 * num_clients) test examples (8x8x3, 10 classes), so that every client can hold
    ``min_examples`` (the dirichlet partition needs num_clients * min_examples). While
    2 * min_examples * num_clients <= 1024 and num_clients <= 128 (e.g. the defaults, 20 x 16,
    or num_clients=0) that is ``load_synthetic()``'s 1024 / 256, bitwise; larger sizes are new
    draws from the same seeds. The other sources ignore ``num_clients`` and ``min_examples``.
    ``max_bytes`` bounds what 'idx' and 'folder' decode (``data.max_bytes``; 0: half the
    available memory), and 'synthetic' is checked against the available memory, before
    anything is read or allocated.
    """
    if name in FILE_SOURCES and not data_dir:
        raise DataError(f"data.name={name!r} reads local files: set data.data_dir")
    if name not in SOURCES:
        return load_tfds(name, data_dir=data_dir)
    return SOURCES[name](data_dir=data_dir, seed=seed, image_size=image_size, num_clients=num_clients,
                         min_examples=min_examples, max_bytes=max_bytes)


def _synthetic(*, seed: int, num_clients: int, min_examples: int, **_) -> tuple[Dataset, Dataset]:
    from fedms_jax.storage import MemoryLimitError, check_fits

    clients, per_client = max(int(num_clients), 0), max(int(min_examples), 1)
    train, test = max(1024, 2 * per_client * clients), max(256, 2 * clients)
    try:  # uint8 8x8x3 images and int32 labels, plus the generator's float64 block
        check_fits((train + test) * (8 * 8 * 3 + 4) + _SYNTHETIC_CHUNK * 8 * 8 * 3 * 8 * 2,
                   f"data.name='synthetic' with data.num_clients = {num_clients} and data.min_examples = "
                   f"{min_examples} ({train} + {test} examples)", "use fewer clients")
    except MemoryLimitError as e:
        raise DataError(str(e)) from None
    return load_synthetic(num_train=train, num_test=test, seed=seed)


# data.name -> loader (keyword arguments: data_dir, seed, image_size, num_clients, min_examples, max_bytes);
# any other name is a TFDS dataset.
SOURCES = {
    "digits": lambda *, seed, **_: load_digits(seed=seed),
    "synthetic": _synthetic,
    "idx": lambda *, data_dir, max_bytes, **_: files.load_idx(data_dir, max_bytes),
    "folder": lambda *, data_dir, image_size, max_bytes, **_: files.load_image_folder(data_dir, image_size, max_bytes),
}
assert set(FILE_SOURCES) <= set(SOURCES)
