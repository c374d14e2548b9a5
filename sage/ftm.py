"""FTM, the focus tensor mailbox: tensors handed between processes by a 128-byte descriptor.

    arena = TensorArena.create("frames", buffer_size=1 << 20, buffers=16)        # owner
    out = arena.alloc((480, 640), "float16")      # a writable numpy view into shared memory
    out.array[...] = frame                        # the producer writes in place (no copy after this)
    desc = arena.publish(out, tag=3, ttl=0.1)     # TensorDescriptor; desc.pack() -> 128 bytes
    mailbox.push(desc.pack(), ttl=0.1)            # through any PBM ring

    desc = TensorDescriptor.unpack(mailbox.pop(timeout=1).payload)              # consumer
    with TensorArena.attach(desc.arena).open(desc) as lease:
        lease.array                               # zero-copy, read-only numpy view (bfloat16 too)

Guarantees (tests/test_sage_ftm.py):
- A buffer is never reused while anybody holds it: the writer between alloc and publish, every
  reader between open and release, and the hand-off itself until the descriptor has been opened
  `readers` times or its ttl passed. Every holder is a lease (pid, start time, expiry) in the
  arena's table; leases of dead processes and expired ones are reclaimed at the next alloc that
  finds no free buffer (or at `reclaim()`), so a killed reader or writer never leaks a buffer.
- Each alloc bumps the buffer's generation; a descriptor names one generation, so opening a
  descriptor whose buffer was reclaimed and reused raises StaleDescriptorError instead of showing
  another tensor's bytes; one past its ttl raises TensorExpiredError.
- Readers get views of a read-only mapping: writing through them raises. A view must not be used
  after its lease is released (the bytes may belong to the next tensor by then).
- An exhausted arena answers ArenaExhaustedError after `timeout`, never a silent overwrite.
- Give hand-offs a ttl: a descriptor lost in transit (its consumer died after popping it, before
  opening it) holds its buffer until that ttl passes; without one, until the arena is recreated.
The layout of the arena file and of the descriptor is in sage.layout.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import mmap
import os
import time
from collections.abc import Sequence
from typing import Self

import ml_dtypes
import numpy as np

from sage import layout, segment
from sage.layout import (
    BUF_FREE,
    BUF_PUBLISHED,
    BUF_WRITING,
    ENTRY_GENERATION,
    ENTRY_HANDOFF_DEADLINE,
    ENTRY_STATE_PENDING,
    ENTRY_WRITER_PID,
    ENTRY_WRITER_START,
    FTM_ENTRY_SIZE,
    FTM_LEASES,
)
from sage.shm import FileLock, ProcessId, process_alive, segment_path

log = logging.getLogger(__name__)

_WORDS = FTM_ENTRY_SIZE // 8
_LEASE_WORD = layout.FTM_LEASE_OFFSET // 8
MAX_BUFFERS = 1 << 16
ALLOCS, PUBLISHED, OPENED, RELEASED, RECLAIMED, EXPIRED, EXHAUSTED = range(len(layout.FTM_COUNTERS))


class DType(enum.IntEnum):
    F16 = 1
    F32 = 2
    BF16 = 3
    I32 = 4


NUMPY_DTYPES = {DType.F16: np.dtype(np.float16), DType.F32: np.dtype(np.float32),
                DType.BF16: np.dtype(ml_dtypes.bfloat16), DType.I32: np.dtype(np.int32)}
_BY_NUMPY = {v: k for k, v in NUMPY_DTYPES.items()}


def to_dtype(dtype) -> DType:
    """DType from a DType, a numpy dtype or a name ("float16", "bfloat16", ...)."""
    if isinstance(dtype, DType):
        return dtype
    try:
        return _BY_NUMPY[np.dtype(dtype)]
    except (TypeError, KeyError):
        names = sorted(str(d) for d in _BY_NUMPY)
        raise ValueError(f"dtype {dtype!r} cannot travel through FTM; use one of {names}") from None


class StaleDescriptorError(segment.SegmentError):
    """A descriptor names a buffer that has been reused since (its generation is older)."""


class TensorExpiredError(segment.SegmentError):
    """A descriptor's ttl has passed: the tensor was not delivered."""


class ArenaExhaustedError(segment.SegmentError):
    """Every buffer of the arena is leased: wait, release one, or make the arena larger."""


