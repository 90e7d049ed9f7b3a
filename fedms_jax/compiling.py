"""Compiling a run's programs: ahead of time, in parallel threads, through a persistent cache.

A run knows every program it will need before its first round: one round program per phase of
the schedule (with budget tiers, still one per phase) and the evaluation programs of the phases
it evaluates in. ``Programs`` lowers and compiles them in background threads (JAX's AOT API:
``jit(f).lower(abstract arguments).compile()``) while the first rounds run, in the order the run
will need them, and hands each executable over when its round comes; a program nobody asked for
ahead is compiled on demand the same way. XLA's compiler releases the GIL, so compiles overlap
each other and the rounds; tracing and lowering hold it.

``configure_cache`` turns on JAX's persistent compilation cache (every program, however quick
to compile): a repeated or resumed run finds its executables there and compiles nothing.
``CompileLog`` counts compilations and cache hits from ``jax.monitoring`` events.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Hashable

import jax

PyTree = Any
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # fires for cache hits too
CACHE_HITS = "/jax/compilation_cache/cache_hits"
DEFAULT_CACHE = Path("~/.cache/fedms_jax/jax")


def cache_directory(directory: str = "") -> Path:
    """``directory`` if given, else ``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/fedms_jax/jax``
    (``$XDG_CACHE_HOME/fedms_jax/jax`` when that is set)."""
    if directory:
        return Path(directory).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fedms_jax" / "jax"
    return DEFAULT_CACHE.expanduser()


def configure_cache(enabled: bool, directory: str = "") -> Path | None:
    """Points JAX's persistent compilation cache at ``cache_directory(directory)`` (every program
    cached, whatever its compile time or size), or turns it off. Takes effect for the next compile
    even if the process compiled before. Returns the directory, or None when off."""
    from jax._src import compilation_cache

    path = cache_directory(directory) if enabled else None
    current = jax.config.jax_compilation_cache_dir
    if (str(path) if path else None) == current:
        return path
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as e:  # a cache is an optimisation: run without one rather than fail
            warnings.warn(f"compile.cache_dir {str(path)!r} cannot be used ({e}); running without a "
                          "persistent compilation cache", stacklevel=2)
            return configure_cache(False)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_dir", str(path) if path else None)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache
    return path


class CompileLog:
    """Counts XLA compilations (and persistent-cache hits) while it is open, in every thread.

    ``compiles``: programs XLA compiled (a cache hit is no compile); ``hits``: executables read
    from the persistent cache; ``seconds``: time in XLA's compiler or reading the cache."""

    def __init__(self) -> None:
        self.events, self.hits, self.seconds = 0, 0, 0.0
        self.by_thread: collections.Counter[str] = collections.Counter()  # compiles + hits per thread
        self._lock = threading.Lock()

    @property
    def compiles(self) -> int:
        return self.events - self.hits

    def _duration(self, name: str, secs: float, **_: Any) -> None:
        if name == BACKEND_COMPILE:
            with self._lock:
                self.events += 1
                self.seconds += secs
                self.by_thread[threading.current_thread().name] += 1

    def _event(self, name: str, **_: Any) -> None:
        if name == CACHE_HITS:
            with self._lock:
                self.hits += 1

    def __enter__(self) -> "CompileLog":
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"compiles": self.compiles, "cache_hits": self.hits, "compile_seconds": self.seconds}


def abstract(tree: PyTree, sharding: Any = None) -> PyTree:
    """ShapeDtypeStructs of ``tree``'s arrays, with ``sharding`` (default: each array's own)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None)), tree)


def shapes(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs of ``tree``'s arrays with no sharding (to be laid out anew)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@dataclasses.dataclass
class Timing:
    """One program's compile: when it was asked for, lowered (traced) and compiled, in seconds of
    ``time.perf_counter``; ``ahead``: submitted before it was needed."""

    key: Hashable
    ahead: bool
    submitted: float
    lower_s: float = 0.0
    compile_s: float = 0.0
    done: float = 0.0
    waited_s: float = 0.0  # how long the run stood still waiting for it


def default_threads() -> int:
    """Half the host's cores, 1 to 8: the other half runs the rounds (and XLA's own threads)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class Programs:
    """Executables by key, each lowered and compiled once: ahead in a thread pool (``submit``) or
    on demand (``get``). ``threads=0`` compiles everything on demand, in the caller's thread."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads
        self._closed = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fedms-compile") if threads else None
        self._futures: dict[Hashable, Future] = {}
        self.timings: dict[Hashable, Timing] = {}
        self._lock = threading.Lock()

    def _compile(self, timing: Timing, lower: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        lowered = lower()
        timing.lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        timing.done = time.perf_counter()
        timing.compile_s = timing.done - start - timing.lower_s
        return compiled

    def _future(self, key: Hashable, lower: Callable[[], Any], ahead: bool) -> tuple[Future, bool]:
        with self._lock:
            if key in self._futures and self._futures[key].cancelled():  # dropped by close()
                del self._futures[key]
            if key in self._futures:
                return self._futures[key], False
            timing = self.timings[key] = Timing(key, ahead, time.perf_counter())
            if ahead and self._pool is not None:
                future = self._pool.submit(self._compile, timing, lower)
                self._futures[key] = future
                return future, False
            future = self._futures[key] = Future()
        return future, True  # the caller compiles it

    def submit(self, key: Hashable, lower: Callable[[], Any]) -> None:
        """Starts compiling ``key`` in the background (nothing if it is known already)."""
        if self._pool is None or self._closed:
            return
        self._future(key, lower, ahead=True)

    def get(self, key: Hashable, lower: Callable[[], Any]) -> Any:
        """The executable of ``key``: waits for its background compile, or compiles it now."""
        future, mine = self._future(key, lower, ahead=False)
        if mine:
            try:
                future.set_result(self._compile(self.timings[key], lower))
            except BaseException as e:
                future.set_exception(e)
                with self._lock:  # a later call retries rather than re-raising a stale error
                    del self._futures[key]
                raise
            return future.result()
        start = time.perf_counter()
        result = future.result()
        self.timings[key].waited_s += time.perf_counter() - start
        return result

    def __contains__(self, key: Hashable) -> bool:
        return key in self._futures

    def close(self) -> None:
        """Drops compiles not yet started (a finished run needs none of them)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def report(self) -> list[dict]:
        """Per program: key, ahead, lower and compile seconds, seconds the run waited for it."""
        return [{"program": repr(t.key), "ahead": t.ahead, "lower_s": round(t.lower_s, 3),
                 "compile_s": round(t.compile_s, 3), "waited_s": round(t.waited_s, 3)}
                for t in self.timings.values()]
