"""Where a population's clients live: on the devices, or streamed from the host and disk.

``population.mode`` (``choose_mode``):

* ``device``: every client's padded data and persistent state are device arrays (the engine's
  ``data``; ``ClientStates`` stacked over all clients); a round gathers its cohort inside the
  round program. The fastest, for populations that fit.
* ``streamed`` (``Streamed``): the data stay on the host, unpadded (``data.clients.FlatClients``),
  the states on disk (``federated.store.StateStore``); the devices hold one cohort. Per round:

    1. the cohort's data, padded to the smallest bucket holding its largest client
       (``data.clients.bucket_sizes``), and its states are gathered on the host and transferred;
       with ``population.prefetch`` this happens for round t + 1 in a background thread while
       round t runs;
    2. the round program runs on the cohort's arrays (``Engine.run_round(..., data=)``: the same
       program body as the device mode, reading rows ``0 .. cohort - 1`` instead of the ids);
    3. the cohort's new states come back to the host and are written to the store in the same
       background thread (in order: a gather queued after a write reads it). A client in both
       round t's and round t + 1's cohort was gathered for t + 1 before t's write: its row is
       replaced by t's new state before the transfer.

  Checkpoints hold the server state (orbax) and the clients written since the checkpoint before
  (``federated.store.ClientCheckpoints``). Streamed and device rounds are the same computation:
  with one bucket (the device mode's padded size) they are bitwise equal (tested); with several,
  a cohort's padding changes, which changes no draw (a client's batches, held-out slice and
  epoch orders are prefixes of the same streams) but can change float sums' order inside XLA's
  kernels, and with ``client.epochs`` and an lr schedule the number of steps.

Both kinds are a **population** with one small interface, so the run loop never asks which it
has: ``run_round(server, t, phase, ids, **inputs) -> (server, metrics)``, ``finish_round()`` (after the
metrics are read), ``read(ids)`` (states; None: all), ``orbax_state()`` (what the server's
orbax checkpoint holds of them), ``checkpoint(step)`` (what is written beside it, before it),
``restore(step, restored)``, ``prune(steps)``, ``stop()``, and ``final()`` (what a finished run
returns: ``ClientStates`` on the devices, the ``Streamed`` population itself).

``eval_ids``: personalised evaluation over a seeded sample of clients when the population is
large (``population.eval_sample``), the same sample at every evaluation.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable

import jax
import numpy as np

from fedms_jax import rng
from fedms_jax.data.clients import ClientData, FlatClients, bucket_of
from fedms_jax.federated.store import ClientCheckpoints, StateStore
from fedms_jax.federated.types import ClientStates
from fedms_jax.rng import Stream

PyTree = Any
AUTO_MAX_CLIENTS = 10_000  # auto: streamed beyond this many clients
AUTO_MEMORY_SHARE = 0.25  # auto: streamed when the device copy needs more of a device's memory
AUTO_EVAL_CLIENTS = 1024  # eval_sample = 0: every client up to this many, else a sample of this many


def device_memory_bytes(device) -> int:
    """A device's memory: its allocator's limit on GPU/TPU; on CPU the host's RAM."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_mode(mode: str, num_clients: int, device_bytes: int, memory: int) -> str:
    """``population.mode`` resolved: ``auto`` is streamed when the population exceeds
    ``AUTO_MAX_CLIENTS`` or its device copy (``device_bytes``: every client's padded data and
    state) would take more than ``AUTO_MEMORY_SHARE`` of ``memory``, else device."""
    if mode != "auto":
        return mode
    return "streamed" if num_clients > AUTO_MAX_CLIENTS or device_bytes > AUTO_MEMORY_SHARE * memory else "device"


def eval_ids(seed: int, num_clients: int, sample: int) -> np.ndarray | None:
    """The clients of personalised evaluation, ascending: None for every client (``sample`` 0
    with at most ``AUTO_EVAL_CLIENTS`` clients, or ``sample >= num_clients``), else a uniform
    sample without replacement from the stream (seed, EVAL_SAMPLE)."""
    n = sample or (num_clients if num_clients <= AUTO_EVAL_CLIENTS else AUTO_EVAL_CLIENTS)
    if n >= num_clients:
        return None
    return np.sort(rng.numpy(seed, Stream.EVAL_SAMPLE).choice(num_clients, n, replace=False)).astype(np.int32)


