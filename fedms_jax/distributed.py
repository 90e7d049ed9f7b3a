"""Multi-host start-up: ``jax.distributed.initialize`` when the environment asks for it.

On TPU pods and SLURM/Kubernetes clusters ``jax.distributed.initialize()`` finds the
coordinator itself; elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (with ``JAX_LOCAL_DEVICE_IDS`` optional), or pass
``--multihost``. On CPU the processes talk through gloo collectives.

Once initialised, ``jax.devices()`` lists every process's devices, the 'clients' mesh axis spans
them all, each process computes its share of the cohort, and only process 0 writes metrics
(checkpoints are written by orbax, which coordinates the processes itself).

Agreement. Decisions that change what every process does next (stop after this round on a
signal; skip an unreadable checkpoint) are agreed through the coordination service's key-value
store (``all_gather_ints``): each process posts its value under a key named for the decision
and reads everyone's, waiting at most ``timeout_s``. A process that died without a word is
therefore noticed within a bounded time: by the agreement's deadline, by a collective whose
peer connection broke, or by the coordination service's heartbeat timeout (``timeout_s`` as
well); each ends as ``PeerLost`` with a message, never a hang.

A signal during start-up (before the rounds, where there is no agreement point to stop at) is
told to every process (``forward_startup_signals``): the signalled process posts it to the
key-value store as it stops, and a watcher thread in each of the others, polling that key,
sends its own process the same signal (or, if its main thread is blocked in a collective
with the process that left, ends the process itself). So all of them stop together and meet in
``jax.distributed``'s shutdown barrier; otherwise the barrier times out on the processes still
starting up and XLA's coordination service aborts every process (SIGABRT, a C++ stack trace).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
DEFAULT_TIMEOUT_S = 300
_timeout_s = DEFAULT_TIMEOUT_S  # set by maybe_initialize
_calls = 0  # all_gather_ints calls so far (the same sequence on every process)
_previous: str | None = None  # this process's key of the previous call (deleted once all have read it)
_runs = 0  # forward_startup_signals calls so far (the same sequence on every process)
_POLL_S = 0.25
_STUCK_S = 5.0  # after a forwarded signal, how long the main thread may take to act on it
_TRANSPORT_WORDS = ("Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "UNAVAILABLE",
                    "DEADLINE_EXCEEDED", "heartbeat")


class PeerLost(RuntimeError):
    """Another process of a multi-process job stopped answering (died, was killed, or hangs)."""


def maybe_initialize(force: bool = False, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Initialises ``jax.distributed`` if ``force`` or ``JAX_COORDINATOR_ADDRESS`` is set.

    ``timeout_s``: how long a process waits for the others at an agreement point, and the
    coordination service's heartbeat timeout (a process silent that long is declared dead).
    Returns whether it initialised. Must run before any other JAX call.
    """
    global _timeout_s
    _timeout_s = int(timeout_s)
    if not force and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    import jax

    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in _ENV if not os.environ.get(k)]
        if missing:
            raise ValueError(f"multi-host start-up needs {list(_ENV)}; missing {missing}")
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    # Only the CPU client reads this; asking for the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # initialization_timeout too: a process stopped before it connected must not keep the others
    # waiting for jax's default five minutes.
    # The shutdown barrier waits twice as long as any wait of a live process (an agreement or a
    # collective gives up after ``timeout_s``), so processes that stop together meet there.
    jax.distributed.initialize(**kwargs, initialization_timeout=_timeout_s,
                               heartbeat_timeout_seconds=_timeout_s, shutdown_timeout_seconds=2 * _timeout_s)
    return True


def timeout_s() -> int:
    """The agreement timeout in seconds (``maybe_initialize``'s)."""
    return _timeout_s


def _client():
    from jax._src import distributed  # the coordination-service client orbax uses too

    return distributed.global_state.client


def all_gather_ints(name: str, value: int) -> list[int]:
    """Every process's ``value`` for the decision ``name`` (e.g. ``'preempt/<round>'``), in
    process order; ``[value]`` in a single-process run. Every process makes the same sequence of
    calls (the program is the same on each), so the n-th call's keys are the same everywhere and
    never reused, also when a process runs several jobs. Raises ``PeerLost`` if a process has
    not posted its value within half of ``timeout_s()``: before the coordination service's
    heartbeat timeout (the whole of it) would abort this process with XLA's own fatal message.
    The processes reach each agreement together (right after a round's collectives), so half
    of it is still far more than their skew."""
    import jax

    if jax.process_count() == 1:
        return [int(value)]
    global _calls
    _calls += 1
    prefix = f"fedms_jax/{_calls}/{name}"
    client = _client()
    client.key_value_set(f"{prefix}/{jax.process_index()}", str(int(value)))
    out, deadline = [], time.monotonic() + _timeout_s / 2
    for p in range(jax.process_count()):
        try:
            wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
            out.append(int(client.blocking_key_value_get(f"{prefix}/{p}", wait_ms)))
        except Exception as e:  # noqa: BLE001 - the client raises a runtime error on its deadline
            raise PeerLost(f"process {p} did not reach {name!r} within {_timeout_s / 2:g} s "
                           f"({_first_line(e)})") from None
    global _previous
    if _previous is not None:  # every process has read it: all of them have posted this call's
        client.key_value_delete(_previous)
    _previous = f"{prefix}/{jax.process_index()}"
    return out


