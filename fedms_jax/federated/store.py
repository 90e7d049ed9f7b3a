"""Persistent client states of a streamed population: a live store on disk, and incremental
checkpoints that write only the clients that changed.

``StateStore`` keeps one client state per row of one memory-mapped file per leaf
(``np.memmap``, under ``WORKDIR/client_store``). A client gets a row the first time it is
written; a client never written reads the *template* (the initial state every client starts
from, as ``algorithm.init`` makes it) and costs nothing on disk. So 100,000 clients of which a
few hundred trained take a few hundred rows, and reading a cohort is one fancy index per leaf.

``ClientCheckpoints`` makes a checkpoint of round S (``WORKDIR/client_checkpoints``) out of:

  * ``delta-S.npz``: the ids and states of the clients written since the checkpoint before;
  * ``manifest-S.npz``: for every client ever written, the delta holding its newest state.

Restoring S is the template plus, for each client in S's manifest, its row of the delta the
manifest names: bitwise the store as it was. A delta is deleted once no kept manifest names it.
Both files are written to a temporary name and renamed; ``.npz`` members carry a CRC-32 that is
checked on read, so a damaged or missing file is a ``StoreError`` naming it. The live store is
scratch (rebuilt from the checkpoint on every start), so a failed restore changes no checkpoint.

We wrote this on numpy rather than use tensorstore or array_record: a client state is a fixed
set of small dense arrays read and written whole, by client id, with a template for clients
never written -- a memory-mapped row per client is exactly that, with no chunk or record
framing, and numpy is already a dependency. orbax keeps the server state; its step retention
would delete deltas a later manifest still needs, so the deltas live beside it.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedms_jax import storage
from fedms_jax.data.dataset import DataError

PyTree = Any


class StoreError(DataError):
    """A client-store file is missing, damaged or does not match the run (names the file)."""


def _leaves(tree: PyTree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


class StateStore:
    """Every client's persistent state: rows of memory-mapped files, a template for the rest.

    Args:
      directory: where the row files go (created empty; whatever was there is removed).
      template: one client's initial state (a pytree of arrays, no client axis).
      num_clients: the population.
      capacity: rows allocated at first (the files grow by doubling).
    """

    def __init__(self, directory: str | Path, template: PyTree, num_clients: int, capacity: int = 64) -> None:
        self.directory = Path(directory)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self.template = jax.tree_util.tree_map(np.asarray, template)
        self.treedef = jax.tree_util.tree_structure(self.template)
        self.num_clients = int(num_clients)
        storage.check_fits(8 * self.num_clients, f"the client store's index of {self.num_clients} clients",
                           "use fewer clients (config.data.num_clients)")
        self.slot = np.full(self.num_clients, -1, np.int64)  # client -> row, -1: never written
        self.written = 0  # rows in use
        self.dirty: set[int] = set()  # clients written since the last checkpoint
        self.bytes_per_client = sum(x.nbytes for x in _leaves(self.template))
        self._files: list[np.memmap] = []
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        """(Re)maps every leaf's file with room for ``capacity`` rows (existing rows kept)."""
        files = []
        for i, leaf in enumerate(_leaves(self.template)):
            path = self.directory / f"leaf_{i}.bin"
            # The blocks are allocated now (not sparse): a write through the map to a page the
            # disk cannot back would kill the process with SIGBUS; this raises StorageError.
            with open(path, "ab") as f:
                storage.reserve(f.fileno(), capacity * max(leaf.nbytes, 1), path,
                                f"the client store ({capacity} rows of {leaf.nbytes} bytes)")
            files.append(np.memmap(path, dtype=leaf.dtype, mode="r+", shape=(capacity,) + leaf.shape))
        self._files = files
        self.capacity = capacity

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_clients):
            raise ValueError(f"client ids must be in [0, {self.num_clients}), got {ids}")
        return ids

    def read(self, ids: np.ndarray) -> PyTree:
        """The states of ``ids`` stacked [len(ids), ...] (host arrays, freshly allocated)."""
        ids = self._check_ids(ids)
        slots = self.slot[ids]
        have = slots >= 0
        out = []
        for leaf, rows in zip(_leaves(self.template), self._files):
            x = np.empty((len(ids),) + leaf.shape, leaf.dtype)
            x[:] = leaf
            if have.any():
                x[have] = rows[slots[have]]
            out.append(x)
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def write(self, ids: np.ndarray, states: PyTree) -> None:
        """Stores the states [len(ids), ...] of ``ids`` (distinct), allocating rows for new clients."""
        ids = self._check_ids(ids)
        leaves = _leaves(states)
        if len(leaves) != len(self._files):
            raise ValueError(f"states have {len(leaves)} leaves, the store {len(self._files)}")
        for x, leaf in zip(leaves, _leaves(self.template)):  # before any row is allocated
            if x.shape != (len(ids),) + leaf.shape:
                raise ValueError(f"a state leaf of shape {x.shape} for {len(ids)} clients of {leaf.shape}")
        new = ids[self.slot[ids] < 0]
        if len(new):
            if self.written + len(new) > self.capacity:
                self._grow(max(2 * self.capacity, self.written + len(new)))
            self.slot[new] = self.written + np.arange(len(new))
            self.written += len(new)
        slots = self.slot[ids]
        for rows, x in zip(self._files, leaves):
            rows[slots] = x
        self.dirty.update(int(i) for i in ids)

    def written_ids(self) -> np.ndarray:
        """Every client with a row (trained at least once), ascending."""
        return np.flatnonzero(self.slot >= 0)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the rows in use."""
        return self.written * self.bytes_per_client

    def close(self) -> None:
        for f in self._files:
            f.flush()
        self._files = []


# --- incremental checkpoints ------------------------------------------------------------------
def _save_npz(path: Path, **arrays: np.ndarray) -> int:
    """Writes ``path`` atomically (``storage.atomic_file``); -> its size in bytes."""
    with storage.atomic_file(path, f"the client checkpoint {path.name}", sum(a.nbytes for a in arrays.values())) as f:
        np.savez(f, **arrays)
    return path.stat().st_size


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every member of ``path`` read in full (so its CRC is checked), or a StoreError naming it."""
    if not path.is_file():
        raise StoreError(f"client-store file {path} ({what}) is missing: the checkpoint cannot be restored; "
                         "restore the file or start the run in a new --workdir")
    try:
        with zipfile.ZipFile(path) as archive:  # numpy reads a member without checking its CRC-32
            bad = archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} fails its CRC-32 check")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise StoreError(f"client-store file {path} ({what}) is damaged ({type(e).__name__}: {e}): the checkpoint "
                         "cannot be restored; restore the file or start the run in a new --workdir") from None