def cohort_bucket(sizes: tuple[int, ...], counts: np.ndarray, ids: np.ndarray) -> int:
    """The padded size of the cohort ``ids``: the smallest of ``sizes`` holding its largest client."""
    return bucket_of(sizes, int(counts[np.asarray(ids)].max()))


def cohort_data_like(data: FlatClients, sizes: tuple[int, ...], ids: np.ndarray) -> ClientData:
    """The shapes of the cohort ``ids``' data, padded to its bucket (what its round program is
    compiled for)."""
    size, m, x = cohort_bucket(sizes, data.counts, ids), len(ids), data.inputs
    return ClientData(images=jax.ShapeDtypeStruct((m, size) + x.shape[1:], x.dtype),
                      labels=jax.ShapeDtypeStruct((m, size), np.int32), counts=jax.ShapeDtypeStruct((m,), np.int32))


def template_states(init: Callable[[jax.Array, int], tuple], key: jax.Array) -> tuple[PyTree, ClientStates]:
    """(server state, one client's initial state) from ``algorithm.init`` run for one client:
    every algorithm starts every client from the same state, so this row stands for all."""
    server, clients = jax.jit(init, static_argnums=1)(key, 1)
    one = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), clients)
    return server, one


class Device:
    """Every client's data and stacked state on the devices (``population.mode = device``); the
    engine's data hold every client, and a round gathers its cohort inside the program."""

    def __init__(self, engine, states: ClientStates) -> None:
        self.engine, self.states = engine, states

    def run_round(self, server, t: int, phase, ids: np.ndarray, **inputs):
        server, self.states, metrics = self.engine.run_round(server, self.states, t, phase, ids, **inputs)
        return server, metrics

    def finish_round(self) -> None:
        """Nothing to do: the new states are already where the next round reads them."""

    def read(self, ids: np.ndarray | None) -> ClientStates:
        if ids is None:
            return self.states
        ids = jax.numpy.asarray(ids)
        return jax.tree_util.tree_map(lambda x: x[ids], self.states)

    def orbax_state(self) -> dict:
        return {"clients": self.states}

    def checkpoint(self, step: int) -> dict:
        """Nothing beside the orbax checkpoint (the states are in it)."""
        return {}

    def restore(self, step: int, restored: dict) -> None:
        self.states = self.engine.place(restored["clients"])

    def prune(self, steps) -> None:
        """Nothing beside orbax's own retention."""

    def stop(self) -> None:
        """Nothing runs in the background."""

    def final(self) -> ClientStates:
        return self.states