def agree_all(name: str, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (all processes get the same answer)."""
    return all(all_gather_ints(name, int(bool(flag))))


@contextlib.contextmanager
def forward_startup_signals():
    """While active, a SIGTERM/SIGINT that stops this process during start-up (``signals``'
    ``Interrupted``) stops the job's other processes too, and theirs stops this one (see the
    module docstring). A no-op in a single-process run. The watcher polls every 0.25 s while a
    signal guard is active (in start-up, and in the rounds too: a process already in its first
    round waits there for the one that stopped), and is joined on exit (before the client shuts
    down at interpreter exit). If the main thread has not acted on the forwarded signal within
    ``_STUCK_S`` it is blocked waiting for the process that left, and the watcher ends the
    process itself (``_stop_now``)."""
    import jax

    from fedms_jax import signals

    if jax.process_count() == 1:
        yield
        return
    global _runs
    _runs += 1
    key, me, client = f"fedms_jax/stop/{_runs}", jax.process_index(), _client()
    forwarded = threading.Event()  # a signal this process got from the store, not to repost
    done = threading.Event()

    def announce(signum: int) -> None:
        if forwarded.is_set():
            return
        with contextlib.suppress(Exception):  # another process posted first: nothing to add
            client.key_value_set(key, f"{me}:{int(signum)}")

    def watch() -> None:
        while not done.wait(_POLL_S):
            if signals.active() is None:
                continue
            try:
                value = client.key_value_try_get(key)
            except Exception:  # noqa: BLE001 - not posted (NOT_FOUND), or the service is gone
                continue
            sender, signum = (int(v) for v in value.split(":"))
            if sender != me:
                forwarded.set()
                os.kill(os.getpid(), signum)  # handled in the main thread like the original
                if not done.wait(_STUCK_S):  # the main thread is blocked in a call that waits
                    _stop_now(signum)        # for the process that left: it never returns
            return

    signals.ON_STARTUP_SIGNAL.append(announce)
    thread = threading.Thread(target=watch, name="fedms_jax-stop-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signals.ON_STARTUP_SIGNAL.remove(announce)
        thread.join()


def _stop_now(signum: int) -> None:
    """Ends this process from the watcher thread as the CLI would have: the start-up message,
    no temporary file left, ``jax.distributed``'s shutdown barrier met (where the process that
    left is waiting), exit 128 + ``signum``. For a main thread that cannot run its handler:
    blocked in a collective (or a key-value wait) with the process that left, which would only
    give up after ``timeout_s``."""
    import sys

    from fedms_jax import signals, storage

    from jax._src import distributed as jax_distributed

    print(f"fedms-jax: {signals.Interrupted(signum)}", file=sys.stderr, flush=True)
    storage.remove_live_temporaries()
    sys.stdout.flush()
    client = jax_distributed.global_state.client
    with contextlib.suppress(Exception):
        client.shutdown()  # the shutdown barrier; then out at once, before the main thread's
    os._exit(128 + signum)  # collective can trip over the closed connection


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def lost_peer_error(e: BaseException) -> PeerLost | None:
    """The ``PeerLost`` a runtime error of a multi-process job stands for (a collective whose
    connection to another process broke, or the coordination service reporting a dead task),
    or None when ``e`` is something else or the job has one process."""
    import jax

    if jax.process_count() == 1:
        return None
    # XLA's runtime errors (and the ValueError a multi-process device_put's check raises) from a
    # transport (gloo on CPU, NCCL on GPU) whose peer went away, or the coordination service
    # reporting a task gone; an out-of-memory, a compile error or a bug stays what it is.
    text = str(e)
    if not isinstance(e, (jax.errors.JaxRuntimeError, ValueError)) or not any(w in text for w in _TRANSPORT_WORDS):
        return None
    return PeerLost(f"a collective with another process failed ({_first_line(e)}): that process probably died")
