"""Where shared segments live, what they may be called, and who is alive.

A segment is a plain file mapped with `mmap` (never `multiprocessing.shared_memory`: on Python 3.11
its resource tracker lets any process that attaches and exits unlink the creator's segment). Files go
to /dev/shm (RAM-backed on Linux) or, where that is absent, to the temp directory; `SAGE_SHM_DIR`
overrides both. A process is named by (pid, start time in clock ticks since boot, boot id), so a
recycled pid or a segment left over from before a reboot is never mistaken for a live owner.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pathlib
import re
import tempfile
import threading
import uuid
import weakref
from typing import Self

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def shm_dir() -> pathlib.Path:
    override = os.environ.get("SAGE_SHM_DIR")
    if override:
        return pathlib.Path(override)
    dev_shm = pathlib.Path("/dev/shm")
    if dev_shm.is_dir() and os.access(dev_shm, os.W_OK):
        return dev_shm
    return pathlib.Path(tempfile.gettempdir())


def segment_path(kind: str, name: str) -> pathlib.Path:
    """`kind` is the file prefix ("pbm" or "ftm"); `name` is the user's segment name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad segment name {name!r}: use 1-100 characters from A-Z a-z 0-9 _ . - "
                         f"starting with a letter or digit")
    return shm_dir() / f"{kind}-{name}"


def _read_boot_id() -> bytes:
    try:
        return uuid.UUID(pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)  # no /proc (not Linux): the pid and start-time checks still apply


BOOT_ID = _read_boot_id()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc/<pid>/stat, or None without /proc."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("X", 0)  # no such process
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


@dataclasses.dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int  # clock ticks since boot (0 where unknown)
    boot: bytes

    @classmethod
    def current(cls) -> ProcessId:
        stat = _proc_stat(os.getpid())
        return cls(os.getpid(), stat[1] if stat else 0, BOOT_ID)

    def alive(self) -> bool:
        """False once the process exited (a zombie counts as dead) or was from another boot."""
        if self.pid <= 0 or self.boot != BOOT_ID:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        stat = _proc_stat(self.pid)
        if stat is None:
            return True
        state, start = stat
        return state not in ("Z", "X") and (self.start == 0 or start == self.start)


def process_alive(pid: int, start: int) -> bool:
    """Liveness of a process on this boot, for tables that store (pid, start) only."""
    return ProcessId(pid, start, BOOT_ID).alive()


class FileLock:
    """An exclusive `flock` on an open file: the kernel drops it when the holder dies, so a process
    killed inside a critical section never wedges the others. flock belongs to the open file
    description, so two handles in one process exclude each other too; threads sharing one handle
    are serialised by a thread lock taken first. The lock owns `fd`. A forked child would share its
    parent's description (and so its lock): after a fork each lock reopens its file in the child."""

    __slots__ = ("__weakref__", "_thread_lock", "fd")

    def __init__(self, fd: int):
        self.fd = fd
        self._thread_lock = threading.Lock()
        _locks.add(self)

    def __enter__(self) -> Self:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        _locks.discard(self)
        os.close(self.fd)

    def _reopen_in_child(self) -> None:
        inherited = self.fd
        self.fd = os.open(f"/proc/self/fd/{inherited}", os.O_RDWR)  # a new description of the same file
        os.close(inherited)
        self._thread_lock = threading.Lock()


_locks: weakref.WeakSet[FileLock] = weakref.WeakSet()


def _reopen_locks_in_child() -> None:
    for lock in list(_locks):
        lock._reopen_in_child()


os.register_at_fork(after_in_child=_reopen_locks_in_child)
