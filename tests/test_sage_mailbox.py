"""PBM mailbox in one process: layout and version, every bad input, a hypothesis model of arbitrary
push / pop / expiry interleavings against a deque, torn-slot detection, stale-segment recovery. Each
test runs on every engine built here (the C one and the pure-Python one); the model also on handles
of both engines sharing one ring, and on a flock-locked ring."""

from __future__ import annotations

import array
import collections
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sage import layout
from sage import mailbox as mailbox_module
from sage.mailbox import (
    Mailbox,
    MailboxCorruptError,
    MailboxError,
    MailboxExistsError,
    MailboxNotFoundError,
    MailboxRetiredError,
    PushStatus,
)
from sage.shm import BOOT_ID, segment_path
from tests.sage_helpers import ENGINES, remove_segments, rewrite_header, unique_name


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request, monkeypatch):
    """Every test once per engine built here (SAGE_MAILBOX_IMPL reaches subprocesses too)."""
    monkeypatch.setenv("SAGE_MAILBOX_IMPL", request.param)
    return request.param


@pytest.fixture
def name():
    n = unique_name()
    yield n
    remove_segments(n)


def test_layout_constants_and_versions():
    assert (layout.PBM_VERSION, layout.FTM_VERSION, layout.FTD_VERSION) == (2, 1, 1)
    assert layout.PBM_MAGIC == b"PBM1" and layout.FTM_MAGIC == b"FTM1"
    assert layout.PBM_FIXED.size == layout.PBM_HEADER_CRC == 80 and layout.PBM_STATE == 84
    assert layout.SLOT_BODY_OFFSET + layout.SLOT_BODY.size == layout.PBM_SLOT_HEADER == 56
    assert layout.DESCRIPTOR.size == 128 and layout.FTM_LEASE_OFFSET + 24 * layout.FTM_LEASES == layout.FTM_ENTRY_SIZE
    assert [layout.pbm_stride(n) for n in (1, 8, 9, 64, 4096)] == [64, 64, 128, 128, 4160]
    counters_end = layout.PBM_COUNTERS_OFFSET + 8 * len(layout.PBM_COUNTERS)
    assert counters_end <= layout.PBM_MUTEX_OFFSET and layout.PBM_MUTEX_OFFSET % 64 == 0
    assert layout.PBM_MUTEX_OFFSET + layout.PBM_MUTEX_BYTES == layout.PBM_LOCK_BOOT_OFFSET
    assert layout.PBM_LOCK_BOOT_OFFSET + 16 <= layout.HEADER_SIZE
    assert (layout.PBM_PAYLOAD_CRC, layout.PBM_LOCK_MUTEX) == (1, 2)


