"""Image-classification data from local files: IDX (the MNIST family) and image folders.

* IDX (``data.name='idx'``): ``data.data_dir`` holds ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally gzipped (``.gz``), with ``-idx`` or ``.idx`` before the type. MNIST, Fashion-MNIST
  (Debian: ``apt-get install dataset-fashion-mnist`` -> ``/usr/share/datasets/fashion-mnist``),
  KMNIST and EMNIST ship in this format. An optional ``classes.txt`` (one name per line) names the
  classes; otherwise a directory named like ``fashion-mnist`` gets Fashion-MNIST's ten names, and
  any other the class indices.
* Image folders (``data.name='folder'``): ``data.data_dir/{train,test}/<class>/*.png|jpg|jpeg|bmp|tif``
  (the torchvision ``ImageFolder`` layout). Classes are the train split's sub-directories, sorted.
  16-bit grey images keep their top 8 bits; 32-bit ones are refused. Images must share one size
  unless ``data.image_size`` > 0 resizes them (PIL, bicubic). If every image is grey the data
  stay 1-channel (the jitted preprocessing repeats them to the model's 3).

Every malformed input is a ``DataError`` naming the file and the problem, raised while loading,
before anything compiles.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from fedms_jax.data.dataset import DataError, Dataset

IDX_DTYPES = {0x08: np.uint8}  # unsigned byte: images and labels of every MNIST-family set
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def default_max_bytes() -> int:
    """``data.max_bytes = 0``: half the memory this process may still allocate."""
    from fedms_jax.storage import available_memory

    return available_memory() // 2


def _read_exactly(f, n: int, path: Path, what: str) -> bytes:
    """``n`` bytes of ``f`` (read in pieces: a damaged length cannot make one huge read)."""
    chunks, left = [], n
    while left:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    data = b"".join(chunks)
    if len(data) != n:
        raise DataError(f"{path}: {what}: expected {n} bytes, the file holds {len(data)} (truncated or wrong file)")
    return data


def read_idx(path: str | Path, max_bytes: int | None = None) -> np.ndarray:
    """One IDX file (optionally gzipped) -> its array, validated against its own header.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian int32; then the data, row-major. The header is read and checked
    first: its data size must be at most ``max_bytes`` (None: ``default_max_bytes()``) and, for
    a plain file, match the file's size; a gzip member is decompressed as a stream of exactly
    that many bytes (plus one, to find trailing data), so a gz bomb costs no more memory than
    the header's honest size.
    """
    path = Path(path)
    cap = default_max_bytes() if max_bytes is None or max_bytes <= 0 else int(max_bytes)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: {len(head)} bytes is too short for an IDX header")
            if head[0] != 0 or head[1] != 0:
                raise DataError(f"{path}: bad IDX magic number 0x{head.hex()} (must start with two zero bytes)")
            code, ndim = head[2], head[3]
            if code not in IDX_DTYPES:
                raise DataError(f"{path}: IDX type code 0x{code:02x} is not supported (only 0x08, unsigned byte)")
            if ndim == 0:
                raise DataError(f"{path}: IDX header declares 0 dimensions")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: IDX header declares {ndim} dimensions but the file ends after "
                                f"{4 + len(raw_dims)} bytes")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, ">u4", ndim))  # unsigned: never negative
            want = math.prod(dims) * np.dtype(IDX_DTYPES[code]).itemsize  # Python ints: no overflow
            if want > cap:
                raise DataError(f"{path}: IDX header says shape {dims} ({want} data bytes), more than the {cap} "
                                "bytes data.max_bytes allows (refused before decompressing; raise data.max_bytes if the "
                                "file is right)")
            if opener is open and path.stat().st_size - 4 - 4 * ndim != want:
                raise DataError(f"{path}: IDX header says shape {dims} ({want} data bytes) but the file holds "
                                f"{path.stat().st_size - 4 - 4 * ndim} (truncated or wrong file)")
            data = _read_exactly(f, want, path, f"IDX header says shape {dims}")
            if f.read(1):
                raise DataError(f"{path}: IDX header says shape {dims} ({want} data bytes) but more data follow "
                                "(wrong file or trailing garbage)")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip: truncated or corrupt archives
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    return np.frombuffer(data, IDX_DTYPES[code]).reshape(dims)


def _idx_file(directory: Path, split: str, kind: str) -> Path:
    """``{split}-{images-idx3,labels-idx1}-ubyte[.gz]`` (also ``images.idx3``) in directory."""
    stem, nd = ("images", 3) if kind == "images" else ("labels", 1)
    names = [f"{split}-{stem}{sep}idx{nd}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"data.data_dir {str(directory)!r} has no {names[0]} (nor {', '.join(names[1:])})")


def _class_names(directory: Path, num_classes: int) -> tuple[str, ...]:
    listing = directory / "classes.txt"
    if listing.is_file():
        try:
            text = listing.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{listing}: cannot read it as UTF-8 text ({e})") from e
        names = tuple(l.strip() for l in text.splitlines() if l.strip())
        if len(names) < num_classes:
            raise DataError(f"{listing} names {len(names)} classes but the labels go up to {num_classes - 1}")
        return names
    if "fashion" in directory.name.lower() and num_classes == 10:
        return FASHION_MNIST_CLASSES
    return tuple(str(i) for i in range(num_classes))


def load_idx(data_dir: str | Path, max_bytes: int | None = None) -> tuple[Dataset, Dataset]:
    """The train (``train-*``) and test (``t10k-*``) splits of an IDX directory; all four files
    together hold at most ``max_bytes`` (``read_idx``)."""
    budget = default_max_bytes() if max_bytes is None or max_bytes <= 0 else int(max_bytes)
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DataError(f"data.data_dir {str(data_dir)!r} is not a directory (data.name='idx' needs the IDX files)")
    arrays = {}
    for split in ("train", "t10k"):
        images_path, labels_path = _idx_file(directory, split, "images"), _idx_file(directory, split, "labels")
        images = read_idx(images_path, max(budget, 1))
        budget -= images.nbytes
        labels = read_idx(labels_path, max(budget, 1))
        budget -= labels.nbytes
        if images.ndim != 3:
            raise DataError(f"{images_path}: images must be [N, rows, cols], the header says {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{labels_path}: labels must be [N], the header says {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"{images_path} holds no images")
        if min(images.shape[1:]) < 1:
            raise DataError(f"{images_path}: images must be at least 1x1 pixels, the header says {images.shape}")
        arrays[split] = (images[..., None], labels.astype(np.int32))
    if arrays["train"][0].shape[1:] != arrays["t10k"][0].shape[1:]:
        raise DataError(f"train images are {arrays['train'][0].shape[1:3]} but t10k images {arrays['t10k'][0].shape[1:3]}")
    num_classes = int(max(arrays["train"][1].max(), arrays["t10k"][1].max())) + 1
    names = _class_names(directory, num_classes)
    return Dataset(*arrays["train"], names), Dataset(*arrays["t10k"], names)


class _Budget:
    """What the images read so far leave: bytes under ``data.max_bytes`` and, when they are not
    resized, the size every image must have (the first one's)."""

    def __init__(self, max_bytes: int | None, image_size: int) -> None:
        self.left = default_max_bytes() if max_bytes is None or max_bytes <= 0 else int(max_bytes)
        self.cap, self.image_size, self.size, self.first = self.left, image_size, None, None

    def check(self, path: Path, im) -> None:
        """Before ``im`` (opened, not decoded) is decoded: its header's size against the others'
        and its decoded bytes (twice: the decode and its conversion) against what is left."""
        w, h = im.size
        if not self.image_size:
            if self.size is None:
                self.size, self.first = (w, h), path
            elif (w, h) != self.size:
                raise DataError(f"{path} is {w}x{h} but {self.first} is {self.size[0]}x{self.size[1]}: set "
                                "data.image_size to resize every image to one size")
        per_band = 4 if im.mode in ("I", "F", "RGBA", "CMYK") else (2 if im.mode.startswith("I;16") else 1)
        need = 2 * w * h * max(len(im.getbands()), 1) * per_band
        if need > self.left:
            raise DataError(f"{path}: a {w}x{h} {im.mode} image needs about {need} bytes to decode, more than the "
                            f"{self.left} of data.max_bytes = {self.cap} left (refused before decoding; raise "
                            "data.max_bytes if the data are right)")

    def spend(self, image: np.ndarray) -> None:
        self.left -= image.nbytes


def _read_image(path: Path, image_size: int, budget: _Budget | None = None):
    from PIL import Image, UnidentifiedImageError

    bomb = Image.DecompressionBombError  # more pixels than PIL will decode
    try:
        with Image.open(path) as im:  # reads the header only
            if budget is not None:
                budget.check(path, im)
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits (PIL's "L" clips)
                im = Image.fromarray((np.asarray(im, np.uint16) >> 8).astype(np.uint8))
            elif im.mode in ("I", "F"):
                raise DataError(
                    f"{path}: {im.mode!r} (32-bit) images have no fixed range to map to 8 bits; "
                    "convert them to 8-bit PNG/JPEG"
                )
            im = im.convert("L" if im.mode in ("1", "L") else "RGB")
            if image_size:
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            out = np.asarray(im, np.uint8)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, bomb) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
    if budget is not None:
        budget.spend(out)
    return out


def _folder_split(split_dir: Path, classes: tuple[str, ...], image_size: int,
                  budget: _Budget | None = None) -> tuple[list[np.ndarray], list[int], list[Path]]:
    images, labels, paths = [], [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a test split may lack some classes
        files = sorted(p for p in _listdir(class_dir) if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {class_dir} has no images ({'/'.join(IMAGE_SUFFIXES)})")
        for f in files:
            images.append(_read_image(f, image_size, budget))
            labels.append(label)
            paths.append(f)
    return images, labels, paths


def _listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError as e:  # e.g. no read permission
        raise DataError(f"{directory}: cannot list it ({type(e).__name__}: {e.strerror or e})") from e


def load_image_folder(root: str | Path, image_size: int = 0, max_bytes: int | None = None) -> tuple[Dataset, Dataset]:
    """``root/{train,test}/<class>/*.png|jpg|jpeg|bmp`` -> (train, test).

    Args:
      root: the data directory.
      image_size: > 0 resizes every image to image_size x image_size (PIL bicubic); 0 keeps
        them as they are, and then they must all share one size.
      max_bytes: the most bytes decoding may take (each image is checked from its header
        before it is decoded); None or 0: ``default_max_bytes()``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.data_dir {str(root)!r} is not a directory (data.name='folder' needs root/{{train,test}}/<class>/)")
    splits = {s: root / s for s in ("train", "test")}
    for s, d in splits.items():
        if not d.is_dir():
            raise DataError(f"image folder {root} has no {s}/ sub-directory")
    classes = tuple(sorted(p.name for p in _listdir(splits["train"]) if p.is_dir()))
    if len(classes) < 2:
        raise DataError(f"{splits['train']} must hold one sub-directory per class (at least 2), found {list(classes)}")
    unknown = sorted(p.name for p in _listdir(splits["test"]) if p.is_dir() and p.name not in classes)
    if unknown:
        raise DataError(f"{splits['test']} has class folders {unknown} that {splits['train']} lacks")
    budget = _Budget(max_bytes, image_size)
    loaded = {s: _folder_split(d, classes, image_size, budget) for s, d in splits.items()}
    every = loaded["train"][0] + loaded["test"][0]
    paths = loaded["train"][2] + loaded["test"][2]
    if not loaded["test"][0]:
        raise DataError(f"{splits['test']} holds no images")
    shape = every[0].shape[:2]
    for im, p in zip(every, paths):
        if im.shape[:2] != shape:
            raise DataError(
                f"{p} is {im.shape[1]}x{im.shape[0]} but {paths[0]} is {shape[1]}x{shape[0]}: set "
                "data.image_size to resize every image to one size"
            )
    grey = all(im.ndim == 2 for im in every)

    def stack(images: list[np.ndarray], labels: list[int]) -> Dataset:
        arr = np.stack([im if im.ndim == 3 else (im[..., None] if grey else np.repeat(im[..., None], 3, -1)) for im in images])
        return Dataset(arr.astype(np.uint8), np.asarray(labels, np.int32), classes)

    return stack(*loaded["train"][:2]), stack(*loaded["test"][:2])
