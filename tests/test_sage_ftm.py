"""FTM tensor hand-off: descriptor layout, dtype round trips (bfloat16 included), zero-copy read-only
views, no reuse while held, ttl and lease expiry, lease reclaim after SIGKILL, bad inputs, and the
focus-before-periphery scheduler."""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import time

import ml_dtypes
import numpy as np
import pytest

from sage import layout
from sage.ftm import (
    ArenaExhaustedError,
    DType,
    StaleDescriptorError,
    TensorArena,
    TensorDescriptor,
    TensorExpiredError,
)
from sage.mailbox import Mailbox
from sage.schedule import FocusScheduler, Lane
from tests.sage_helpers import remove_segments, unique_name

CTX = multiprocessing.get_context("fork")
SECOND = 10**9


@pytest.fixture
def name():
    n = unique_name("ftm")[:30]
    yield n
    remove_segments(n)


def random_array(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    if np.dtype(dtype).kind == "i":
        return rng.integers(-2**31, 2**31 - 1, size=shape, dtype=np.int32)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16, np.int32])
def test_round_trip_through_descriptor_bytes_is_bit_exact(name, dtype):
    rng = np.random.default_rng(0)
    array = random_array(rng, (3, 5, 7), dtype)
    arena = TensorArena.create(name, buffer_size=4096, buffers=2)
    raw = arena.put(array, tag=42).pack()
    desc = TensorDescriptor.unpack(raw)
    reader = TensorArena.attach(name)
    with reader.open(desc) as lease:
        assert lease.array.dtype == np.dtype(dtype) and lease.array.shape == (3, 5, 7)
        assert lease.array.tobytes() == array.tobytes()
        assert desc.tag == 42 and desc.dtype == DType(layout.DESCRIPTOR.unpack(raw)[2])
    reader.close()
    arena.close()


def test_descriptor_bytes_match_the_documented_offsets(name):
    arena = TensorArena.create(name, buffer_size=4096, buffers=2)
    desc = arena.put(np.zeros((2, 3), ml_dtypes.bfloat16), tag=5)
    raw = desc.pack()
    assert raw[:4] == b"FTD1" and struct.unpack_from("<HBB", raw, 4) == (1, 3, 2)
    assert raw[8:40].rstrip(b"\0") == name.encode()
    offset, nbytes, buffer, tag, generation = struct.unpack_from("<QQIIQ", raw, 40)
    assert (offset, nbytes, buffer, tag, generation) == (arena.data_offset, 12, 0, 5, 1)
    assert struct.unpack_from("<4I", raw, 72) == (2, 3, 0, 0) and struct.unpack_from("<4q", raw, 88) == (6, 2, 0, 0)
    assert arena.data_offset % 4096 == 0
    assert struct.unpack_from("<4sI", arena.path.read_bytes()) == (b"FTM1", 1)
    arena.close()


def test_views_are_zero_copy_and_read_only(name):
    arena = TensorArena.create(name, buffer_size=4096, buffers=2)
    out = arena.alloc((4,), np.float32)
    out.array[:] = [1, 2, 3, 4]
    desc = arena.publish(out)
    lease = TensorArena.attach(name).open(desc)
    out.array[0] = 99  # the producer's buffer *is* the reader's memory (misuse, to show no copy)
    assert lease.array[0] == 99
    with pytest.raises(ValueError, match="read-only"):
        lease.array[1] = 0
    with pytest.raises(ValueError):
        lease.array.flags.writeable = True
    lease.release()
    arena.close()