@dataclasses.dataclass(frozen=True)
class TensorDescriptor:
    arena: str
    buffer: int
    generation: int
    offset: int  # bytes from the start of the arena file
    nbytes: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    dtype: DType
    tag: int = 0
    deadline_ns: int = 0  # CLOCK_MONOTONIC; 0 = no ttl

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def pack(self) -> bytes:
        pad = 4 - self.ndim
        return layout.DESCRIPTOR.pack(layout.FTD_MAGIC, layout.FTD_VERSION, int(self.dtype), self.ndim,
                                      self.arena.encode("ascii"), self.offset, self.nbytes, self.buffer, self.tag,
                                      self.generation, *self.shape, *(0,) * pad, *self.strides, *(0,) * pad,
                                      self.deadline_ns)

    @classmethod
    def unpack(cls, raw: bytes) -> Self:
        if len(raw) != layout.DESCRIPTOR.size:
            raise ValueError(f"a tensor descriptor is {layout.DESCRIPTOR.size} bytes, got {len(raw)}: "
                             f"this record is not a TensorDescriptor.pack()")
        fields = layout.DESCRIPTOR.unpack(raw)
        magic, version, dtype, ndim, arena = fields[:5]
        if magic != layout.FTD_MAGIC or version != layout.FTD_VERSION:
            raise ValueError(f"not a version-{layout.FTD_VERSION} tensor descriptor (magic {magic!r}, "
                             f"version {version})")
        if dtype not in DType._value2member_map_ or ndim > 4:
            raise ValueError(f"corrupt tensor descriptor: dtype code {dtype}, ndim {ndim}")
        offset, nbytes, buffer, tag, generation = fields[5:10]
        shape, strides, deadline = fields[10:14], fields[14:18], fields[18]
        return cls(arena.rstrip(b"\0").decode("ascii"), buffer, generation, offset, nbytes, tuple(shape[:ndim]),
                   tuple(strides[:ndim]), DType(dtype), tag, deadline)


@dataclasses.dataclass(frozen=True)
class ArenaStats:
    allocs: int
    published: int
    opened: int
    released: int
    reclaimed: int
    expired: int
    exhausted: int
    free: int
    buffers: int
    buffer_size: int


class WritableTensor:
    """A buffer between alloc and publish: write `array` in place, then publish it."""

    def __init__(self, array: np.ndarray, buffer: int, generation: int):
        self.array, self.buffer, self.generation = array, buffer, generation


