"""Writing to disk without surprises: space reserved before it is used, failures named.

A full disk must be an error the run can report (one line: the path, what it needed, what is
free), never a crash: a memory-mapped file that grows sparsely dies of SIGBUS when a page
cannot be backed, so ``reserve`` allocates the blocks first (``posix_fallocate``), and an
asynchronous writer's failure (orbax's ``RESOURCE_EXHAUSTED``) is recognised by
``disk_problem`` and turned into a ``StorageError``. The memory checks
(``available_memory``, ``check_fits``) do the same for RAM: a population or data set too large
for the machine is a one-line error before anything is allocated.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

# errnos that mean the file system, not the program, refused the write
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_DISK_WORDS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded", "Read-only file system",
               "File too large")


class StorageError(Exception):
    """A write failed for lack of space (or a read-only disk): names the path and the bytes."""


class MemoryLimitError(Exception):
    """Something would not fit in the memory this process may use (names what and how much)."""


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to an unprivileged writer on the file system holding ``path`` (or its
    nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    s = os.statvfs(p)
    return s.f_bavail * s.f_frsize


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def disk_problem(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is the file system refusing a write."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return True
        if any(w in str(e) for w in _DISK_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


_FAILED = []  # a write failed for lack of space (what ``_quiet_cancelled_writes`` keys on)


def storage_error(e: BaseException, path: str | os.PathLike, what: str, needed: int | None = None) -> StorageError:
    """The one-line ``StorageError`` for a failed write of ``what`` under ``path``."""
    _FAILED.append(what)
    need = f"; it needed about {human(needed)}" if needed else ""
    reason = "the disk is full" if not isinstance(e, OSError) or e.errno != errno.EROFS else "the disk is read-only"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return StorageError(f"cannot write {what} to {path}: {reason} ({human(free_bytes(path))} free{need}; "
                        f"{first[:200]})")


class _DiskErrorFilter(logging.Filter):
    """Drops log records about a full disk (with their tracebacks): the run raises them as one
    ``StorageError`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        e = record.exc_info[1] if record.exc_info else None
        if any(w in text for w in _DISK_WORDS) or (e is not None and disk_problem(e)):
            _FAILED.append(text[:200])  # (a background write failed: the main thread will see it later)
            return False
        return e is None or not _cancelled_write(e)


def _cancelled_write(e: BaseException) -> bool:
    """The error of an asynchronous write still in flight when its save failed (tensorstore
    completes it on orbax's event loop, closed by then)."""
    return bool(_FAILED) and isinstance(e, RuntimeError) and "Event loop is closed" in str(e)


_FILTER = _DiskErrorFilter()


def quiet_disk_errors(logger: str) -> None:
    """Installs the filter of full-disk records on ``logger`` (once), and the one of the
    unraisable "Event loop is closed" errors that the asynchronous writes still in flight raise
    when a save has failed (tensorstore completes them on orbax's closed event loop)."""
    log = logging.getLogger(logger)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    if not getattr(sys.unraisablehook, "_fedms_quiet", False):
        previous = sys.unraisablehook

        def quiet(unraisable) -> None:
            e = unraisable.exc_value
            if not _cancelled_write(e):
                previous(unraisable)

        quiet._fedms_quiet = True
        sys.unraisablehook = quiet
    if not getattr(sys.excepthook, "_fedms_quiet", False):  # (tensorstore's callbacks print through it)
        hook = sys.excepthook

        def quiet_print(kind, e, tb) -> None:
            if not _cancelled_write(e):
                hook(kind, e, tb)

        quiet_print._fedms_quiet = True
        sys.excepthook = quiet_print


def reserve(fd: int, size: int, path: str | os.PathLike, what: str) -> None:
    """Allocates the blocks of the first ``size`` bytes of the open file ``fd`` (extending it),
    so writes through a memory map cannot hit a full disk; raises ``StorageError`` if the file
    system has no room. (A file system without ``fallocate`` falls back to extending the file.)"""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. some network file systems: best effort
            os.ftruncate(fd, max(size, os.fstat(fd).st_size))
            return
        if e.errno in DISK_ERRNOS:
            raise storage_error(e, path, what, size) from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str, needed: int | None = None):
    """Yields a binary file open at a temporary name beside ``path`` (``.NAME.XXXX.tmp``); when
    the block ends it is fsynced and renamed over ``path`` (and the directory fsynced), so
    ``path`` is either its old content or the whole new one. On any failure, a signal's
    exception included, the temporary file is removed; a full disk becomes a ``StorageError``
    naming ``what``, the directory and ``needed`` bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _LIVE_TEMPORARIES.add(tmp)
    try:
        # mkstemp's 0600 would make every result private to the job's user; give the file the
        # mode open() would have (0666 less the umask) so that a cluster's group can read it.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and disk_problem(e):
            raise storage_error(e, path.parent, what, needed) from None
        raise
    finally:
        _LIVE_TEMPORARIES.discard(tmp)
    fsync_dir(path.parent)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back. Read once, at import:
    os.umask(mask)      # the umask is process-wide, and files are written from several threads
    return mask


_UMASK = _read_umask()


_LIVE_TEMPORARIES: set[str] = set()  # ``atomic_file``'s temporary files being written now


def remove_live_temporaries() -> None:
    """Removes the temporary files ``atomic_file`` blocks are writing now: for a process about
    to ``os._exit`` from another thread, where no ``finally`` will run."""
    for tmp in list(_LIVE_TEMPORARIES):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a rename or a new file in directory ``path`` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def available_memory() -> int:
    """Bytes this process may still allocate: the smaller of the machine's available memory
    (``MemAvailable``) and what ``RLIMIT_AS`` leaves above the address space already mapped."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            mapped = 0
        avail = min(avail, max(0, soft - mapped))
    return int(avail)


def check_fits(needed: int, what: str, hint: str = "") -> None:
    """Raises ``MemoryLimitError`` naming ``what`` if ``needed`` bytes exceed ``available_memory()``."""
    avail = available_memory()
    if needed > avail:
        raise MemoryLimitError(f"{what} needs {human(needed)} of memory but only {human(avail)} is available"
                               + (f": {hint}" if hint else ""))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file written one line at a time. A damaged last line without
    its newline (a write torn by a power loss or kill -9) is dropped with a warning; any other
    line that is not a JSON object is a ``ValueError`` naming it."""
    import json
    import warnings

    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete = text.endswith("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # (a whole line ends in a newline: the last piece is after it)
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if last:
                warnings.warn(f"{path}: dropped its damaged last line {i + 1} ({line[:60]!r}...: a torn write)",
                              stacklevel=2)
                break
            raise ValueError(f"{path} line {i + 1} is not JSON ({e})") from None
        out.append(record)  # (a whole last line whose newline was lost parses: kept)
    return out