def test_file_bytes_match_the_documented_offsets(name):
    """Read a ring's file with struct alone, as a C program would, at the offsets of sage.layout."""
    box = Mailbox.create(name, record_size=100, capacity=3)
    box.push(b"abc", tag=9)
    box.push(b"defg", tag=10)
    box.pop()
    raw = segment_path("pbm", name).read_bytes()
    magic, version, header_size, slot_header, record_size, stride, capacity, pid = struct.unpack_from(
        "<4sIIIQQQQ", raw, 0)
    assert (magic, version, header_size, slot_header) == (b"PBM1", 2, 4096, 56)
    assert (record_size, stride, capacity, pid) == (100, 192, 3, os.getpid())
    assert struct.unpack_from("<II", raw, 72) == (3, 0)  # flags: PAYLOAD_CRC | LOCK_MUTEX
    assert raw[320:336] == BOOT_ID  # the mutex was initialised in this boot
    assert raw[256:320] != bytes(64)  # an initialised mutex records its kind (robust, process-shared)
    assert struct.unpack_from("<I", raw, 80)[0] == zlib.crc32(raw[:80])
    assert struct.unpack_from("<I", raw, 84)[0] == 1
    assert struct.unpack_from("<8Q", raw, 128)[:2] == (2, 1)  # write_index, read_index
    slot = 4096 + 1 * 192
    seq, crc, length = struct.unpack_from("<QII", raw, slot)
    producer, _pid, pseq, _pushed, deadline, tag, _ = struct.unpack_from("<IIQQQII", raw, slot + 16)
    assert (seq, length, producer, pseq, deadline, tag) == (2, 4, 0, 1, 0, 10)
    assert raw[slot + 56:slot + 60] == b"defg" and zlib.crc32(raw[slot + 16:slot + 56], zlib.crc32(b"defg")) == crc
    assert len(raw) == 4096 + 3 * 192
    box.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"record_size": 0, "capacity": 4}, "record_size"),
    ({"record_size": -3, "capacity": 4}, "record_size"),
    ({"record_size": 1.5, "capacity": 4}, "record_size"),
    ({"record_size": 64, "capacity": 0}, "capacity"),
    ({"record_size": 64, "capacity": True}, "capacity"),
    ({"record_size": 64 << 20, "capacity": 1000}, "needs"),
    ({"record_size": 64, "capacity": 4, "wait": "busy"}, "wait"),
    ({"record_size": 64, "capacity": 4, "stale": "keep"}, "stale"),
])
def test_bad_geometry_is_one_clear_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mailbox.create(name, **kwargs)


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "-lead", "x" * 101, 7])
def test_bad_names(bad):
    with pytest.raises(ValueError, match="bad segment name"):
        Mailbox.create(bad, record_size=8, capacity=2)


def test_missing_mailbox(name):
    with pytest.raises(MailboxNotFoundError, match="no mailbox named"):
        Mailbox.attach(name)


def test_bad_push_arguments_and_closed_handle(name):
    box = Mailbox.create(name, record_size=8, capacity=2)
    assert box.push(b"123456789") is PushStatus.TOO_BIG
    for kwargs, match in [({"tag": -1}, "tag"), ({"tag": 2**32}, "tag"), ({"ttl": -1}, "ttl"),
                          ({"ttl": float("nan")}, "ttl"), ({"ttl": "1"}, "ttl")]:
        with pytest.raises(ValueError, match=match):
            box.push(b"x", **kwargs)
    assert box.stats().too_big == 1 and box.stats().pushed == 0
    for call in (lambda: box.push(b"x", tagg=1), lambda: box.push(b"x", 1), lambda: box.push(),
                 lambda: box.pop(1, 2), lambda: box.pop_many(), lambda: box.push_many([b"x"], payloads=[b"y"])):
        with pytest.raises(TypeError):
            call()
    assert box.push(payload=b"kw", tag=3) is PushStatus.OK and box.pop_many(max_records=2, timeout=0)[0].tag == 3
    box.close()
    box.close()
    with pytest.raises(ValueError, match="closed"):
        box.push(b"x")
    with pytest.raises(ValueError, match="closed"):
        box.pop()


@pytest.mark.parametrize("edit, match", [
    ({"magic": b"XXXX"}, "not a mailbox"),
    ({"version": 1}, "layout version 1"),  # a version-1 ring (flock for every call) is refused
    ({"b": 64}, "geometry"),
])
def test_corrupted_header_is_refused(name, edit, match):
    Mailbox.create(name, record_size=100, capacity=3).close()
    rewrite_header(segment_path("pbm", name), **edit)
    with pytest.raises(MailboxCorruptError, match=match):
        Mailbox.attach(name)
    if "magic" in edit or "version" in edit:  # the prefix itself is unreadable: create refuses too
        with pytest.raises(MailboxCorruptError, match=match):
            Mailbox.create(name, record_size=100, capacity=3)


def test_scribbled_header_and_truncated_file(name):
    Mailbox.create(name, record_size=100, capacity=3).close()
    path = segment_path("pbm", name)
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with pytest.raises(MailboxCorruptError, match="checksum"):
        Mailbox.attach(name)
    os.truncate(path, 100)
    with pytest.raises(MailboxCorruptError, match="shorter"):
        Mailbox.attach(name)