class TensorLease:
    """A reader's hold on a published buffer: `array` is a read-only view, valid until release()."""

    def __init__(self, arena: TensorArena, descriptor: TensorDescriptor, slot: int, array: np.ndarray):
        self.arena, self.descriptor, self.slot, self.array = arena, descriptor, slot, array
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.arena._release(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class TensorArena:
    """A handle on one FTM arena: `buffers` fixed-size buffers plus the table of who holds them."""

    @classmethod
    def create(cls, name: str, *, buffer_size: int, buffers: int, stale: str = "reset") -> Self:
        for field, value, top in (("buffer_size", buffer_size, 1 << 32), ("buffers", buffers, MAX_BUFFERS)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise ValueError(f"{field} must be an int in [1, {top}], got {value!r}")
        path = segment_path("ftm", name)  # validates the name
        if len(name) > 32:
            raise ValueError(f"arena name {name!r} is longer than the descriptor's 32 bytes; use a shorter name")
        buffer_size = -(-buffer_size // layout.PAGE) * layout.PAGE
        data_offset = -(-(layout.HEADER_SIZE + buffers * FTM_ENTRY_SIZE) // layout.PAGE) * layout.PAGE

        def init(mm: mmap.mmap) -> None:
            segment.write_header(mm, segment.Header(layout.FTM_MAGIC, layout.FTM_VERSION, layout.HEADER_SIZE,
                                                    FTM_ENTRY_SIZE, buffer_size, buffers, data_offset,
                                                    ProcessId.current()))

        opened = segment.create_new(path, data_offset + buffers * buffer_size, init, "arena",
                                    name, stale=stale, compatible=lambda h: (h.a, h.b) == (buffer_size, buffers),
                                    magic=layout.FTM_MAGIC)
        return cls(name, opened)

    @classmethod
    def attach(cls, name: str) -> Self:
        return cls(name, segment.open_existing(segment_path("ftm", name), layout.FTM_MAGIC, "arena", name))

    def __init__(self, name: str, opened: segment.Opened):
        header = opened.header
        self.name, self.path = name, segment_path("ftm", name)
        self.buffer_size, self.buffers, self.data_offset = header.a, header.b, header.c
        fd, self._mm = opened.fd, opened.mm
        expected = self.data_offset + self.buffers * self.buffer_size
        if header.u32_field != FTM_ENTRY_SIZE or len(self._mm) != expected or self.buffer_size % layout.PAGE:
            self._mm.close()
            os.close(fd)
            raise segment.SegmentCorruptError(f"{self.path}: header geometry does not match the file; remove it "
                                              f"and create the arena again")
        self._ro = mmap.mmap(fd, len(self._mm), access=mmap.ACCESS_READ)  # readers' views
        view = memoryview(self._mm)
        self._ctr = view[layout.FTM_COUNTERS_OFFSET:layout.FTM_COUNTERS_OFFSET + 8 * len(layout.FTM_COUNTERS)].cast("Q")
        self._table = view[layout.HEADER_SIZE:layout.HEADER_SIZE + self.buffers * FTM_ENTRY_SIZE].cast("Q")
        self._state = view[layout.FTM_STATE:layout.FTM_STATE + 4].cast("I")
        view.release()
        self._lock = FileLock(fd)
        self._me_cache = ProcessId.current()
        self._clock = time.monotonic_ns  # injectable for tests
        self._closed = False

    @property
    def _me(self) -> ProcessId:
        """This process (re-read after a fork: a child's leases must name the child)."""
        if self._me_cache.pid != os.getpid():
            self._me_cache = ProcessId.current()
        return self._me_cache

    # ---- table helpers (call under the lock) ----
    def _word(self, buffer: int, k: int) -> int:
        return self._table[buffer * _WORDS + k]

    def _set(self, buffer: int, k: int, value: int) -> None:
        self._table[buffer * _WORDS + k] = value

    def _state_pending(self, buffer: int) -> tuple[int, int]:
        word = self._word(buffer, ENTRY_STATE_PENDING)
        return word & 0xFFFFFFFF, word >> 32

    def _set_state(self, buffer: int, state: int, pending: int) -> None:
        self._set(buffer, ENTRY_STATE_PENDING, state | (pending << 32))

    def _leases(self, buffer: int) -> list[tuple[int, int, int]]:
        base = buffer * _WORDS + _LEASE_WORD
        return [(self._table[base + 3 * j], self._table[base + 3 * j + 1], self._table[base + 3 * j + 2])
                for j in range(FTM_LEASES)]

    def _set_lease(self, buffer: int, slot: int, pid: int, start: int, expiry: int) -> None:
        base = buffer * _WORDS + _LEASE_WORD + 3 * slot
        # pid marks the slot taken: written last when taking it, first when clearing it.
        if pid == 0:
            self._table[base] = 0
        self._table[base + 1] = start
        self._table[base + 2] = expiry
        self._table[base] = pid

    def _maybe_free(self, buffer: int) -> None:
        state, pending = self._state_pending(buffer)
        if state == BUF_PUBLISHED and pending == 0 and not any(pid for pid, _, _ in self._leases(buffer)):
            self._set_state(buffer, BUF_FREE, 0)

    def _check(self) -> None:
        if self._closed:
            raise ValueError(f"arena {self.name!r}: this handle is closed; attach again")
        if self._state[0] != layout.STATE_LIVE:
            raise segment.SegmentRetiredError(f"arena {self.name!r} was recreated or unlinked; attach again")

    # ---- producer side ----
    def alloc(self, shape: Sequence[int], dtype, *, timeout: float | None = None) -> WritableTensor:
        """A free buffer as a writable C-order array of `shape` and `dtype`; waits up to `timeout`
        seconds for one (reclaiming dead and expired holders), then raises ArenaExhaustedError."""
        self._check()
        dt = NUMPY_DTYPES[to_dtype(dtype)]
        shape = tuple(int(s) for s in shape)
        if len(shape) > 4 or any(s < 0 for s in shape):
            raise ValueError(f"shape {shape} must have at most 4 non-negative dims")
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes > self.buffer_size:
            raise ValueError(f"a {shape} {dt} tensor is {nbytes} bytes, more than arena {self.name!r}'s "
                             f"{self.buffer_size}-byte buffers; create the arena with a larger buffer_size")
        give_up = time.monotonic() + (timeout or 0)
        while True:
            buffer = self._claim_free()
            if buffer is not None:
                break
            if time.monotonic() >= give_up:
                with self._lock:
                    self._ctr[EXHAUSTED] += 1
                raise ArenaExhaustedError(f"arena {self.name!r}: all {self.buffers} buffers are held (by writers, "
                                          f"readers or descriptors in flight); release leases, give hand-offs "
                                          f"a ttl, or create the arena with more buffers")
            time.sleep(1e-4)
        array = np.ndarray(shape, dt, buffer=self._mm, offset=self.data_offset + buffer * self.buffer_size)
        return WritableTensor(array, buffer, self._word(buffer, ENTRY_GENERATION))

    def _claim_free(self) -> int | None:
        with self._lock:
            self._check()
            for attempt in range(2):
                for buffer in range(self.buffers):
                    if self._state_pending(buffer)[0] == BUF_FREE:
                        self._set(buffer, ENTRY_GENERATION, self._word(buffer, ENTRY_GENERATION) + 1)
                        self._set(buffer, ENTRY_WRITER_PID, self._me.pid)
                        self._set(buffer, ENTRY_WRITER_START, self._me.start)
                        self._set_state(buffer, BUF_WRITING, 0)
                        self._ctr[ALLOCS] += 1
                        return buffer
                if attempt == 0:
                    self._reclaim_locked()
        return None

    def publish(self, tensor: WritableTensor, *, tag: int = 0, ttl: float | None = None,
                readers: int = 1) -> TensorDescriptor:
        """Hand the written buffer over: it stays allocated until opened `readers` times (or `ttl`
        seconds passed) and every reader released it."""
        self._check()
        if not isinstance(readers, int) or not 1 <= readers < 1 << 31:
            raise ValueError(f"readers must be an int >= 1, got {readers!r}")
        if ttl is not None and not (ttl >= 0 and math.isfinite(ttl)):
            raise ValueError(f"ttl must be None or a finite number of seconds >= 0, got {ttl!r}")
        deadline = 0 if ttl is None else max(1, self._clock() + int(ttl * 1e9))
        with self._lock:
            self._check()
            buffer = tensor.buffer
            if (self._state_pending(buffer)[0] != BUF_WRITING
                    or self._word(buffer, ENTRY_GENERATION) != tensor.generation):
                raise StaleDescriptorError(f"arena {self.name!r}: buffer {buffer} was reclaimed before publish "
                                           f"(was this writer's process considered dead?); alloc again")
            self._set(buffer, ENTRY_HANDOFF_DEADLINE, deadline)
            self._set_state(buffer, BUF_PUBLISHED, readers)
            self._ctr[PUBLISHED] += 1
        array = tensor.array
        return TensorDescriptor(self.name, buffer, tensor.generation, self.data_offset + buffer * self.buffer_size,
                                array.nbytes, array.shape, array.strides, to_dtype(array.dtype), tag, deadline)

    def put(self, array: np.ndarray, *, tag: int = 0, ttl: float | None = None, readers: int = 1,
            timeout: float | None = None) -> TensorDescriptor:
        """alloc + one copy of `array` + publish, for producers whose data already exists."""
        out = self.alloc(array.shape, array.dtype, timeout=timeout)
        out.array[...] = array
        return self.publish(out, tag=tag, ttl=ttl, readers=readers)

    # ---- consumer side ----
    def open(self, descriptor: TensorDescriptor, *, lease_s: float | None = None) -> TensorLease:
        """Take a lease on the descriptor's buffer and view it read-only. `lease_s` bounds how long
        the lease protects the buffer (None: until release() or this process dies)."""
        self._check()
        d = descriptor
        if d.arena != self.name:
            raise ValueError(f"descriptor belongs to arena {d.arena!r}, not {self.name!r}; attach to that arena")
        self._check_extent(d)
        now = self._clock()
        expiry = 0 if lease_s is None else now + int(lease_s * 1e9)
        with self._lock:
            self._check()
            state, pending = self._state_pending(d.buffer)
            if self._word(d.buffer, ENTRY_GENERATION) != d.generation or state != BUF_PUBLISHED or pending == 0:
                raise StaleDescriptorError(f"arena {self.name!r}: the tensor of buffer {d.buffer} generation "
                                           f"{d.generation} is gone (opened by all its readers, expired, or "
                                           f"reclaimed)")
            deadline = self._word(d.buffer, ENTRY_HANDOFF_DEADLINE)
            if deadline and deadline <= now:
                self._set_state(d.buffer, BUF_PUBLISHED, 0)
                self._ctr[EXPIRED] += 1
                self._maybe_free(d.buffer)
                raise TensorExpiredError(f"arena {self.name!r}: buffer {d.buffer}'s hand-off ttl passed before "
                                         f"it was opened")
            slot = next((j for j, (pid, _, _) in enumerate(self._leases(d.buffer)) if pid == 0), None)
            if slot is None:
                raise ArenaExhaustedError(f"arena {self.name!r}: buffer {d.buffer} already has {FTM_LEASES} "
                                          f"readers; release one first")
            self._set_lease(d.buffer, slot, self._me.pid, self._me.start, expiry)
            self._set_state(d.buffer, BUF_PUBLISHED, pending - 1)
            self._ctr[OPENED] += 1
        array = np.ndarray(d.shape, NUMPY_DTYPES[d.dtype], buffer=self._ro, offset=d.offset, strides=d.strides)
        return TensorLease(self, d, slot, array)

    def _check_extent(self, d: TensorDescriptor) -> None:
        start = self.data_offset + d.buffer * self.buffer_size
        itemsize = NUMPY_DTYPES[d.dtype].itemsize
        extent = 0 if 0 in d.shape else itemsize + sum((n - 1) * s for n, s in zip(d.shape, d.strides, strict=True))
        ok = (0 <= d.buffer < self.buffers and len(d.strides) == d.ndim and all(s >= 0 for s in d.strides)
              and start <= d.offset and d.offset % itemsize == 0
              and d.offset + max(extent, d.nbytes) <= start + self.buffer_size)
        if not ok:
            raise ValueError(f"descriptor for arena {self.name!r} points outside buffer {d.buffer} "
                             f"(offset {d.offset}, shape {d.shape}, strides {d.strides}); it is corrupt")

    def _release(self, lease: TensorLease) -> None:
        d = lease.descriptor
        with self._lock:
            if self._closed or self._word(d.buffer, ENTRY_GENERATION) != d.generation:
                return  # already reclaimed (the lease expired)
            pid, start, _ = self._leases(d.buffer)[lease.slot]
            if (pid, start) == (self._me.pid, self._me.start):
                self._set_lease(d.buffer, lease.slot, 0, 0, 0)
                self._ctr[RELEASED] += 1
                self._maybe_free(d.buffer)

    # ---- housekeeping ----
    def reclaim(self) -> int:
        """Drop holds of dead processes, expired leases and lapsed hand-offs; returns buffers freed."""
        self._check()
        with self._lock:
            return self._reclaim_locked()

    def _reclaim_locked(self) -> int:
        now, freed = self._clock(), 0
        for buffer in range(self.buffers):
            state, pending = self._state_pending(buffer)
            if state == BUF_FREE:
                continue
            if state == BUF_WRITING:
                if not process_alive(self._word(buffer, ENTRY_WRITER_PID), self._word(buffer, ENTRY_WRITER_START)):
                    self._set_state(buffer, BUF_FREE, 0)
                    self._ctr[RECLAIMED] += 1
                    freed += 1
                continue
            deadline = self._word(buffer, ENTRY_HANDOFF_DEADLINE)
            if pending and deadline and deadline <= now:
                self._set_state(buffer, BUF_PUBLISHED, 0)
                self._ctr[EXPIRED] += 1
            for slot, (pid, start, expiry) in enumerate(self._leases(buffer)):
                if pid and ((expiry and expiry <= now) or not process_alive(pid, start)):
                    self._set_lease(buffer, slot, 0, 0, 0)
                    self._ctr[RECLAIMED] += 1
            self._maybe_free(buffer)
            freed += self._state_pending(buffer)[0] == BUF_FREE
        return freed

    def stats(self) -> ArenaStats:
        self._check()
        with self._lock:
            counters = self._ctr.tolist()
            free = sum(self._state_pending(b)[0] == BUF_FREE for b in range(self.buffers))
        return ArenaStats(*counters, free=free, buffers=self.buffers, buffer_size=self.buffer_size)

    def close(self) -> None:
        """Close this handle. Views handed out keep their mapping alive until they are garbage."""
        if self._closed:
            return
        self._closed = True
        for view in (self._ctr, self._table, self._state):
            view.release()
        for mm in (self._mm, self._ro):
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still export it: it is unmapped when the last one goes
        self._lock.close()

    def unlink(self) -> None:
        self._check()
        with self._lock:
            segment.retire(self._mm)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
