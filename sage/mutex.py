"""A robust, process-shared pthread mutex inside a shared mapping, driven through ctypes (no compiler).

The PBM ring's lock since layout version 2 (sage.layout): uncontended, a pthread mutex costs no syscall
(20 ns in C, 1.5 us for the pair through ctypes here, against 2.6 us for the flock pair from Python),
and it is robust: when its holder dies the kernel marks it, the next pthread_mutex_lock returns
EOWNERDEAD, and pthread_mutex_consistent repairs it. The native engine (sage._pbm) takes the same
mutex, so processes with and without the extension share one ring. Linux only (glibc or musl):
elsewhere AVAILABLE is False and rings fall back to flock.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import sys

from sage.segment import SegmentError

log = logging.getLogger(__name__)

# The libc constants are the same in glibc and musl (the only libcs this is enabled for).
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_PTHREAD_MUTEX_ERRORCHECK = 2
_ATTR_BYTES = 64  # pthread_mutexattr_t is 4 or 8 bytes; room to spare
MUTEX_BYTES = 64  # sage.layout.PBM_MUTEX_BYTES: what the header reserves


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for fn in ("pthread_mutex_lock", "pthread_mutex_unlock", "pthread_mutex_consistent", "pthread_mutex_init",
                   "pthread_mutexattr_init", "pthread_mutexattr_setpshared", "pthread_mutexattr_setrobust",
                   "pthread_mutexattr_settype", "pthread_mutexattr_destroy"):
            getattr(libc, fn).restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()
AVAILABLE = _libc is not None


def init(mm: mmap.mmap, offset: int) -> None:
    """Initialise the mutex at `offset` of the mapping (process-shared, robust, error-checking)."""
    if _libc is None:
        raise OSError("robust process-shared mutexes need Linux (glibc or musl)")
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    anchor = ctypes.c_char.from_buffer(mm, offset)
    try:
        mm[offset:offset + MUTEX_BYTES] = bytes(MUTEX_BYTES)
        for rc in (_libc.pthread_mutexattr_init(attr),
                   _libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
                   _libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
                   _libc.pthread_mutexattr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK),
                   _libc.pthread_mutex_init(ctypes.byref(anchor), attr)):
            if rc:
                raise OSError(rc, f"pthread mutex initialisation failed: {errno.errorcode.get(rc, rc)}")
        _libc.pthread_mutexattr_destroy(attr)
    finally:
        del anchor  # the mapping can be closed again


class RobustMutex:
    """`with mutex:` around a critical section. Threads of one process exclude each other too (the
    mutex has a per-thread owner). `what` names the segment in errors and in the repair warning."""

    __slots__ = ("_anchor", "what")

    def __init__(self, mm: mmap.mmap, offset: int, what: str):
        # The anchor pins the mapping while a call is in flight: a close() from another thread then
        # fails with BufferError instead of unmapping memory a blocked locker still uses.
        self._anchor = ctypes.c_char.from_buffer(mm, offset)
        self.what = what

    def __enter__(self) -> RobustMutex:
        rc = _libc.pthread_mutex_lock(ctypes.byref(self._anchor))
        if rc == errno.EOWNERDEAD:  # its holder died inside a critical section
            rc = _libc.pthread_mutex_consistent(ctypes.byref(self._anchor))
            log.warning("%s: a process died holding its lock; the lock was repaired (nothing it had not "
                        "committed is visible)", self.what)
        if rc:
            raise _lock_error(rc, self.what)
        return self

    def __exit__(self, *exc) -> None:
        _libc.pthread_mutex_unlock(ctypes.byref(self._anchor))

    def close(self) -> None:
        self._anchor = None


def _lock_error(rc: int, what: str) -> Exception:
    if rc == errno.EDEADLK:
        return RuntimeError(f"{what}: this thread already holds its lock (a test hook or finalizer re-entered it)")
    if rc == errno.ENOTRECOVERABLE:
        return SegmentError(f"{what}: its lock is not recoverable (a process died holding it and the repair did "
                            f"not finish); unlink it and create it again")
    return OSError(rc, f"{what}: pthread_mutex_lock failed: {errno.errorcode.get(rc, rc)}")