class Streamed:
    """A streamed population's clients (see the module docstring).

    Args:
      engine: the run's ``Engine`` (built with ``data=None``).
      data: every client's training data on the host.
      store: the clients' persistent states (``StateStore``).
      checkpoints: the incremental client checkpoints.
      sizes: the padded sizes a cohort can take (``bucket_sizes``).
      cohort: round index -> that round's cohort ids.
      rounds: the run's rounds (no prefetch past the last).
      prefetch: gather round t + 1's cohort while round t runs.
    """

    def __init__(self, engine, data: FlatClients, store: StateStore, checkpoints: ClientCheckpoints,
                 sizes: tuple[int, ...], cohort: Callable[[int], np.ndarray], rounds: int, prefetch: bool = True) -> None:
        self.engine, self.data, self.store, self.checkpoints = engine, data, store, checkpoints
        self.sizes, self.cohort, self.rounds, self.prefetch = sizes, cohort, rounds, prefetch
        self._io: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="client-store")
        self._next: tuple[int, np.ndarray, concurrent.futures.Future] | None = None  # a prefetch: round, ids
        self._writes: list[concurrent.futures.Future] = []  # write-backs queued (their errors are raised)
        self._out: tuple[np.ndarray, PyTree] | None = None  # the last round's (ids, new states on device)
        self._last: tuple[np.ndarray, PyTree] | None = None  # the last round's (ids, new states on the host)
        self.counts = data.counts

    def _gather(self, ids: np.ndarray) -> tuple[PyTree, ClientData]:
        """(host states, device data) of a cohort: runs in the store's thread."""
        data = self.engine.place_cohort(self.data.gather(ids, cohort_bucket(self.sizes, self.counts, ids)))
        return self.store.read(ids), data

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        if self._io is None:
            raise RuntimeError("this streamed population was stopped (its run ended)")
        return self._io.submit(fn, *args)

    def _inputs(self, t: int, ids: np.ndarray) -> tuple[PyTree, ClientData]:
        if self._next is not None and self._next[0] == t and np.array_equal(self._next[1], ids):
            future = self._next[2]
        else:  # no prefetch (or a resume): gathered now, after every write queued before it
            future = self._submit(self._gather, ids)
        self._next = None
        self._check_writes()
        states, data = future.result()
        if self._last is not None:  # clients of the round before: gathered before its write
            prev_ids, prev_states = self._last
            common, here, there = np.intersect1d(ids, prev_ids, assume_unique=True, return_indices=True)
            if len(common):
                states = jax.tree_util.tree_map(lambda s, p: _set_rows(s, here, p[there]), states, prev_states)
        return states, data

    def run_round(self, server, t: int, phase, ids: np.ndarray, **inputs):
        """Round t over the cohort ``ids`` (``inputs``: ``Engine.run_round``'s depth, buffered) ->
        (server, metrics); the cohort's new states are kept until ``finish_round`` (after the
        caller has read the metrics)."""
        ids = np.asarray(ids, np.int32)
        states, data = self._inputs(t, ids)
        server, new_states, metrics = self.engine.run_round(server, states, t, phase, ids, data, **inputs)
        if self.prefetch and t + 1 < self.rounds:  # runs while the round does
            following = np.asarray(self.cohort(t + 1), np.int32)
            self._next = (t + 1, following, self._submit(self._gather, following))
        self._out = (ids, new_states)
        return server, metrics

    def finish_round(self) -> None:
        """Brings the last round's new states to the host and queues their write."""
        if self._out is None:
            return
        ids, states = self._out
        host = jax.tree_util.tree_map(np.asarray, jax.device_get(states))
        self._writes.append(self._submit(self.store.write, ids, host))
        self._last, self._out = (ids, host), None

    def _check_writes(self) -> None:
        """Raises the error of any write-back that failed (it would lose those clients' states)."""
        done = [f for f in self._writes if f.done()]
        self._writes = [f for f in self._writes if not f.done()]
        for f in done:
            f.result()

    def flush(self) -> None:
        """Waits until every write queued is in the store (a prefetch in flight may stay),
        raising a failed write's error."""
        writes, self._writes = self._writes, []
        for f in writes:
            f.result()

    def read(self, ids: np.ndarray | None) -> PyTree:
        """The current states of ``ids`` (None: every client; host arrays), after the queued writes."""
        self.flush()
        return self.store.read(np.arange(len(self.counts)) if ids is None else ids)

    def checkpoint(self, step: int) -> dict[str, int]:
        """Writes the clients changed since the last checkpoint (``ClientCheckpoints.save``)."""
        self.flush()
        return self.checkpoints.save(step, self.store)

    def orbax_state(self) -> dict:
        """Nothing: the client states are checkpointed beside orbax's (``checkpoint``)."""
        return {}

    def restore(self, step: int, restored: dict) -> None:
        """The checkpoint's manifest of step ``step`` and the deltas it names, into the store."""
        self.checkpoints.restore(step, self.store)

    def prune(self, steps) -> None:
        """Deletes the client files no checkpoint of ``steps`` needs."""
        self.checkpoints.prune(list(steps))

    def final(self) -> "Streamed":
        return self

    def stop(self) -> None:
        """Ends the background thread after the queued work (a run's end); reads still work."""
        if self._io is not None:
            self._next = None
            self._io.shutdown(wait=True)
            self._io = None
            self.flush()

    def close(self) -> None:
        self.stop()
        self.store.close()


def _set_rows(x: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    x = np.array(x)
    x[rows] = values
    return x
