"""SIGTERM and SIGINT over a whole run, from before anything slow until the last save is on disk.

``SignalGuard`` is installed first thing in ``run``. Until the rounds begin (loading and
featurizing the data, calibrating DP, compiling, restoring) a signal raises ``Interrupted``
at once -- a ``BaseException``, so no ``except Exception`` mistakes it for a bad file, and
every ``finally`` / cleanup on the way out runs (temporary files are removed) -- and the CLI
exits 128 + signal number with nothing new on disk. Once the rounds run (``defer``) a signal
is only recorded: the ``Preemption`` callback saves the round in flight and stops the run.
The previous handlers come back when the run has returned, after its final save was waited
for, so a signal during that wait cannot cut the save short.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal before the rounds began: the run stopped with nothing new saved."""

    def __init__(self, signum: int, during: str = "start-up") -> None:
        self.signum = signum
        super().__init__(f"caught {signal.Signals(signum).name} during {during}: stopped before the rounds began, "
                         "nothing new was saved; rerun the same command to start (or resume)")


_ACTIVE: list["SignalGuard"] = []  # the guards entered and not yet left, innermost last
# Called with the signal number when a guard raises ``Interrupted`` (a signal before the rounds):
# ``distributed.forward_startup_signals`` tells the job's other processes from here.
ON_STARTUP_SIGNAL: list = []


def active() -> "SignalGuard | None":
    """The innermost guard entered and not yet left."""
    return _ACTIVE[-1] if _ACTIVE else None


def in_startup() -> bool:
    """Whether a guard is active and would raise ``Interrupted`` on a signal now."""
    return bool(_ACTIVE) and not _ACTIVE[-1].deferring


class SignalGuard:
    """Context manager: the run's SIGTERM/SIGINT handler (see the module docstring).
    ``caught``: every signal recorded, shared with the guards it is nested in (the CLI's and
    ``run``'s), so none is forgotten when the inner one takes over.

    Python runs a handler between two bytecodes of the main thread, wherever it is: an exception
    raised inside a garbage-collection callback or a finalizer is printed and dropped ("Exception
    ignored in ..."). So a signal is also recorded, and ``check()`` (called between the start-up
    steps, and by ``defer``) raises ``Interrupted`` for one whose exception was lost."""

    def __init__(self, signums=SIGNALS) -> None:
        self.signums = tuple(signums)
        self.caught: list[int] = []
        self.deferring = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.caught.append(signum)
        if not self.deferring:
            for hook in list(ON_STARTUP_SIGNAL):
                hook(signum)
            raise Interrupted(signum)

    def check(self) -> None:
        """Raises ``Interrupted`` if a signal came before the rounds (its exception lost, or
        held by ``hold``)."""
        if self.caught and not self.deferring:
            for hook in list(ON_STARTUP_SIGNAL):
                hook(self.caught[0])
            raise Interrupted(self.caught[0])

    def hold(self) -> None:
        """Only record signals until ``release``: while the processes of a multi-process job
        connect, one that left would make the others' connection fail with XLA's abort."""
        self.deferring = True

    def release(self) -> None:
        """Back to start-up behaviour; raises ``Interrupted`` for a signal held meanwhile."""
        self.deferring = False
        self.check()

    def defer(self) -> None:
        """From now on a signal is recorded for the loop to act on (after its round)."""
        self.check()
        self.deferring = True

    def __enter__(self) -> "SignalGuard":
        if _ACTIVE:
            self.caught = _ACTIVE[-1].caught
        else:  # an ``Interrupted`` dropped in a callback is not news: ``check`` raises it again
            self._unraisable = sys.unraisablehook
            sys.unraisablehook = _quiet_interrupted(sys.unraisablehook)
            sys.unraisablehook._guard = self
        _ACTIVE.append(self)
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signums}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if getattr(self, "_unraisable", None) is not None:
            if getattr(sys.unraisablehook, "_guard", None) is self:  # (not if another hook was put over it)
                sys.unraisablehook = self._unraisable
            self._unraisable = None


def _quiet_interrupted(hook):
    def quiet(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            hook(unraisable)

    return quiet
