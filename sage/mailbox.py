"""PBM, the peripheral broadcast mailbox: a crash-safe ring of fixed-size records between processes.

    box = Mailbox.create("sensors", record_size=64, capacity=1024)   # owner
    box = Mailbox.attach("sensors")                                  # any other process
    box.push(b"...", tag=7, ttl=0.5)        # PushStatus.OK / FULL / TOO_BIG, never a silent drop
    record = box.pop(timeout=1.0)           # Record(payload, producer, seq, tag, ...) or None
    box.stats()                             # pushed, popped, full, too_big, expired, torn, depth
    box.push_many([b"a", b"b"]); box.pop_many(64, timeout=1.0)      # one lock per batch

Timeouts everywhere: None or 0 does not wait, a number waits up to that many seconds, math.inf
waits for ever. A ring that must reach several consumers each (a broadcast) is one ring per
consumer; one ring shared by several consumers is a work queue.

Guarantees (each is tested in tests/test_sage_mailbox*.py):
- Delivery: each record is delivered to exactly one consumer (a work queue, not a broadcast), and
  records of one producer handle are delivered in the order it pushed them (FIFO per producer; the
  ring is FIFO overall). `Record.seq` counts 0, 1, 2, ... per producer so gaps are visible.
- A record is delivered when `pop` returns it. A consumer killed inside `pop` (before its commit
  store) leaves the record on the ring for the next consumer; one killed after `pop` returned has
  taken the record with it (for `pop_many`: the whole batch): acknowledge at the application level
  when that matters.
- A producer killed at any point, even holding the lock in the middle of writing, exposes no torn or
  stale record (its slot is not committed and is overwritten) and blocks nobody (the kernel drops
  its flock). A consumer that dies or stops never wedges producers: they get FULL, or wait at most
  their timeout.
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

Waiting: `wait="spin"` polls with sched_yield (lowest latency, one core busy while waiting), `"sleep"` parks on the
ring's doorbell FIFO at once (no core used, a wake-up costs a context switch), `"adaptive"` (the
default) polls for `spin_us` then sleeps. A producer blocked on FULL (push with a timeout) backs off
with sleeps of 50 us to 1 ms. The binary layout and the protocol a C producer follows are in
sage.layout.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import mmap
import os
import select
import sys
import time
import typing
import weakref
import zlib
from collections.abc import Callable
from typing import Self

from sage import layout, segment
from sage.layout import (
    PBM_EXPIRED,
    PBM_FULL,
    PBM_NEXT_PRODUCER,
    PBM_READ,
    PBM_SLEEPERS,
    PBM_SLOT_HEADER,
    PBM_TOO_BIG,
    PBM_TORN,
    PBM_WAKE_UNTIL,
    PBM_WRITE,
    SLOT_BODY,
    SLOT_BODY_OFFSET,
    SLOT_HEAD,
)
from sage.shm import FileLock, ProcessId, segment_path

log = logging.getLogger(__name__)

MAX_RECORD_SIZE = 64 << 20
MAX_CAPACITY = 1 << 24
MAX_FILE_SIZE = 8 << 30
WAIT_MODES = ("spin", "sleep", "adaptive")
_SLEEP_SLICE_NS = 500_000_000  # a sleeping consumer re-arms the doorbell at least this often
_U32 = 1 << 32


class MailboxError(segment.SegmentError):
    """A mailbox operation failed; the message names the mailbox and the fix."""


MailboxExistsError = segment.SegmentExistsError
MailboxNotFoundError = segment.SegmentNotFoundError
MailboxCorruptError = segment.SegmentCorruptError
MailboxRetiredError = segment.SegmentRetiredError


class PushStatus(enum.Enum):
    OK = "ok"
    FULL = "full"
    TOO_BIG = "too_big"


class Record(typing.NamedTuple):  # a NamedTuple: built 3x faster than a frozen dataclass
    payload: bytes
    producer: int  # producer id, unique per producer handle on this ring
    seq: int  # 0, 1, 2, ... per producer
    tag: int
    pid: int  # producer's process id
    pushed_ns: int  # CLOCK_MONOTONIC at push
    deadline_ns: int  # 0 = no ttl


@dataclasses.dataclass(frozen=True)
class MailboxStats:
    pushed: int
    popped: int
    full: int
    too_big: int
    expired: int
    torn: int
    depth: int
    capacity: int
    record_size: int
    producers: int
    owner_alive: bool


_handles: weakref.WeakSet[Mailbox] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child is another producer (its FileLock reopens the file by itself).
    for box in list(_handles):
        box._reopen_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

if sys.byteorder != "little":
    raise ImportError("sage.mailbox maps its little-endian layout with native stores: a little-endian host is needed")


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
        raise ValueError(f"wait must be one of {WAIT_MODES}, got {wait!r}")
    if not (isinstance(spin_us, (int, float)) and spin_us >= 0):
        raise ValueError(f"spin_us must be a number >= 0, got {spin_us!r}")


def _bell_path(name: str):
    path = segment_path("pbm", name)
    return path.with_name(path.name + ".bell")


class Mailbox:
    """A handle on one PBM ring. Not for use after close(); one handle may be shared by threads."""

    # ---- life cycle ----
    @classmethod
    def create(cls, name: str, *, record_size: int, capacity: int, stale: str = "reset",
               wait: str = "adaptive", spin_us: float = 50.0, checksum: bool = True) -> Mailbox:
        """Create the ring `name` holding `capacity` records of up to `record_size` payload bytes.
        checksum=False leaves payloads out of the slot CRC (the 40 header bytes stay covered): the
        commit protocol already hides torn writes, and zlib's CRC32 costs ~1 us per KB here."""
        _check_geometry(record_size, capacity)
        _check_wait(wait, spin_us)
        path = segment_path("pbm", name)
        bell = _bell_path(name)
        try:
            os.mkfifo(bell, 0o600)
        except FileExistsError:
            pass
        stride = layout.pbm_stride(record_size)
        flags = layout.PBM_PAYLOAD_CRC if checksum else 0

        def init(mm: mmap.mmap) -> None:
            segment.write_header(mm, segment.Header(layout.PBM_MAGIC, layout.VERSION, layout.HEADER_SIZE,
                                                    PBM_SLOT_HEADER, record_size, stride, capacity,
                                                    ProcessId.current(), flags))

        def compatible(header: segment.Header) -> bool:
            return (header.a, header.c, header.flags) == (record_size, capacity, flags)

        opened = segment.create_new(path, layout.HEADER_SIZE + capacity * stride, init, "mailbox", name,
                                    stale=stale, compatible=compatible, magic=layout.PBM_MAGIC)
        return cls(name, opened, wait, spin_us)

    @classmethod
    def attach(cls, name: str, *, wait: str = "adaptive", spin_us: float = 50.0) -> Mailbox:
        """Open an existing ring by name, from any process on this machine."""
        _check_wait(wait, spin_us)
        opened = segment.open_existing(segment_path("pbm", name), layout.PBM_MAGIC, "mailbox", name)
        box = cls(name, opened, wait, spin_us)
        if not opened.header.creator.alive():
            log.warning("mailbox %r: its creator (pid %d) is gone; its records are still deliverable",
                        name, opened.header.creator.pid)
        return box

    def __init__(self, name: str, opened: segment.Opened, wait: str, spin_us: float):
        header, path = opened.header, segment_path("pbm", name)
        self.name = name
        self.path = path
        self._mm = opened.mm
        try:
            self._check_layout(header)
            self._bell = os.open(_bell_path(name), os.O_RDWR | os.O_NONBLOCK)
        except BaseException:
            self._mm.close()
            os.close(opened.fd)
            raise
        self.record_size, self.stride, self.capacity = header.a, header.b, header.c
        self.creator = header.creator
        self.checksum = bool(header.flags & layout.PBM_PAYLOAD_CRC)
        self.wait, self.spin_us = wait, spin_us
        self._view = memoryview(self._mm)
        # Typed memoryviews: an item store is one native 8-byte store (a memcpy of constant size), so
        # an index is never half-written even by a process killed mid-store; numpy scalars cost 10x.
        counters = layout.PBM_COUNTERS_OFFSET
        self._ctr = self._view[counters:counters + 8 * len(layout.PBM_COUNTERS)].cast("Q")
        self._state = self._view[layout.PBM_STATE:layout.PBM_STATE + 4].cast("I")
        self._lock = FileLock(opened.fd)
        self._pid = os.getpid()
        self._producer: int | None = None
        self._producer_seq = 0
        self._closed = False
        # Injectable for tests: the TTL clock, and a hook called inside the critical section
        # ("push" half-way through the payload, "pop" before the commit store).
        self._clock: Callable[[], int] = time.monotonic_ns
        self._test_hook: Callable[[str], None] | None = None
        _handles.add(self)

    def _check_layout(self, header: segment.Header) -> None:
        size = len(self._mm)
        ok = (header.header_size == layout.HEADER_SIZE and header.u32_field == PBM_SLOT_HEADER
              and 1 <= header.a <= MAX_RECORD_SIZE and header.b == layout.pbm_stride(header.a)
              and 1 <= header.c <= MAX_CAPACITY and size == layout.HEADER_SIZE + header.c * header.b
              and header.flags & ~layout.PBM_PAYLOAD_CRC == 0)
        if not ok:
            raise MailboxCorruptError(f"{self.path}: header geometry (record_size {header.a}, stride {header.b}, "
                                      f"capacity {header.c}) does not match the file's {size} bytes; remove it "
                                      f"and create the mailbox again")

    def _reopen_after_fork(self) -> None:
        self._pid = os.getpid()
        self._producer, self._producer_seq = None, 0

    def close(self) -> None:
        """Unmap and close this handle (the ring stays for the others). Idempotent."""
        if self._closed:
            return
        self._closed = True
        _handles.discard(self)
        self._ctr.release()
        self._state.release()
        self._view.release()
        self._mm.close()
        self._lock.close()
        os.close(self._bell)

    def unlink(self) -> None:
        """Remove the ring's name (handles still open get MailboxRetiredError); then close()."""
        self._check_open()
        with self._lock:
            segment.retire(self._mm)
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
        return f"Mailbox({self.name!r}, record_size={self.record_size}, capacity={self.capacity})"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"mailbox {self.name!r}: this handle is closed; attach again")

    def _check_live(self) -> None:
        if self._state[0] != layout.STATE_LIVE:
            raise MailboxRetiredError(f"mailbox {self.name!r} was recreated or unlinked by another process; "
                                      f"attach again")

    # ---- producer side ----
    def push(self, payload, *, tag: int = 0, ttl: float | None = None,
             timeout: float | None = None) -> PushStatus:
        """Append one record. FULL when the ring stays full for `timeout` seconds (None or 0: do not
        wait; math.inf: wait for space); TOO_BIG when the payload exceeds record_size. A record
        with `ttl` seconds is counted expired instead of delivered once that time has passed."""
        self._check_open()
        if type(payload) is not bytes:
            payload = memoryview(payload).cast("B")
        deadline = self._deadline(tag, ttl)
        if len(payload) > self.record_size:
            with self._lock:
                self._check_live()
                self._ctr[PBM_TOO_BIG] += 1
            return PushStatus.TOO_BIG
        if not timeout:
            return self._try_push(payload, tag, deadline, count_full=True)
        give_up = time.monotonic() + timeout
        pause = 50e-6
        while True:
            last = time.monotonic() >= give_up
            status = self._try_push(payload, tag, deadline, count_full=last)
            if status is PushStatus.OK or last:
                return status
            time.sleep(min(pause, max(0.0, give_up - time.monotonic())))
            pause = min(pause * 2, 1e-3)

    def _try_push(self, payload, tag: int, deadline: int, count_full: bool) -> PushStatus:
        with self._lock:
            self._check_live()
            if not self._write_locked(payload, tag, deadline):
                if count_full:
                    self._ctr[PBM_FULL] += 1
                return PushStatus.FULL
            wake_until = self._ctr[PBM_WAKE_UNTIL] if self._ctr[PBM_SLEEPERS] else 0
        self._ring_if_asked(wake_until)
        return PushStatus.OK

    def push_many(self, payloads, *, tag: int = 0, ttl: float | None = None) -> int:
        """Push payloads in order under one lock until the ring is full; returns how many went in
        (the rest were not pushed and are counted once in `full`). Raises ValueError, pushing
        nothing, when one is larger than record_size."""
        self._check_open()
        payloads = [p if type(p) is bytes else memoryview(p).cast("B") for p in payloads]
        too_big = next((i for i, p in enumerate(payloads) if len(p) > self.record_size), None)
        if too_big is not None:
            raise ValueError(f"payload {too_big} is {len(payloads[too_big])} bytes, more than mailbox "
                             f"{self.name!r}'s record_size {self.record_size}")
        deadline = self._deadline(tag, ttl)
        pushed = 0
        with self._lock:
            self._check_live()
            for payload in payloads:
                if not self._write_locked(payload, tag, deadline):
                    self._ctr[PBM_FULL] += 1
                    break
                pushed += 1
            wake_until = self._ctr[PBM_WAKE_UNTIL] if self._ctr[PBM_SLEEPERS] else 0
        if pushed:
            self._ring_if_asked(wake_until)
        return pushed

    def _deadline(self, tag: int, ttl: float | None) -> int:
        if not isinstance(tag, int) or not 0 <= tag < _U32:
            raise ValueError(f"tag must be an int in [0, 2**32), got {tag!r}")
        if ttl is not None and not (isinstance(ttl, (int, float)) and ttl >= 0 and math.isfinite(ttl)):
            raise ValueError(f"ttl must be None or a finite number of seconds >= 0, got {ttl!r}")
        return 0 if ttl is None else max(1, self._clock() + int(ttl * 1e9))

    def _write_locked(self, payload, tag: int, deadline: int) -> bool:
        """Write and commit one record at write_index; False if the ring is full. Lock held."""
        ctr, mm, n = self._ctr, self._mm, len(payload)
        w = ctr[PBM_WRITE]
        if w - ctr[PBM_READ] >= self.capacity:
            return False
        if self._producer is None:
            self._producer = ctr[PBM_NEXT_PRODUCER] % _U32
            ctr[PBM_NEXT_PRODUCER] += 1
        off = layout.HEADER_SIZE + (w % self.capacity) * self.stride
        body = SLOT_BODY.pack(self._producer, self._pid % _U32, self._producer_seq, time.monotonic_ns(),
                              deadline, tag, 0)
        start = off + PBM_SLOT_HEADER
        mm[off + SLOT_BODY_OFFSET:start] = body
        if self._test_hook is None:
            mm[start:start + n] = payload
        else:
            half = n // 2
            mm[start:start + half] = payload[:half]
            self._test_hook("push")
            mm[start + half:start + n] = payload[half:]
        crc = zlib.crc32(payload, zlib.crc32(body)) if self.checksum else zlib.crc32(body)
        SLOT_HEAD.pack_into(mm, off, w + 1, crc, n)  # seq, crc, length: ordered by the lock
        ctr[PBM_WRITE] = w + 1  # the commit point: one aligned 8-byte store
        self._producer_seq += 1
        return True

    def _ring_if_asked(self, wake_until: int) -> None:
        if wake_until > time.monotonic_ns():
            try:
                os.write(self._bell, b"\x01")
            except BlockingIOError:
                pass  # the doorbell already holds 64 KiB of rings: waiters will wake anyway

    # ---- consumer side ----
    def pop(self, timeout: float | None = None) -> Record | None:
        """Take the oldest live record; None if there is none within `timeout` seconds (None or 0:
        do not wait; math.inf: wait for one)."""
        self._check_open()
        record = self._try_pop()
        if record is not None or not timeout:
            return record
        return self._wait_pop(time.monotonic_ns() + (1 << 62 if math.isinf(timeout) else int(timeout * 1e9)))

    def _try_pop(self) -> Record | None:
        ctr = self._ctr
        if ctr[PBM_READ] >= ctr[PBM_WRITE]:  # unlocked peek: an empty ring costs no syscall
            self._check_live()
            return None
        with self._lock:
            self._check_live()
            return self._take_locked()

    def _take_locked(self) -> Record | None:
        ctr, mm, view = self._ctr, self._mm, self._view
        while True:
            r = ctr[PBM_READ]
            if r >= ctr[PBM_WRITE]:
                return None
            off = layout.HEADER_SIZE + (r % self.capacity) * self.stride
            seq, crc, n = SLOT_HEAD.unpack_from(mm, off)
            start = off + PBM_SLOT_HEADER
            covered = start + n if self.checksum else start
            if seq != r + 1 or n > self.record_size or zlib.crc32(view[off + SLOT_BODY_OFFSET:covered]) != crc:
                log.warning("mailbox %r: slot for record %d failed its seq/crc check; dropped", self.name, r)
                ctr[PBM_READ] = r + 1
                ctr[PBM_TORN] += 1
                continue
            producer, pid, pseq, pushed_ns, deadline, tag, _ = SLOT_BODY.unpack_from(mm, off + SLOT_BODY_OFFSET)
            if deadline and deadline <= self._clock():
                ctr[PBM_READ] = r + 1
                ctr[PBM_EXPIRED] += 1
                continue
            payload = mm[start:start + n]
            if self._test_hook is not None:
                self._test_hook("pop")
            ctr[PBM_READ] = r + 1  # the commit point
            return Record(payload, producer, pseq, tag, pid, pushed_ns, deadline)

    def pop_many(self, max_records: int, timeout: float | None = None) -> list[Record]:
        """Take up to `max_records` records under one lock (waiting up to `timeout` for the first).
        They are claimed at once: a consumer killed before using them has taken them all."""
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be an int >= 1, got {max_records!r}")
        first = self.pop(timeout)
        if first is None:
            return []
        records = [first]
        with self._lock:
            self._check_live()
            while len(records) < max_records:
                record = self._take_locked()
                if record is None:
                    break
                records.append(record)
        return records

    def _wait_pop(self, deadline_ns: int) -> Record | None:
        spin_ns = {"spin": 1 << 62, "sleep": 0, "adaptive": int(self.spin_us * 1e3)}[self.wait]
        spin_until = time.monotonic_ns() + spin_ns
        while True:
            record = self._try_pop()
            if record is not None:
                return record
            now = time.monotonic_ns()
            if now >= deadline_ns:
                return None
            if now < spin_until:
                # Yield while polling: on an idle core it returns at once, on a busy machine it lets
                # the producer we are waiting for run instead of burning our whole time slice.
                os.sched_yield()
                continue
            wake_at = min(deadline_ns, now + _SLEEP_SLICE_NS)
            if self.arm_doorbell(wake_at):
                continue
            self.sleep_on_doorbell((wake_at - now) / 1e9)
            with self._lock:  # stop asking for rings and look, in one critical section
                self._disarm_locked()
                self._check_live()
                record = self._take_locked()
            if record is not None:
                return record

    def arm_doorbell(self, until_ns: int) -> bool:
        """Ask producers to ring the doorbell until `until_ns`; True if a record is already there
        (then do not sleep). Taken under the lock, so no push between this and the sleep is missed.
        After a False, sleep, then call disarm_doorbell() (producers ring while anyone is armed)."""
        with self._lock:
            self._check_live()
            ctr = self._ctr
            if ctr[PBM_READ] < ctr[PBM_WRITE]:
                return True
            ctr[PBM_SLEEPERS] += 1
            ctr[PBM_WAKE_UNTIL] = max(ctr[PBM_WAKE_UNTIL], until_ns)
            return False

    def disarm_doorbell(self) -> None:
        with self._lock:
            self._disarm_locked()

    def _disarm_locked(self) -> None:
        if self._ctr[PBM_SLEEPERS]:
            self._ctr[PBM_SLEEPERS] -= 1

    def doorbell_fd(self) -> int:
        """The doorbell's file descriptor, readable after a push: for select() over several rings."""
        return self._bell

    def sleep_on_doorbell(self, seconds: float) -> None:
        """Wait up to `seconds` for a ring, then empty the doorbell."""
        select.select([self._bell], [], [], max(0.0, seconds))
        try:
            while len(os.read(self._bell, 65536)) == 65536:
                pass
        except BlockingIOError:
            pass  # empty, or another consumer drained it first

    # ---- telemetry ----
    def stats(self) -> MailboxStats:
        self._check_open()
        with self._lock:
            values = self._ctr.tolist()
        w, r = values[PBM_WRITE], values[PBM_READ]
        expired, torn = values[PBM_EXPIRED], values[PBM_TORN]
        return MailboxStats(pushed=w, popped=r - expired - torn, full=values[PBM_FULL],
                            too_big=values[PBM_TOO_BIG], expired=expired, torn=torn, depth=w - r,
                            capacity=self.capacity, record_size=self.record_size,
                            producers=values[PBM_NEXT_PRODUCER], owner_alive=self.creator.alive())