class ClientCheckpoints:
    """The client half of a streamed population's checkpoints (see the module docstring).

    ``directory``: ``WORKDIR/client_checkpoints``. ``manifest``: {client id: delta step} of the
    newest checkpoint written or restored (what the next delta adds to).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest: dict[int, int] = {}
        if self.directory.is_dir():  # a run killed mid-write leaves its temporary files: never restorable
            for tmp in self.directory.glob(".*.npz.*.tmp"):
                tmp.unlink(missing_ok=True)

    def manifest_path(self, step: int) -> Path:
        return self.directory / f"manifest-{step}.npz"

    def delta_path(self, step: int) -> Path:
        return self.directory / f"delta-{step}.npz"

    def save(self, step: int, store: StateStore) -> dict[str, int]:
        """Writes the clients written since the last checkpoint (``store.dirty``) as ``delta-step``
        and the manifest of ``step``; -> {'clients': written now, 'bytes': bytes written}."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ids = np.array(sorted(store.dirty), np.int64)
        leaves = _leaves(store.read(ids))
        size = _save_npz(self.delta_path(step), ids=ids, **{f"leaf_{i}": x for i, x in enumerate(leaves)})
        manifest = {**self.manifest, **{int(i): step for i in ids}}
        order = np.array(sorted(manifest), np.int64)
        size += _save_npz(self.manifest_path(step), ids=order,
                          steps=np.array([manifest[i] for i in order], np.int64),
                          num_clients=np.int64(store.num_clients), leaves=np.int64(len(leaves)))
        self.manifest = manifest
        store.dirty.clear()
        return {"clients": int(len(ids)), "bytes": int(size)}

    def prune(self, kept: list[int]) -> None:
        """Deletes manifests of steps not in ``kept`` and deltas no kept manifest names."""
        if not self.directory.is_dir():
            return
        needed: set[int] = set()
        for step in kept:
            path = self.manifest_path(step)
            if path.is_file():
                needed.update(int(s) for s in _load_npz(path, f"manifest of round {step}")["steps"])
                needed.add(step)
        for path in self.directory.glob("*.npz"):
            kind, _, step = path.stem.partition("-")
            if step.isdigit() and int(step) not in (set(kept) if kind == "manifest" else needed):
                path.unlink()

    def restore(self, step: int, store: StateStore) -> None:
        """Fills ``store`` (fresh: every client at the template) with checkpoint ``step``'s
        clients, one delta at a time (each read in full and checked before its rows are
        written). Only the live store is written to, and it is scratch, rebuilt from a
        checkpoint on every start: a failed restore leaves every checkpoint file as it was."""
        manifest = _load_npz(self.manifest_path(step), f"manifest of round {step}")
        if "ids" not in manifest or "steps" not in manifest or int(manifest.get("num_clients", -1)) != store.num_clients:
            raise StoreError(f"client-store file {self.manifest_path(step)} is not a manifest of this run's "
                             f"{store.num_clients} clients")
        ids, steps = manifest["ids"], manifest["steps"]
        n = len(_leaves(store.template))
        for delta in np.unique(steps):
            want = ids[steps == delta]
            path = self.delta_path(int(delta))
            z = _load_npz(path, f"client states written by round {int(delta)}")
            if "ids" not in z or any(f"leaf_{i}" not in z for i in range(n)):
                raise StoreError(f"client-store file {path} does not hold this run's client states")
            rows = np.minimum(np.searchsorted(z["ids"], want), max(len(z["ids"]) - 1, 0))
            if len(z["ids"]) == 0 or np.any(z["ids"][rows] != want):
                raise StoreError(f"client-store file {path} lacks clients that {self.manifest_path(step)} names")
            try:
                store.write(want, jax.tree_util.tree_unflatten(store.treedef, [z[f"leaf_{i}"][rows] for i in range(n)]))
            except ValueError as e:
                raise StoreError(f"client-store file {path} does not hold this run's client states ({e})") from None
        store.dirty.clear()
        self.manifest = {int(i): int(s) for i, s in zip(ids, steps)}
