"""PBM, the peripheral broadcast mailbox: a crash-safe ring of fixed-size records between processes.

    box = Mailbox.create("sensors", record_size=64, capacity=1024)   # owner
    box = Mailbox.attach("sensors")                                  # any other process
    box.push(b"...", tag=7, ttl=0.5)        # PushStatus.OK / FULL / TOO_BIG, never a silent drop
    record = box.pop(timeout=1.0)           # Record(payload, producer, seq, tag, ...) or None
    box.stats()                             # pushed, popped, full, too_big, expired, torn, depth
    box.push_many([b"a", b"b"]); box.pop_many(64, timeout=1.0)      # one lock per batch
    n = box.pop_into(rows, lengths)         # bulk: payloads into a numpy [n, record_size] uint8 buffer

Timeouts everywhere: None or 0 does not wait, a number waits up to that many seconds, math.inf
waits for ever. A ring that must reach several consumers each (a broadcast) is one ring per
consumer; one ring shared by several consumers is a work queue.

Two engines do the work, on the same bytes and the same protocol (processes using either share a
ring): the C one (sage._pbm, built by pip from sage/_pbm.c where a compiler exists) and a pure-Python
one (sage.pbm_python). `impl="auto"` (the default, or the SAGE_MAILBOX_IMPL environment variable)
takes the C one when it is built; "native" insists on it, "python" on the other. The ring's lock is
a robust process-shared pthread mutex in the header (`lock="mutex"`, the default wherever the libc
has one: Linux) or flock on the file (`lock="flock"`, elsewhere; only the Python engine takes it).

Guarantees (each is tested in tests/test_sage_mailbox*.py, on both engines):
- Delivery: each record is delivered to exactly one consumer (a work queue, not a broadcast), and
  records of one producer handle are delivered in the order it pushed them (FIFO per producer; the
  ring is FIFO overall). `Record.seq` counts 0, 1, 2, ... per producer so gaps are visible.
- A record is delivered when `pop` returns it. A consumer killed inside `pop` (before its commit
  store) leaves the record on the ring for the next consumer; one killed after `pop` returned has
  taken the record with it (for `pop_many` and `pop_into`: the whole batch): acknowledge at the
  application level when that matters.
- A producer killed at any point, even holding the lock in the middle of writing, exposes no torn or
  stale record (its slot is not committed and is overwritten) and blocks nobody (the kernel marks
  its mutex owner-dead and the next locker repairs it; a flock is dropped). A consumer that dies or
  stops never wedges producers: they get FULL, or wait at most their timeout.
- No silent drop: a full ring answers FULL, an oversized payload TOO_BIG, both counted; a record
  whose ttl passed before it was popped is counted in `expired` and not delivered; a slot whose
  seq or CRC32 does not match (foreign corruption) is counted in `torn` and not delivered. The CRC
  covers the slot's header fields and, unless the ring was created with checksum=False, the payload.
- Stale segments: a create over a ring whose creator is dead (pid gone, pid reused, or another boot)
  retires and replaces it (`stale="reset"`) or takes it over with its records (`stale="adopt"`);
  a create over a live one raises MailboxExistsError. Handles still mapping a retired ring raise
  MailboxRetiredError at their next call. Attaching to a ring whose creator died works (records
  from the crashed run are still deliverable) and logs a warning.
- Counters: pushed = write_index and depth = write_index - read_index are exact; popped, expired
  and torn are derived so that pushed = popped + expired + torn + depth, except that a process
  killed between the index store and its counter store (a few instructions) leaves one counter one
  off. A stopped (SIGSTOP) process holding the lock stalls the others until it continues.

Waiting: `wait="spin"` busy-polls the write index (lowest latency, one core busy while waiting; it
yields now and then so a producer on the same core runs), `"sleep"` parks on the ring's doorbell
FIFO at once (no core used, a wake-up costs a context switch), `"adaptive"` (the default) polls for
`spin_us` then sleeps. A producer blocked on FULL (push with a timeout) backs off with sleeps of
50 us to 1 ms. The binary layout and the protocol a C producer follows are in sage.layout.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import weakref
from typing import Self

from sage import layout, mutex, segment
from sage.pbm_python import WAIT_ADAPTIVE, WAIT_SLEEP, WAIT_SPIN, PythonRing, sleep_on_bell
from sage.pbm_types import (
    MailboxCorruptError,
    MailboxError,
    MailboxExistsError,
    MailboxNotFoundError,
    MailboxRetiredError,
    MailboxStats,
    PushStatus,
    Record,
)
from sage.shm import BOOT_ID, ProcessId, segment_path

__all__ = ["Mailbox", "MailboxCorruptError", "MailboxError", "MailboxExistsError", "MailboxNotFoundError",
           "MailboxRetiredError", "MailboxStats", "PushStatus", "Record", "native_engine_status"]

log = logging.getLogger(__name__)

MAX_RECORD_SIZE = 64 << 20
MAX_CAPACITY = 1 << 24
MAX_FILE_SIZE = 8 << 30
WAIT_MODES = {"spin": WAIT_SPIN, "sleep": WAIT_SLEEP, "adaptive": WAIT_ADAPTIVE}
IMPLS = ("auto", "native", "python")
LOCKS = ("auto", "mutex", "flock")
_SLEEP_SLICE_NS = 500_000_000  # a sleeping consumer re-arms the doorbell at least this often

if sys.byteorder != "little":
    raise ImportError("sage.mailbox maps its little-endian layout with native stores: a little-endian host is needed")


def _load_native():
    """The C engine, or None and why not (not built, or built from another version of sage/_pbm.c)."""
    try:
        from sage import _pbm  # noqa: PLC0415 - optional: the extension is not built everywhere
    except ImportError as error:
        return None, f"the C extension sage._pbm is not built ({error})"
    expected = {"LAYOUT_VERSION": layout.PBM_VERSION, "HEADER_SIZE": layout.HEADER_SIZE,
                "SLOT_HEADER": layout.PBM_SLOT_HEADER, "COUNTERS_OFFSET": layout.PBM_COUNTERS_OFFSET,
                "MUTEX_OFFSET": layout.PBM_MUTEX_OFFSET, "MUTEX_BYTES": layout.PBM_MUTEX_BYTES}
    stale = {key: getattr(_pbm, key, None) for key, value in expected.items() if getattr(_pbm, key, None) != value}
    if stale:
        return None, (f"the built sage._pbm ({_pbm.__file__}) does not match sage/layout.py ({stale}); rebuild it "
                      f"(pip install -e . or python setup.py build_ext --inplace)")
    _pbm.configure(Record, PushStatus.OK, PushStatus.FULL, PushStatus.TOO_BIG, MailboxError, MailboxRetiredError,
                   log.warning)
    return _pbm, None


_pbm, _NATIVE_MISSING = _load_native()


def native_engine_status() -> str | None:
    """None when the C engine is usable here, else why not (one line)."""
    return _NATIVE_MISSING


_handles: weakref.WeakSet[Mailbox] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child is another producer (a flock-kind ring's FileLock reopens the file by itself).
    for box in list(_handles):
        if not box._closed:
            box._ring.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_geometry(record_size: object, capacity: object) -> None:
    if not isinstance(record_size, int) or isinstance(record_size, bool) or not 1 <= record_size <= MAX_RECORD_SIZE:
        raise ValueError(f"record_size must be an int in [1, {MAX_RECORD_SIZE}], got {record_size!r}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be an int in [1, {MAX_CAPACITY}], got {capacity!r}")
    size = layout.HEADER_SIZE + capacity * layout.pbm_stride(record_size)
    if size > MAX_FILE_SIZE:
        raise ValueError(f"record_size {record_size} x capacity {capacity} needs {size} bytes, more than "
                         f"{MAX_FILE_SIZE}; use fewer or smaller slots (tensors go through sage.ftm)")


def _check_wait(wait: str, spin_us: float) -> None:
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {tuple(WAIT_MODES)}, got {wait!r}")
    if not (isinstance(spin_us, (int, float)) and spin_us >= 0):
        raise ValueError(f"spin_us must be a number >= 0, got {spin_us!r}")


def _requested_impl(impl: str | None) -> str:
    if impl is None:
        impl = os.environ.get("SAGE_MAILBOX_IMPL") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"SAGE_MAILBOX_IMPL must be one of {IMPLS}, got {impl!r}")
    elif impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


def _choose_impl(impl: str | None, lock_mutex: bool, name: str) -> str:
    """Which engine drives this handle: "native" or "python"."""
    impl = _requested_impl(impl)
    if lock_mutex and _pbm is None and not mutex.AVAILABLE:
        raise MailboxError(f"mailbox {name!r} is locked by a robust pthread mutex, which this platform cannot take "
                           f"(Linux only); create rings that other platforms share with lock='flock'")
    if impl == "native" and _pbm is None:
        raise MailboxError(f"mailbox {name!r}: the native engine was asked for (impl='native' or "
                           f"SAGE_MAILBOX_IMPL=native) but {_NATIVE_MISSING}; install sage where a C compiler "
                           f"exists, or use impl='python'")
    if impl == "native" and not lock_mutex:
        raise MailboxError(f"mailbox {name!r} is locked with flock, which only the Python engine takes; use "
                           f"impl='python' or recreate it with lock='mutex'")
    if impl == "python" and lock_mutex and not mutex.AVAILABLE:
        raise MailboxError(f"mailbox {name!r}: the Python engine cannot take its mutex here (no ctypes access to "
                           f"the libc's robust mutexes); use impl='native'")
    if impl == "auto":
        return "native" if lock_mutex and _pbm is not None else "python"
    return impl


def _choose_lock(lock: str) -> bool:
    """True for the robust mutex, False for flock."""
    if lock not in LOCKS:
        raise ValueError(f"lock must be one of {LOCKS}, got {lock!r}")
    can_mutex = _pbm is not None or mutex.AVAILABLE
    if lock == "mutex" and not can_mutex:
        raise MailboxError("lock='mutex' needs robust process-shared pthread mutexes (Linux); use lock='flock'")
    return lock == "mutex" or (lock == "auto" and can_mutex)


def _init_mutex(mm) -> None:
    if _pbm is not None:
        _pbm.init_mutex(mm, layout.PBM_MUTEX_OFFSET)
    else:
        mutex.init(mm, layout.PBM_MUTEX_OFFSET)
    mm[layout.PBM_LOCK_BOOT_OFFSET:layout.PBM_LOCK_BOOT_OFFSET + 16] = BOOT_ID


def _check_lock_boot(mm, fd: int, name: str) -> None:
    """A mutex initialised in another boot may look held by a process that no longer exists: the
    first process of this boot to attach initialises it afresh (under flock: see sage.layout)."""
    boot = slice(layout.PBM_LOCK_BOOT_OFFSET, layout.PBM_LOCK_BOOT_OFFSET + 16)
    fcntl.flock(fd, fcntl.LOCK_EX)  # also orders the repairer's mutex stores before our look (2 us per attach)
    try:
        if mm[boot] != BOOT_ID:
            log.warning("mailbox %r: its lock was initialised in another boot; initialising it afresh", name)
            _init_mutex(mm)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _bell_path(name: str):
    path = segment_path("pbm", name)
    return path.with_name(path.name + ".bell")


class Mailbox:
    """A handle on one PBM ring. Not for use after close(); one handle may be shared by threads."""

    # ---- life cycle ----
    @classmethod
    def create(cls, name: str, *, record_size: int, capacity: int, stale: str = "reset",
               wait: str = "adaptive", spin_us: float = 50.0, checksum: bool = True, lock: str = "auto",
               impl: str | None = None) -> Mailbox:
        """Create the ring `name` holding `capacity` records of up to `record_size` payload bytes.
        checksum=False leaves payloads out of the slot CRC (the 40 header bytes stay covered): the
        commit protocol already hides torn writes. lock: "auto" (the robust mutex where the platform
        has one, else flock), "mutex" or "flock". impl: the engine of this handle (see the module doc)."""
        _check_geometry(record_size, capacity)
        _check_wait(wait, spin_us)
        _requested_impl(impl)
        lock_mutex = _choose_lock(lock)
        path = segment_path("pbm", name)
        bell = _bell_path(name)
        try:
            os.mkfifo(bell, 0o600)
        except FileExistsError:
            pass
        stride = layout.pbm_stride(record_size)
        flags = (layout.PBM_PAYLOAD_CRC if checksum else 0) | (layout.PBM_LOCK_MUTEX if lock_mutex else 0)

        def init(mm) -> None:
            segment.write_header(mm, segment.Header(layout.PBM_MAGIC, layout.PBM_VERSION, layout.HEADER_SIZE,
                                                    layout.PBM_SLOT_HEADER, record_size, stride, capacity,
                                                    ProcessId.current(), flags))
            if lock_mutex:
                _init_mutex(mm)

        def compatible(header: segment.Header) -> bool:
            return (header.a, header.c, header.flags) == (record_size, capacity, flags)

        opened = segment.create_new(path, layout.HEADER_SIZE + capacity * stride, init, "mailbox", name,
                                    stale=stale, compatible=compatible, magic=layout.PBM_MAGIC)
        return cls(name, opened, wait, spin_us, impl)

    @classmethod
    def attach(cls, name: str, *, wait: str = "adaptive", spin_us: float = 50.0,
               impl: str | None = None) -> Mailbox:
        """Open an existing ring by name, from any process on this machine."""
        _check_wait(wait, spin_us)
        _requested_impl(impl)
        opened = segment.open_existing(segment_path("pbm", name), layout.PBM_MAGIC, "mailbox", name)
        box = cls(name, opened, wait, spin_us, impl)
        if not opened.header.creator.alive():
            log.warning("mailbox %r: its creator (pid %d) is gone; its records are still deliverable",
                        name, opened.header.creator.pid)
        return box

    def __init__(self, name: str, opened: segment.Opened, wait: str, spin_us: float, impl: str | None):
        header = opened.header
        self.name = name
        self.path = segment_path("pbm", name)
        self._mm, self._fd = opened.mm, opened.fd
        self._closed = True  # until the engine is up
        try:
            self._check_layout(header)
            lock_mutex = bool(header.flags & layout.PBM_LOCK_MUTEX)
            self.impl = _choose_impl(impl, lock_mutex, name)
            if lock_mutex:
                _check_lock_boot(self._mm, self._fd, name)
            self._bell = os.open(_bell_path(name), os.O_RDWR | os.O_NONBLOCK)
        except BaseException:
            self._mm.close()
            os.close(self._fd)
            raise
        self.record_size, self.stride, self.capacity = header.a, header.b, header.c
        self.creator = header.creator
        self.checksum = bool(header.flags & layout.PBM_PAYLOAD_CRC)
        self.lock = "mutex" if lock_mutex else "flock"
        self.wait, self.spin_us = wait, spin_us
        geometry = dict(record_size=self.record_size, stride=self.stride, capacity=self.capacity,
                        payload_crc=self.checksum, wait=WAIT_MODES[wait], spin_ns=int(spin_us * 1e3),
                        sleep_slice_ns=_SLEEP_SLICE_NS)
        if self.impl == "native":
            self._ring = _pbm.Ring(fd=self._fd, size=len(self._mm), name=name, bell=self._bell, **geometry)
        else:
            self._ring = PythonRing(self._mm, self._fd, self._bell, name, lock_mutex=lock_mutex, **geometry)
        # The engine's methods, bound here, are what a call runs (the methods below document them):
        # a push then costs no extra Python frame (0.1 us of a 0.4 us push in C).
        self.push, self.push_many = self._ring.push, self._ring.push_many
        self.pop, self.pop_many, self.pop_into = self._ring.pop, self._ring.pop_many, self._ring.pop_into
        self._closed = False
        _handles.add(self)

    def _check_layout(self, header: segment.Header) -> None:
        size = len(self._mm)
        ok = (header.header_size == layout.HEADER_SIZE and header.u32_field == layout.PBM_SLOT_HEADER
              and 1 <= header.a <= MAX_RECORD_SIZE and header.b == layout.pbm_stride(header.a)
              and 1 <= header.c <= MAX_CAPACITY and size == layout.HEADER_SIZE + header.c * header.b
              and header.flags & ~layout.PBM_FLAGS == 0)
        if not ok:
            raise MailboxCorruptError(f"{self.path}: header geometry (record_size {header.a}, stride {header.b}, "
                                      f"capacity {header.c}) does not match the file's {size} bytes; remove it "
                                      f"and create the mailbox again")

    def close(self) -> None:
        """Unmap and close this handle (the ring stays for the others). Idempotent."""
        if self._closed:
            return
        self._closed = True
        _handles.discard(self)
        self._ring.close()
        self._mm.close()
        os.close(self._fd)
        os.close(self._bell)

    def unlink(self) -> None:
        """Remove the ring's name (handles still open get MailboxRetiredError); then close()."""
        self._check_open()
        self._ring.retire()
        for path in (self.path, _bell_path(self.name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mailbox({self.name!r}, record_size={self.record_size}, capacity={self.capacity}, impl={self.impl!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"mailbox {self.name!r}: this handle is closed; attach again")

    # ---- producer side ----
    def push(self, payload, *, tag: int = 0, ttl: float | None = None,
             timeout: float | None = None) -> PushStatus:
        """Append one record. FULL when the ring stays full for `timeout` seconds (None or 0: do not
        wait; math.inf: wait for space); TOO_BIG when the payload exceeds record_size. A record
        with `ttl` seconds is counted expired instead of delivered once that time has passed."""
        return self._ring.push(payload, tag=tag, ttl=ttl, timeout=timeout)

    def push_many(self, payloads, *, tag: int = 0, ttl: float | None = None) -> int:
        """Push payloads in order under one lock until the ring is full; returns how many went in
        (the rest were not pushed and are counted once in `full`). Raises ValueError, pushing
        nothing, when one is larger than record_size."""
        return self._ring.push_many(payloads, tag=tag, ttl=ttl)

    # ---- consumer side ----
    def pop(self, timeout: float | None = None) -> Record | None:
        """Take the oldest live record; None if there is none within `timeout` seconds (None or 0:
        do not wait; math.inf: wait for one)."""
        return self._ring.pop(timeout)

    def pop_many(self, max_records: int, timeout: float | None = None) -> list[Record]:
        """Take up to `max_records` records under one lock (waiting up to `timeout` for the first).
        They are claimed at once: a consumer killed before using them has taken them all."""
        return self._ring.pop_many(max_records, timeout)

    def pop_into(self, out, lengths=None, timeout: float | None = None) -> int:
        """Take up to n records under one lock, copying record i's payload into row i of `out`, a writable
        C-contiguous buffer of n * record_size bytes (e.g. numpy.empty((n, record_size), numpy.uint8));
        returns how many it took (0 if none within `timeout`, as pop). `lengths`, a uint32 array of n,
        receives each payload's length; bytes of a row past its payload keep what they held. No Record
        is built (the bulk path for a consumer that only needs the bytes: no producer, seq, tag); the
        same checks as pop: torn and expired records are skipped and counted."""
        return self._ring.pop_into(out, lengths, timeout)

    # ---- doorbell (for waiting on several rings at once: sage.schedule) ----
    def arm_doorbell(self, until_ns: int) -> bool:
        """Ask producers to ring the doorbell until `until_ns`; True if a record is already there
        (then do not sleep). Taken under the lock, so no push between this and the sleep is missed.
        After a False, sleep, then call disarm_doorbell() (producers ring while anyone is armed)."""
        return self._ring.arm(until_ns)

    def disarm_doorbell(self) -> None:
        self._ring.disarm()

    def doorbell_fd(self) -> int:
        """The doorbell's file descriptor, readable after a push: for select() over several rings."""
        return self._bell

    def sleep_on_doorbell(self, seconds: float) -> None:
        """Wait up to `seconds` for a ring, then empty the doorbell."""
        sleep_on_bell(self._bell, seconds)

    # ---- telemetry ----
    def stats(self) -> MailboxStats:
        self._check_open()
        values = self._ring.counters()
        w, r = values[layout.PBM_WRITE], values[layout.PBM_READ]
        expired, torn = values[layout.PBM_EXPIRED], values[layout.PBM_TORN]
        return MailboxStats(pushed=w, popped=r - expired - torn, full=values[layout.PBM_FULL],
                            too_big=values[layout.PBM_TOO_BIG], expired=expired, torn=torn, depth=w - r,
                            capacity=self.capacity, record_size=self.record_size,
                            producers=values[layout.PBM_NEXT_PRODUCER], owner_alive=self.creator.alive())

    # ---- for fault-injection tests: the engine's TTL clock, critical-section hook, producer count ----
    @property
    def _clock(self):
        return self._ring.clock

    @_clock.setter
    def _clock(self, clock) -> None:
        self._ring.clock = clock

    @property
    def _test_hook(self):
        return self._ring.test_hook

    @_test_hook.setter
    def _test_hook(self, hook) -> None:
        self._ring.test_hook = hook

    @property
    def _producer_seq(self) -> int:
        return self._ring.producer_seq

