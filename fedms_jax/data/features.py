"""The frozen stem's tokens of a dataset: computed once per image, optionally cached on disk.

With ``model.frozen_blocks = F`` no method puts LoRA below block F, so the output of the
embeddings and blocks ``[0, F)`` is a fixed function of the image. ``FrozenStem`` is that
function (uint8 images [N, h, w, c] -> float32 tokens [N, T, D], preprocessing included, in
jitted batches); ``run.build`` replaces the train and test images by their tokens before the
clients' arrays are stacked, and the federated model is the backbone's top ``L - F`` blocks
(``VisionSpec.split``).

``stem_tokens(stem, images, cache_dir)`` keeps the tokens in ``cache_dir/<key>.npy`` where the
key is a SHA-256 of everything they depend on: the image bytes (after subsampling), the stem's
parameters (every leaf's path, shape, dtype and bytes), its spec (geometry, F, flavour), the
compute dtype, the normalisation statistics and this module's format version. A file is written
to a temporary name in the same directory and renamed (``os.replace``), so the final name never
holds a half-written file, and the SHA-256 of its content is then written beside it
(``<key>.sha256``); a file that cannot be read, has the wrong shape or dtype (read from its
header first), does not match its content hash, or holds non-finite values is recomputed and
rewritten.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedms_jax import storage
from fedms_jax.data.preprocess import preprocess
from fedms_jax.models.vision import VisionSpec, VisionTransformer

PyTree = Any
FORMAT = "fedms_jax stem tokens v1"  # bump when the stem's math changes (old files then miss)


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenStem:
    """Embeddings + the frozen blocks ``[0, F)`` of a backbone, without LoRA.

    Attributes:
      spec: the stem's spec (``VisionSpec.split(F)[0]``: images in, F blocks).
      params: its ``'params'`` (``vision.split_params(backbone, F)[0]``).
      stats: (mean, std) of the input normalisation.
      dtype: the computation dtype (the tokens are returned as float32 whatever it is).
    """

    spec: VisionSpec
    params: PyTree
    stats: tuple[tuple[float, ...], tuple[float, ...]]
    dtype: Any = jnp.float32

    @property
    def frozen_blocks(self) -> int:
        return self.spec.num_layers

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, D) of one image's tokens."""
        return self.spec.num_tokens, self.spec.encoder.hidden_size

    def apply(self, params: PyTree, images: jax.Array) -> jax.Array:
        """uint8 images [B, h, w, c] -> float32 tokens [B, T, D] (pure; resize, normalise, embed,
        blocks [0, F))."""
        s = self.spec
        mean, std = self.stats
        x = preprocess(images, s.image_size, mean, std, s.num_channels)
        module = VisionTransformer(s, None, self.dtype)
        return module.apply({"params": params}, x, method=VisionTransformer.hidden_states).astype(jnp.float32)

    @functools.cached_property
    def _jitted(self) -> Callable:
        return jax.jit(self.apply)

    def tokens(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 images [N, h, w, c] -> float32 tokens [N, T, D], ``batch_size`` images per
        jitted call (the last batch padded, so one program is compiled)."""
        n = images.shape[0]
        out = np.empty((n,) + self.token_shape, np.float32)
        b = max(1, min(batch_size, n))
        for lo in range(0, n, b):
            batch = images[lo:lo + b]
            real = batch.shape[0]
            if real < b:
                batch = np.concatenate([batch, np.zeros((b - real,) + batch.shape[1:], batch.dtype)])
            out[lo:lo + real] = np.asarray(self._jitted(self.params, batch))[:real]
        return out

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of what the tokens depend on besides the images: format, spec, dtype, stats,
        and every parameter leaf (path, shape, dtype, bytes)."""
        h = hashlib.sha256()
        h.update(repr((FORMAT, self.spec, jnp.dtype(self.dtype).name, self.stats)).encode())
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            x = np.ascontiguousarray(np.asarray(leaf))
            h.update(repr((jax.tree_util.keystr(path), x.shape, x.dtype.str)).encode())
            h.update(memoryview(x).cast("B"))
        return h.hexdigest()


def cache_key(stem: FrozenStem, images: np.ndarray) -> str:
    """The cache key of ``images``' tokens: SHA-256 of the stem's fingerprint and the images'
    shape, dtype and bytes."""
    x = np.ascontiguousarray(images)
    h = hashlib.sha256()
    h.update(stem.fingerprint.encode())
    h.update(repr((x.shape, x.dtype.str)).encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def write_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file next to ``path``, fsync, then ``os.replace``
    (``storage.atomic_file``): ``path`` is either absent, its old content, or the whole new
    array, never part of one."""
    with storage.atomic_file(path, f"the feature cache file {path.name}", array.nbytes) as f:
        np.save(f, array, allow_pickle=False)


def content_hash(array: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (what ``<key>.sha256`` holds)."""
    x = np.ascontiguousarray(array)
    h = hashlib.sha256(repr((x.shape, x.dtype.str)).encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def digest_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def read_cached(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """(the array in ``path`` if it is a float32 array of ``shape`` with finite values whose
    content hash is the one written beside it (``<key>.sha256``), else None; why not)."""
    if not path.exists():
        return None, "absent"
    x = None
    try:
        with open(path, "rb") as f:  # the header first: a damaged shape cannot make a huge read
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header_shape, _, dtype = read_header(f)
            if tuple(header_shape) != shape or dtype != np.float32:
                return None, f"holds {dtype} {tuple(header_shape)}, expected float32 {shape}"
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return None, f"unreadable ({e})"
    if x.shape != shape or x.dtype != np.float32:
        return None, f"holds {x.dtype} {x.shape}, expected float32 {shape}"
    try:
        written = digest_path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None, "has no content hash beside it (an interrupted write)"
    if written != content_hash(x):
        return None, "does not match its content hash (damaged)"
    if not np.isfinite(x).all():
        return None, "holds non-finite values"
    return x, "ok"


def stem_tokens(
    stem: FrozenStem, images: np.ndarray, cache_dir: str | os.PathLike | None = None, *,
    name: str = "images", batch_size: int = 256, log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """uint8 images [N, h, w, c] -> float32 tokens [N, T, D]: read from ``cache_dir`` when a
    valid file of this key is there, else computed (and written there, when a directory is
    given). ``log`` gets one line saying which (``name`` says which set)."""
    say = log or (lambda message: None)
    shape = (images.shape[0],) + stem.token_shape
    what = f"the {name}' tokens {list(shape)} (blocks [0, {stem.frozen_blocks}))"
    path = Path(cache_dir).expanduser() / f"{cache_key(stem, images)}.npy" if cache_dir else None
    why = "absent"
    if path is not None:
        cached, why = read_cached(path, shape)
        if cached is not None:
            say(f"feature cache: read {what} from {path}")
            return cached
    start = time.perf_counter()
    out = stem.tokens(images, batch_size)
    seconds = time.perf_counter() - start
    if path is None:
        say(f"frozen stem: computed {what} in {seconds:.1f} s (data.feature_cache is empty: not kept)")
        return out
    write_atomic(path, out)
    with storage.atomic_file(digest_path(path), "the feature cache's content hash") as f:
        f.write((content_hash(out) + "\n").encode())  # after the tokens: a file without its hash is never read
    note = "" if why == "absent" else f"; the file there {why}"
    say(f"feature cache: computed {what} in {seconds:.1f} s, wrote {path}{note}")
    return out