def test_torn_slot_is_counted_and_not_delivered(name):
    box = Mailbox.create(name, record_size=32, capacity=4)
    for payload in (b"first", b"second", b"third"):
        box.push(payload)
    with open(segment_path("pbm", name), "r+b") as f:  # flip a payload byte of the second slot
        f.seek(4096 + 128 + 56)  # stride 128 for record_size 32
        f.write(b"S")
    assert [box.pop().payload, box.pop().payload, box.pop()] == [b"first", b"third", None]
    stats = box.stats()
    assert (stats.pushed, stats.popped, stats.torn, stats.depth) == (3, 2, 1, 0)
    box.close()


def test_corruption_counts_as_torn_in_a_batch_and_where_it_fakes_an_expiry(name):
    box = Mailbox.create(name, record_size=32, capacity=8)
    for payload in (b"a", b"b", b"c", b"d"):
        box.push(payload, ttl=3600)
    with open(segment_path("pbm", name), "r+b") as f:
        f.seek(4096 + 1 * 128 + 40)  # record 1's deadline: now in the past
        f.write(struct.pack("<Q", 5))
        f.seek(4096 + 2 * 128 + 56)  # record 2's payload
        f.write(b"C")
    assert [r.payload for r in box.pop_many(8)] == [b"a", b"d"]
    stats = box.stats()
    assert (stats.popped, stats.expired, stats.torn, stats.depth) == (2, 0, 2, 0)
    box.close()


def test_pop_into_skips_torn_and_expired_records_and_closes_the_gaps(name):
    box = Mailbox.create(name, record_size=32, capacity=8)
    for payload in (b"a", b"bb", b"ccc", b"dddd", b"eeeee"):
        box.push(payload, ttl=3600)
    with open(segment_path("pbm", name), "r+b") as f:
        f.seek(4096 + 1 * 128 + 56)  # record 1's payload: torn, found on the copy after unlocking
        f.write(b"B")
        f.seek(4096 + 3 * 128 + 40)  # record 3's deadline, now in the past: torn (covered by the crc)
        f.write(struct.pack("<Q", 5))
    out, lengths = bytearray(4 * 32), array.array("I", [0] * 4)
    assert box.pop_into(out, lengths) == 3
    assert [bytes(out[32 * i:32 * i + n]) for i, n in enumerate(lengths[:3])] == [b"a", b"ccc", b"eeeee"]
    stats = box.stats()
    assert (stats.popped, stats.torn, stats.depth) == (3, 2, 0)
    box.close()


def test_pop_into_bad_buffers_are_one_clear_error(name):
    box = Mailbox.create(name, record_size=16, capacity=4)
    box.push(b"kept")
    with pytest.raises(ValueError, match="less than one record of record_size 16"):
        box.pop_into(bytearray(15))
    with pytest.raises(ValueError, match="uint32 array of at least 2"):
        box.pop_into(bytearray(32), array.array("I", [0]))
    with pytest.raises(ValueError, match="uint32"):
        box.pop_into(bytearray(32), array.array("d", [0, 0]))
    with pytest.raises((BufferError, TypeError)):
        box.pop_into(b"\0" * 32)  # read-only
    with pytest.raises(TypeError):
        box.pop_into(object())
    assert box.stats().depth == 1  # nothing was taken by a refused call
    out = bytearray(16)
    assert box.pop_into(out, timeout=0) == 1 and out[:4] == b"kept" and box.pop_into(out, timeout=0) == 0
    box.close()


def test_without_payload_checksum_the_header_stays_covered(name):
    box = Mailbox.create(name, record_size=32, capacity=4, checksum=False)
    assert Mailbox.attach(name).checksum is False
    box.push(b"payload")
    box.push(b"second")
    with open(segment_path("pbm", name), "r+b") as f:
        f.seek(4096 + 56)  # a payload byte: not covered, delivered as written
        f.write(b"P")
        f.seek(4096 + 128 + 48)  # the second record's tag: covered
        f.write(b"\x07")
    assert box.pop().payload == b"Payload" and box.pop() is None and box.stats().torn == 1
    box.close()