def test_buffer_never_reused_while_held_and_stale_descriptors_refused(name):
    arena = TensorArena.create(name, buffer_size=4096, buffers=2)
    a, b = arena.put(np.ones(4, np.int32)), arena.put(np.full(4, 2, np.int32))
    lease_a, lease_b = arena.open(a), arena.open(b)
    with pytest.raises(ArenaExhaustedError, match="all 2 buffers"):
        arena.alloc((4,), np.int32)
    lease_a.release()
    c = arena.put(np.full(4, 3, np.int32))  # reuses a's buffer with a new generation
    assert (c.buffer, c.generation) == (a.buffer, a.generation + 1)
    with pytest.raises(StaleDescriptorError, match="gone"):
        arena.open(a)
    assert lease_b.array.tolist() == [2, 2, 2, 2]
    with pytest.raises(StaleDescriptorError):
        arena.open(b)  # already opened by its one reader
    stats = arena.stats()
    assert (stats.allocs, stats.published, stats.opened, stats.released, stats.free, stats.exhausted) == (
        3, 3, 2, 1, 0, 1)
    arena.close()


def test_several_readers_hold_one_buffer(name):
    arena = TensorArena.create(name, buffer_size=4096, buffers=1)
    desc = arena.put(np.arange(3, dtype=np.int32), readers=2)
    first, second = arena.open(desc), arena.open(desc)
    first.release()
    with pytest.raises(ArenaExhaustedError):
        arena.alloc((1,), np.int32)
    second.release()
    assert arena.stats().free == 1
    arena.close()


def test_handoff_ttl_and_lease_expiry(name):
    arena = TensorArena.create(name, buffer_size=4096, buffers=2)
    now = [10**12]
    arena._clock = lambda: now[0]
    late = arena.put(np.zeros(2, np.float16), ttl=1.0)
    held = arena.open(arena.put(np.zeros(2, np.float16)), lease_s=1.0)
    now[0] += 2 * SECOND
    with pytest.raises(TensorExpiredError, match="ttl"):
        arena.open(late)
    assert arena.stats().free == 1  # the expired hand-off's buffer came back
    assert arena.reclaim() == 1  # and the expired lease's
    held.release()  # a late release of a reclaimed lease is harmless
    stats = arena.stats()
    assert (stats.expired, stats.reclaimed, stats.free) == (1, 1, 2)
    arena.close()


def _open_and_hold(name: str, raw: bytes, signal_fd: int) -> None:
    lease = TensorArena.attach(name).open(TensorDescriptor.unpack(raw))
    os.write(signal_fd, b"o")
    time.sleep(3600 + lease.array.size)


def _alloc_and_hold(name: str, signal_fd: int) -> None:
    out = TensorArena.attach(name).alloc((8,), np.float32)
    os.write(signal_fd, b"a")
    time.sleep(3600 + out.array.size)


def test_leases_of_killed_readers_and_writers_are_reclaimed(name):
    arena = TensorArena.create(name, buffer_size=4096, buffers=1)
    read_fd, write_fd = os.pipe()
    for target, args in ((_open_and_hold, (arena.put(np.ones(8, np.float32)).pack(),)), (_alloc_and_hold, ())):
        child = CTX.Process(target=target, args=(name, *args, write_fd), daemon=True)
        child.start()
        assert os.read(read_fd, 1) in (b"o", b"a")
        with pytest.raises(ArenaExhaustedError):
            arena.alloc((8,), np.float32)  # held by a live process: never reused
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        out = arena.alloc((8,), np.float32)  # reclaimed from the dead holder
        arena.open(arena.publish(out)).release()  # and handed back for the next round
    stats = arena.stats()
    assert (stats.reclaimed, stats.free) == (2, 1)
    arena.close()


def _send_tensor(arena_name: str, box_name: str) -> None:
    arena, box = TensorArena.attach(arena_name), Mailbox.attach(box_name)
    out = arena.alloc((256, 256), ml_dtypes.bfloat16)
    out.array[...] = np.arange(256 * 256, dtype=np.float32).reshape(256, 256).astype(ml_dtypes.bfloat16)
    box.push(arena.publish(out, tag=7).pack())


