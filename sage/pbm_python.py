"""The PBM ring's pure-Python engine: push / pop on the layout of sage.layout, standard library only.

Used where the C engine (sage._pbm, built from sage/_pbm.c) is not there, for rings whose lock is
flock (no robust mutexes on the platform), or when chosen with impl="python" / SAGE_MAILBOX_IMPL=python.
It follows the same protocol on the same bytes as the C engine, so processes using either share a
ring. Both engines have one interface: push, push_many, pop, pop_many (with Mailbox's signatures), arm,
disarm, counters, retire, after_fork, close, and the attributes clock, test_hook, producer_seq, closed.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import select
import time
import zlib
from collections.abc import Callable

from sage import layout
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
from sage.mutex import RobustMutex
from sage.pbm_types import MailboxRetiredError, PushStatus, Record
from sage.shm import FileLock

log = logging.getLogger("sage.mailbox")

_U32 = 1 << 32
_FOREVER = (1 << 63) - 1


def _writable_bytes(obj, what: str) -> memoryview:
    view = memoryview(obj)
    if view.readonly:
        raise BufferError(f"{what}: object is not writable")
    if not view.c_contiguous:
        raise BufferError(f"{what}: object is not C-contiguous")
    return view.cast("B")


def _uint32_array(obj, n: int) -> memoryview:
    view = memoryview(obj)
    if view.readonly or not view.c_contiguous or view.itemsize != 4 or view.format.lstrip("<=@") != "I" \
            or view.nbytes // 4 < n:
        raise ValueError(f"lengths must be a writable uint32 array of at least {n} items (one per record the "
                         f"buffer holds), e.g. numpy.empty({n}, numpy.uint32)")
    return view.cast("B").cast("I")
SPIN_YIELD_NS = 100_000  # a busy-polling consumer yields its core this often (the C engine's SPIN_YIELD_NS)
WAIT_SPIN, WAIT_SLEEP, WAIT_ADAPTIVE = range(3)  # the C engine's numbering


def give_up_ns(timeout) -> int | None:
    """None / 0: do not wait (None); a number of seconds from now (negative: now); math.inf: for ever."""
    if not timeout:
        return None
    if math.isnan(timeout):
        raise ValueError(f"timeout must be None or a number of seconds (math.inf: wait for ever), got {timeout!r}")
    now = time.monotonic_ns()
    if timeout >= 9.2e9:
        return _FOREVER
    return now if timeout <= 0 else now + int(timeout * 1e9)


def sleep_on_bell(bell: int, seconds: float) -> None:
    """Wait up to `seconds` for a ring of the doorbell FIFO, then empty it."""
    select.select([bell], [], [], max(0.0, seconds))
    drain_bell(bell)


def drain_bell(bell: int) -> None:
    try:
        while len(os.read(bell, 65536)) == 65536:
            pass
    except BlockingIOError:
        pass  # empty, or another consumer drained it first


class PythonRing:
    def __init__(self, mm: mmap.mmap, fd: int, bell: int, name: str, *, record_size: int, stride: int,
                 capacity: int, payload_crc: bool, lock_mutex: bool, wait: int, spin_ns: int, sleep_slice_ns: int):
        self.name = name
        self.record_size, self.stride, self.capacity, self.payload_crc = record_size, stride, capacity, payload_crc
        self.wait, self.spin_ns, self.sleep_slice_ns = wait, spin_ns, sleep_slice_ns
        self._mm, self._bell = mm, bell
        self._view = memoryview(mm)
        # Typed memoryviews: an item store is one native 8-byte store (a memcpy of constant size), so
        # an index is never half-written even by a process killed mid-store; numpy scalars cost 10x.
        counters = layout.PBM_COUNTERS_OFFSET
        self._ctr = self._view[counters:counters + 8 * len(layout.PBM_COUNTERS)].cast("Q")
        self._state = self._view[layout.PBM_STATE:layout.PBM_STATE + 4].cast("I")
        what = f"mailbox {name!r}"
        self._lock = RobustMutex(mm, layout.PBM_MUTEX_OFFSET, what) if lock_mutex else FileLock(os.dup(fd))
        self._pid = os.getpid()
        self._producer: int | None = None
        self.producer_seq = 0
        self.closed = False
        # Injectable for tests: the TTL clock, and a hook called inside the critical section
        # ("push" half-way through the payload, "pop" before the commit store).
        self.clock: Callable[[], int] = time.monotonic_ns
        self.test_hook: Callable[[str], None] | None = None

    def after_fork(self) -> None:
        self._pid = os.getpid()
        self._producer, self.producer_seq = None, 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._lock.close()
        self._ctr.release()
        self._state.release()
        self._view.release()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"mailbox {self.name!r}: this handle is closed; attach again")

    def _check_live(self) -> None:
        if self._state[0] != layout.STATE_LIVE:
            raise MailboxRetiredError(f"mailbox {self.name!r} was recreated or unlinked by another process; "
                                      f"attach again")

    # ---- producer side ----
    def push(self, payload, *, tag: int = 0, ttl: float | None = None, timeout: float | None = None) -> PushStatus:
        self._check_open()
        if type(payload) is not bytes:
            payload = memoryview(payload).cast("B")
        deadline = self._deadline(tag, ttl)
        if len(payload) > self.record_size:
            with self._lock:
                self._check_live()
                self._ctr[PBM_TOO_BIG] += 1
            return PushStatus.TOO_BIG
        give_up = give_up_ns(timeout)
        payload_crc = zlib.crc32(payload) if self.payload_crc else 0  # outside the lock (sage.layout)
        pause = 50e-6
        while True:
            last = give_up is None or time.monotonic_ns() >= give_up
            status = self._try_push(payload, payload_crc, tag, deadline, count_full=last)
            if status is PushStatus.OK or last:
                return status
            time.sleep(min(pause, max(0.0, (give_up - time.monotonic_ns()) / 1e9)))
            pause = min(pause * 2, 1e-3)
            self._check_open()

    def _try_push(self, payload, payload_crc: int, tag: int, deadline: int, count_full: bool) -> PushStatus:
        with self._lock:
            self._check_live()
            if not self._write_locked(payload, payload_crc, tag, deadline):
                if count_full:
                    self._ctr[PBM_FULL] += 1
                return PushStatus.FULL
            wake_until = self._ctr[PBM_WAKE_UNTIL] if self._ctr[PBM_SLEEPERS] else 0
        self._ring_if_asked(wake_until)
        return PushStatus.OK

    def push_many(self, payloads, *, tag: int = 0, ttl: float | None = None) -> int:
        self._check_open()
        payloads = [p if type(p) is bytes else memoryview(p).cast("B") for p in payloads]
        too_big = next((i for i, p in enumerate(payloads) if len(p) > self.record_size), None)
        if too_big is not None:
            raise ValueError(f"payload {too_big} is {len(payloads[too_big])} bytes, more than mailbox "
                             f"{self.name!r}'s record_size {self.record_size}")
        deadline = self._deadline(tag, ttl)
        crcs = [zlib.crc32(p) if self.payload_crc else 0 for p in payloads]
        pushed = 0
        with self._lock:
            self._check_live()
            for payload, payload_crc in zip(payloads, crcs):
                if not self._write_locked(payload, payload_crc, tag, deadline):
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
        return 0 if ttl is None else max(1, min(_FOREVER, self.clock() + int(ttl * 1e9)))

    def _write_locked(self, payload, payload_crc: int, tag: int, deadline: int) -> bool:
        """Write and commit one record at write_index; False if the ring is full. Lock held."""
        ctr, mm, n = self._ctr, self._mm, len(payload)
        w = ctr[PBM_WRITE]
        if w - ctr[PBM_READ] >= self.capacity:
            return False
        if self._producer is None:
            self._producer = ctr[PBM_NEXT_PRODUCER] % _U32
            ctr[PBM_NEXT_PRODUCER] += 1
        off = layout.HEADER_SIZE + (w % self.capacity) * self.stride
        body = SLOT_BODY.pack(self._producer, self._pid % _U32, self.producer_seq, time.monotonic_ns(),
                              deadline, tag, 0)
        start = off + PBM_SLOT_HEADER
        mm[off + SLOT_BODY_OFFSET:start] = body
        if self.test_hook is None:
            mm[start:start + n] = payload
        else:
            half = n // 2
            mm[start:start + half] = payload[:half]
            self.test_hook("push")
            mm[start + half:start + n] = payload[half:]
        # seq, crc, length: ordered by the lock. The CRC continues from the payload's over the header fields.
        SLOT_HEAD.pack_into(mm, off, w + 1, zlib.crc32(body, payload_crc), n)
        ctr[PBM_WRITE] = w + 1  # the commit point: one aligned 8-byte store
        self.producer_seq += 1
        return True

    def _ring_if_asked(self, wake_until: int) -> None:
        if wake_until > time.monotonic_ns():
            try:
                os.write(self._bell, b"\x01")
            except BlockingIOError:
                pass  # the doorbell already holds 64 KiB of rings: waiters will wake anyway

    # ---- consumer side ----
    def pop(self, timeout: float | None = None) -> Record | None:
        self._check_open()
        records = self._pop(1, timeout)
        return records[0] if records else None

    def pop_many(self, max_records: int, timeout: float | None = None) -> list[Record]:
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be an int >= 1, got {max_records!r}")
        self._check_open()
        return self._pop(max_records, timeout)

    def pop_into(self, out, lengths=None, timeout: float | None = None) -> int:
        view = _writable_bytes(out, "out")
        rows = min(len(view) // self.record_size, self.capacity)  # no batch is longer than the ring
        if rows < 1:
            raise ValueError(f"mailbox {self.name!r}: out holds {len(view)} bytes, less than one record of "
                             f"record_size {self.record_size}; give it rows of record_size bytes, e.g. "
                             f"numpy.empty((n, {self.record_size}), numpy.uint8)")
        sizes = None if lengths is None else _uint32_array(lengths, rows)
        self._check_open()
        records = self._pop(rows, timeout)
        for i, record in enumerate(records):
            start = i * self.record_size
            view[start:start + len(record.payload)] = record.payload
            if sizes is not None:
                sizes[i] = len(record.payload)
        return len(records)

    def _pop(self, most: int, timeout) -> list[Record]:
        give_up = give_up_ns(timeout)
        records = self._try_take(most)
        if records or give_up is None:
            return records
        spin_ns = {WAIT_SPIN: _FOREVER, WAIT_SLEEP: 0, WAIT_ADAPTIVE: self.spin_ns}[self.wait]
        spin_until = min(_FOREVER, time.monotonic_ns() + spin_ns)
        next_yield = 0
        while True:
            self._check_open()  # another thread may have closed this handle while we waited
            records = self._try_take(most)
            if records:
                return records
            now = time.monotonic_ns()
            if now >= give_up:
                return []
            if now < spin_until:
                # Yield now and then while polling: on a busy machine it lets the producer we wait
                # for run instead of burning our whole time slice; not on every poll, since a yield
                # is a system call during which a record goes unseen (as the C engine does).
                if now >= next_yield:
                    os.sched_yield()
                    next_yield = now + SPIN_YIELD_NS
                continue
            records = self._sleep_and_take(most, now, min(give_up, now + self.sleep_slice_ns))
            if records:
                return records

    def _try_take(self, most: int) -> list[Record]:
        ctr = self._ctr
        if ctr[PBM_READ] >= ctr[PBM_WRITE]:  # unlocked peek: an empty ring costs no lock
            self._check_live()
            return []
        with self._lock:
            self._check_live()
            return self._take_locked(most)

    def _sleep_and_take(self, most: int, now: int, wake_at: int) -> list[Record]:
        if self.arm(wake_at):
            return []
        try:
            select.select([self._bell], [], [], max(0.0, (wake_at - now) / 1e9))
            self._check_open()
            drain_bell(self._bell)
        except BaseException:
            if not self.closed:
                self.disarm()  # interrupted: stop being counted as a sleeper
            raise
        with self._lock:  # stop asking for rings and look, in one critical section
            self._disarm_locked()
            self._check_live()
            return self._take_locked(most)

    def _take_locked(self, most: int) -> list[Record]:
        ctr, mm, view, records = self._ctr, self._mm, self._view, []
        while len(records) < most:
            r = ctr[PBM_READ]
            if r >= ctr[PBM_WRITE]:
                break
            off = layout.HEADER_SIZE + (r % self.capacity) * self.stride
            seq, crc, n = SLOT_HEAD.unpack_from(mm, off)
            start = off + PBM_SLOT_HEADER
            if seq != r + 1 or n > self.record_size or self._slot_crc(view, off, n) != crc:
                log.warning("mailbox %r: slot for record %d failed its seq/crc check; dropped", self.name, r)
                ctr[PBM_READ] = r + 1
                ctr[PBM_TORN] += 1
                continue
            producer, pid, pseq, pushed_ns, deadline, tag, _ = SLOT_BODY.unpack_from(mm, off + SLOT_BODY_OFFSET)
            if deadline and deadline <= self.clock():
                ctr[PBM_READ] = r + 1
                ctr[PBM_EXPIRED] += 1
                continue
            payload = mm[start:start + n]
            if self.test_hook is not None:
                self.test_hook("pop")
            ctr[PBM_READ] = r + 1  # the commit point
            records.append(Record(payload, producer, pseq, tag, pid, pushed_ns, deadline))
        return records

    def _slot_crc(self, view, off: int, n: int) -> int:
        start = off + PBM_SLOT_HEADER
        payload_crc = zlib.crc32(view[start:start + n]) if self.payload_crc else 0
        return zlib.crc32(view[off + SLOT_BODY_OFFSET:start], payload_crc)

    # ---- doorbell, counters, life cycle ----
    def arm(self, until_ns: int) -> bool:
        self._check_open()
        with self._lock:
            self._check_live()
            ctr = self._ctr
            if ctr[PBM_READ] < ctr[PBM_WRITE]:
                return True
            ctr[PBM_SLEEPERS] += 1
            ctr[PBM_WAKE_UNTIL] = max(ctr[PBM_WAKE_UNTIL], until_ns)
            return False

    def disarm(self) -> None:
        self._check_open()
        with self._lock:
            self._disarm_locked()

    def _disarm_locked(self) -> None:
        if self._ctr[PBM_SLEEPERS]:
            self._ctr[PBM_SLEEPERS] -= 1

    def counters(self) -> tuple[int, ...]:
        self._check_open()
        with self._lock:
            return tuple(self._ctr.tolist())

    def retire(self) -> None:
        self._check_open()
        with self._lock:
            self._state[0] = layout.STATE_RETIRED