def test_batches_keep_order_and_report_full(name):
    box = Mailbox.create(name, record_size=8, capacity=3)
    assert box.push_many([b"a", b"b", b"c", b"d"]) == 3 and box.stats().full == 1
    assert [r.payload for r in box.pop_many(2)] == [b"a", b"b"]
    assert [r.seq for r in box.pop_many(5)] == [2] and box.pop_many(5) == []
    with pytest.raises(ValueError, match="max_records"):
        box.pop_many(0)
    box.close()


def _doorbell_bytes(box: Mailbox) -> int:
    try:
        return len(os.read(box.doorbell_fd(), 65536))
    except BlockingIOError:
        return 0


def test_producers_ring_only_while_a_consumer_sleeps(name):
    box = Mailbox.create(name, record_size=8, capacity=8)
    consumer = Mailbox.attach(name, wait="sleep")
    box.push(b"a")
    assert _doorbell_bytes(box) == 0  # nobody asleep: no syscall spent on the doorbell
    assert consumer.pop() is not None
    woken = []
    sleeper = threading.Thread(target=lambda: woken.append(consumer.pop(timeout=30)))
    sleeper.start()
    time.sleep(0.2)  # asleep on the doorbell by now
    box.push(b"b")  # rings and wakes it, long before its timeout
    sleeper.join(10)
    assert [r.payload for r in woken] == [b"b"]
    _doorbell_bytes(box)
    box.push(b"c")
    assert _doorbell_bytes(box) == 0  # its wake window is still open, but nobody sleeps
    assert consumer.arm_doorbell(time.monotonic_ns() + 10**9)  # records there: do not sleep
    consumer.pop_many(8)
    assert not consumer.arm_doorbell(time.monotonic_ns() + 10**9)
    box.push(b"d")
    assert _doorbell_bytes(box) == 1
    consumer.disarm_doorbell()
    box.push(b"e")
    assert _doorbell_bytes(box) == 0
    box.close()
    consumer.close()


def test_a_signal_during_a_sleeping_pop_is_not_an_error(name):
    """A signal whose handler returns (the server's SIGTERM handler only sets a flag) interrupts the
    doorbell wait with EINTR: pop goes on waiting and returns None at its timeout, instead of raising
    the EAGAIN of the FIFO reads that follow (what the C engine did until errno was kept)."""
    box = Mailbox.create(name, record_size=16, capacity=4, wait="sleep")
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        start = time.monotonic()
        assert box.pop(timeout=0.5) is None
        assert time.monotonic() - start >= 0.45
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
        box.close()


@pytest.mark.parametrize("wait", ["spin", "sleep"])
def test_closing_a_handle_another_thread_waits_on(name, wait, monkeypatch):
    """The waiter gets ValueError (it does not read unmapped memory), within its sleep slice."""
    monkeypatch.setattr(mailbox_module, "_SLEEP_SLICE_NS", 50_000_000)
    box = Mailbox.create(name, record_size=8, capacity=4, wait=wait)
    errors = []

    def wait_for_a_record():
        try:
            box.pop(timeout=30)
        except ValueError as error:
            errors.append(str(error))
    waiter = threading.Thread(target=wait_for_a_record)
    waiter.start()
    time.sleep(0.2)
    box.close()
    waiter.join(10)
    assert not waiter.is_alive() and len(errors) == 1 and "closed" in errors[0], errors