def test_tensor_crosses_processes_through_a_ring(name):
    arena = TensorArena.create(name, buffer_size=1 << 17, buffers=2)
    box = Mailbox.create(name, record_size=128, capacity=4)
    child = CTX.Process(target=_send_tensor, args=(name, name), daemon=True)
    child.start()
    child.join(30)
    desc = TensorDescriptor.unpack(box.pop(timeout=10).payload)
    with arena.open(desc) as lease:
        expected = np.arange(256 * 256, dtype=np.float32).reshape(256, 256).astype(ml_dtypes.bfloat16)
        assert desc.tag == 7 and lease.array.view(np.uint16).tolist() == expected.view(np.uint16).tolist()
    box.close()
    arena.close()


def test_bad_inputs_are_one_clear_error(name):
    with pytest.raises(ValueError, match="buffer_size"):
        TensorArena.create(name, buffer_size=0, buffers=1)
    with pytest.raises(ValueError, match="buffers"):
        TensorArena.create(name, buffer_size=64, buffers=0)
    with pytest.raises(ValueError, match="32 bytes"):
        TensorArena.create("a" * 40, buffer_size=64, buffers=1)
    with pytest.raises(FileNotFoundError, match="no arena named"):
        TensorArena.attach(name)
    arena = TensorArena.create(name, buffer_size=64, buffers=1)
    with pytest.raises(ValueError, match="cannot travel"):
        arena.alloc((2,), np.float64)
    with pytest.raises(ValueError, match="larger buffer_size"):
        arena.alloc((2000,), np.float32)
    with pytest.raises(ValueError, match="at most 4"):
        arena.alloc((1, 1, 1, 1, 1), np.float32)
    desc = arena.put(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="128 bytes"):
        TensorDescriptor.unpack(desc.pack()[:100])
    with pytest.raises(ValueError, match="not a version-1"):
        TensorDescriptor.unpack(b"XXXX" + desc.pack()[4:])
    with pytest.raises(ValueError, match="outside"):
        arena.open(TensorDescriptor(name, 0, desc.generation, desc.offset, 8000, (2000,), (4,), DType.F32))
    with pytest.raises(ValueError, match="belongs to arena"):
        arena.open(TensorDescriptor("other", 0, 1, desc.offset, 16, (4,), (4,), DType.F32))
    arena.close()


def _create_put_and_crash(name: str) -> None:
    TensorArena.create(name, buffer_size=64, buffers=1).put(np.zeros(4, np.float32))
    os._exit(0)


def test_stale_arena_is_reset_at_create_and_a_live_one_refused(name):
    child = CTX.Process(target=_create_put_and_crash, args=(name,))
    child.start()
    child.join()
    assert TensorArena.attach(name).stats().allocs == 1
    arena = TensorArena.create(name, buffer_size=64, buffers=1)
    assert (arena.stats().allocs, arena.stats().free) == (0, 1)
    with pytest.raises(FileExistsError, match="alive"):
        TensorArena.create(name, buffer_size=64, buffers=1)
    arena.close()


def test_focus_served_before_peripheral(name):
    focus = Mailbox.create(name + "f", record_size=8, capacity=16)
    peripheral = Mailbox.create(name + "p", record_size=8, capacity=64)
    try:
        for i in range(40):
            peripheral.push(b"p%d" % i)
        for i in range(6):
            focus.push(b"f%d" % i)
        strict = FocusScheduler(focus, peripheral)
        lanes = [strict.next()[0] for _ in range(8)]
        assert lanes == [Lane.FOCUS] * 6 + [Lane.PERIPHERAL] * 2
        for i in range(6):
            focus.push(b"f%d" % i)
        fair = FocusScheduler(focus, peripheral, peripheral_every=2)
        order = [lane.value[0] for lane, _ in (fair.next() for _ in range(9))]
        assert "".join(order) == "ffpffpffp"
        start = time.monotonic()
        empty = FocusScheduler(Mailbox.attach(name + "f"), Mailbox.attach(name + "f"))
        while empty.next() is not None:
            pass
        assert empty.next(timeout=0.2) is None and time.monotonic() - start >= 0.2
        with pytest.raises(ValueError, match="peripheral_every"):
            FocusScheduler(focus, peripheral, peripheral_every=0)
    finally:
        remove_segments(name + "f")
        remove_segments(name + "p")