def test_threads_sharing_a_handle_are_one_producer_in_order(name):
    box = Mailbox.create(name, record_size=16, capacity=8192)
    per_thread = 3000

    def produce(index):
        for i in range(per_thread):
            assert box.push(struct.pack("<II", index, i)) is PushStatus.OK
    threads = [threading.Thread(target=produce, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    records = box.pop_many(2 * per_thread)
    assert [r.seq for r in records] == list(range(2 * per_thread)) and {r.producer for r in records} == {0}
    for index in range(2):  # each thread's records in its order
        assert [struct.unpack("<II", r.payload)[1] for r in records if r.payload[0] == index] == list(range(per_thread))
    box.close()


def test_live_create_refused_and_unlink_retires_handles(name):
    box = Mailbox.create(name, record_size=8, capacity=2)
    other = Mailbox.attach(name)
    with pytest.raises(MailboxExistsError, match="alive"):
        Mailbox.create(name, record_size=8, capacity=2)
    box.unlink()
    with pytest.raises(MailboxRetiredError, match="attach again"):
        other.push(b"x")
    with pytest.raises(MailboxNotFoundError):
        Mailbox.attach(name)
    box.close()
    other.close()


def _leave_stale_ring(name: str, payloads: list[bytes]) -> None:
    """A child process creates the ring, pushes, and exits without cleaning up (a crashed owner)."""
    code = (f"from sage.mailbox import Mailbox\nb = Mailbox.create({name!r}, record_size=16, capacity=4)\n"
            f"for p in {payloads!r}: b.push(p)\nimport os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_stale_ring_is_reset_at_create_and_old_handles_retire(name):
    _leave_stale_ring(name, [b"old"])
    reader = Mailbox.attach(name)  # attaching to a dead owner's ring still works ...
    assert reader.stats().owner_alive is False and reader.stats().depth == 1
    fresh = Mailbox.create(name, record_size=16, capacity=4)  # ... and a create resets it
    assert fresh.stats().depth == 0 and fresh.stats().owner_alive
    with pytest.raises(MailboxRetiredError):
        reader.pop()
    assert fresh.push(b"new") is PushStatus.OK
    assert Mailbox.attach(name).pop().payload == b"new"
    reader.close()
    fresh.close()


def test_stale_ring_adopted_keeps_records(name):
    _leave_stale_ring(name, [b"a", b"b"])
    box = Mailbox.create(name, record_size=16, capacity=4, stale="adopt")
    assert box.stats().owner_alive and [box.pop().payload, box.pop().payload] == [b"a", b"b"]
    with pytest.raises(MailboxExistsError):
        Mailbox.create(name, record_size=16, capacity=4, stale="adopt")
    box.close()


@pytest.mark.parametrize("edit", [{"creator_start": 1}, {"boot_id": b"\x01" * 16}])
def test_recycled_pid_or_other_boot_counts_as_stale(name, edit):
    """Our own pid in the header with another start time (a recycled pid), or another boot id."""
    Mailbox.create(name, record_size=16, capacity=4).close()
    rewrite_header(segment_path("pbm", name), **edit)
    box = Mailbox.create(name, record_size=16, capacity=4)
    assert box.stats().owner_alive
    box.close()


class FakeClock:
    def __init__(self):
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


SECOND = 10**9


class MailboxModel(RuleBasedStateMachine):
    """Two producer handles and two consumer handles on one ring against a deque of what must be
    there; ttl in whole fake-clock seconds so expiry is exact. `impls`: the engine of each handle."""

    impls = ("python",) * 4
    lock = "mutex"

    @initialize(capacity=st.integers(1, 6))
    def setup(self, capacity):
        self.name = unique_name("hyp")
        self.clock = FakeClock()
        self.boxes = [Mailbox.create(self.name, record_size=16, capacity=capacity, lock=self.lock,
                                     impl=self.impls[0])]
        self.boxes += [Mailbox.attach(self.name, impl=impl) for impl in self.impls[1:]]
        assert [box.impl for box in self.boxes] == list(self.impls) and self.boxes[3].lock == self.lock
        for box in self.boxes:
            box._clock = self.clock
        self.capacity = capacity
        self.model: collections.deque = collections.deque()
        self.ids: dict[int, int] = {}
        self.next_seq = [0, 0]
        self.counts = collections.Counter()

    @rule(producer=st.integers(0, 1), payload=st.binary(max_size=20), tag=st.integers(0, 2**32 - 1),
          ttl=st.sampled_from([None, 0, 1, 2, 5]))
    def push(self, producer, payload, tag, ttl):
        status = self.boxes[producer].push(payload, tag=tag, ttl=ttl)
        if len(payload) > 16:
            expected = PushStatus.TOO_BIG
        elif len(self.model) == self.capacity:
            expected = PushStatus.FULL
        else:
            expected = PushStatus.OK
            self.ids.setdefault(producer, len(self.ids))
            deadline = None if ttl is None else self.clock.now + ttl * SECOND
            self.model.append((payload, producer, self.next_seq[producer], tag, deadline))
            self.next_seq[producer] += 1
        assert status is expected
        self.counts[expected] += 1

    @rule(producer=st.integers(0, 1), payloads=st.lists(st.binary(max_size=18), max_size=4),
          ttl=st.sampled_from([None, 1]))
    def push_many(self, producer, payloads, ttl):
        if any(len(p) > 16 for p in payloads):
            with pytest.raises(ValueError, match="record_size"):
                self.boxes[producer].push_many(payloads, ttl=ttl)
            return
        fits = min(len(payloads), self.capacity - len(self.model))
        assert self.boxes[producer].push_many(payloads, tag=1, ttl=ttl) == fits
        for payload in payloads[:fits]:
            self.ids.setdefault(producer, len(self.ids))
            deadline = None if ttl is None else self.clock.now + ttl * SECOND
            self.model.append((payload, producer, self.next_seq[producer], 1, deadline))
            self.next_seq[producer] += 1
        self.counts[PushStatus.OK] += fits
        self.counts[PushStatus.FULL] += fits < len(payloads)

    def expected_pop(self):
        while self.model and self.model[0][4] is not None and self.model[0][4] <= self.clock.now:
            self.model.popleft()
            self.counts["expired"] += 1
        if not self.model:
            return None
        payload, producer, seq, tag, _ = self.model.popleft()
        self.counts["popped"] += 1
        return payload, self.ids[producer], seq, tag

    @rule(consumer=st.integers(2, 3))
    def pop(self, consumer):
        record = self.boxes[consumer].pop()
        expected = self.expected_pop()
        assert (None if record is None else (record.payload, record.producer, record.seq, record.tag)) == expected

    @rule(consumer=st.integers(2, 3), most=st.integers(1, 4))
    def pop_many(self, consumer, most):
        got = [(r.payload, r.producer, r.seq, r.tag) for r in self.boxes[consumer].pop_many(most)]
        expected = []
        while len(expected) < most and (one := self.expected_pop()) is not None:
            expected.append(one)
        assert got == expected

    @rule(consumer=st.integers(2, 3), rows=st.integers(1, 4), spare=st.integers(0, 15))
    def pop_into(self, consumer, rows, spare):
        out, lengths = bytearray(b"\xee" * (rows * 16 + spare)), array.array("I", [99] * rows)
        got = self.boxes[consumer].pop_into(out, lengths)
        expected = []
        while len(expected) < rows and (one := self.expected_pop()) is not None:
            expected.append(one[0])
        assert got == len(expected)
        for i, payload in enumerate(expected):
            row = out[16 * i:16 * (i + 1)]
            assert (bytes(row[:len(payload)]), lengths[i]) == (payload, len(payload))
            assert row[len(payload):] == b"\xee" * (16 - len(payload))  # past the payload: untouched
        assert out[16 * got:] == b"\xee" * (len(out) - 16 * got) and list(lengths[got:]) == [99] * (rows - got)

    @rule(seconds=st.integers(1, 3))
    def advance(self, seconds):
        self.clock.now += seconds * SECOND

    @precondition(lambda self: hasattr(self, "model"))
    @invariant()
    def counters_match(self):
        stats = self.boxes[0].stats()
        assert stats.depth == len(self.model)
        assert stats.pushed == self.counts[PushStatus.OK] and stats.full == self.counts[PushStatus.FULL]
        assert stats.too_big == self.counts[PushStatus.TOO_BIG]
        assert (stats.popped, stats.expired, stats.torn) == (self.counts["popped"], self.counts["expired"], 0)

    def teardown(self):
        if hasattr(self, "boxes"):
            for box in self.boxes:
                box.close()
            remove_segments(self.name)


@pytest.mark.parametrize("variant", ["same", "other"])
def test_mailbox_against_deque_model(engine, variant):
    """native: all four handles native, then native and Python handles mixed on one ring;
    python: all Python on a mutex ring, then on a flock ring."""
    if engine == "native":
        impls, lock = ("native",) * 4 if variant == "same" else ("native", "python", "python", "native"), "mutex"
    else:
        impls, lock = ("python",) * 4, "mutex" if variant == "same" else "flock"
    machine = type("Model", (MailboxModel,), {"impls": impls, "lock": lock})
    run_state_machine_as_test(machine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                                                         suppress_health_check=[HealthCheck.too_slow]))


def test_sage_imports_without_jax_or_torch():
    code = ("import sys; import sage.mailbox, sage.ftm, sage.schedule, sage.layout; "
            "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]"


# ---- engine choice and the C engine's pieces ----
def test_a_hook_that_re_enters_the_ring_raises_instead_of_deadlocking(name):
    box = Mailbox.create(name, record_size=8, capacity=4)
    box._test_hook = lambda where: box.stats()  # inside the critical section: the lock is this thread's
    with pytest.raises(RuntimeError, match="already holds"):
        box.push(b"x")
    box._test_hook = None
    assert box.push(b"y") is PushStatus.OK and box.pop().payload == b"y"  # nothing of "x" was committed
    assert box.stats().pushed == 1
    box.close()


def test_engine_choice(name, engine, monkeypatch):
    box = Mailbox.create(name, record_size=8, capacity=2)
    assert box.impl == engine and box.lock == "mutex" and repr(box).endswith(f"impl={engine!r})")
    assert Mailbox.attach(name, impl="python").impl == "python"
    monkeypatch.setenv("SAGE_MAILBOX_IMPL", "rust")
    with pytest.raises(ValueError, match="SAGE_MAILBOX_IMPL must be one of"):
        Mailbox.attach(name)
    with pytest.raises(ValueError, match="impl must be one of"):
        Mailbox.attach(name, impl="fast")
    with pytest.raises(ValueError, match="lock must be one of"):
        Mailbox.create(name + "x", record_size=8, capacity=2, lock="spin", impl="python")
    box.close()


def test_a_flock_ring_is_driven_by_the_python_engine(name):
    box = Mailbox.create(name, record_size=8, capacity=2, lock="flock", impl="python")
    assert (box.lock, Mailbox.attach(name, impl="auto").impl) == ("flock", "python")
    assert struct.unpack_from("<I", segment_path("pbm", name).read_bytes(), 72)[0] == layout.PBM_PAYLOAD_CRC
    if mailbox_module.native_engine_status() is None:
        with pytest.raises(MailboxError, match="flock, which only the Python engine takes"):
            Mailbox.attach(name, impl="native")
    box.close()


def test_without_the_extension_auto_falls_back_and_native_is_refused(name):
    """As on a machine without a compiler: sage._pbm cannot be imported."""
    code = ("import sys; sys.modules['sage._pbm'] = None\n"
            "from sage.mailbox import Mailbox, MailboxError, native_engine_status\n"
            f"box = Mailbox.create({name!r}, record_size=8, capacity=2)\n"
            "box.push(b'hi'); print(box.impl, box.lock, box.pop().payload, native_engine_status() is not None)\n"
            "try:\n"
            f"    Mailbox.attach({name!r}, impl='native')\n"
            "except MailboxError as error: print(error)\n"
            "box.unlink(); box.close()")
    env = {**os.environ, "SAGE_MAILBOX_IMPL": "auto"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.splitlines()
    assert out[0] == "python mutex b'hi' True"
    assert "the native engine was asked for" in out[1] and "sage._pbm is not built" in out[1]
