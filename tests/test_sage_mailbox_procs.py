"""PBM mailbox across processes: 4 producers x 2 consumers with one producer SIGKILLed while it holds
the lock and one killed at a random point; a consumer killed inside pop; a sleeping consumer woken
by the doorbell without spinning a core. Each runs on every engine built here; the stress test also
with producers and consumers of both engines on one ring, and on a flock-locked ring."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from sage import layout
from sage import mailbox as mailbox_module
from sage.mailbox import Mailbox, PushStatus
from sage.shm import BOOT_ID, segment_path
from tests.sage_helpers import ENGINES, remove_segments, unique_name

CTX = multiprocessing.get_context("fork")  # children attach by name, like unrelated processes
STOP_TAG = 99
PER_PRODUCER = 5000
HOLD_AT = 300


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request, monkeypatch):
    """Every test once per engine built here (forked children inherit SAGE_MAILBOX_IMPL)."""
    monkeypatch.setenv("SAGE_MAILBOX_IMPL", request.param)
    return request.param


@pytest.fixture
def name():
    n = unique_name("mp")
    yield n
    remove_segments(n)


def make_payload(index: int, i: int) -> bytes:
    """8..59 bytes: producer index, record number, filler, then a CRC32 of everything before it."""
    body = struct.pack("<II", index, i) + bytes((index * 31 + i + k) % 251 for k in range((i * 7) % 48))
    return body + struct.pack("<I", zlib.crc32(body))


def check_payload(payload: bytes) -> tuple[int, int, bool]:
    index, i = struct.unpack_from("<II", payload)
    return index, i, zlib.crc32(payload[:-4]) == struct.unpack_from("<I", payload, len(payload) - 4)[0]


def _produce(name: str, index: int, count: int, hold_at: int | None, signal_fd: int | None,
             impl: str | None = None) -> None:
    box = Mailbox.attach(name, impl=impl)
    if hold_at is not None:
        def hold_inside_lock(where: str) -> None:
            if where == "push" and box._producer_seq == hold_at:
                os.write(signal_fd, b"h")  # half the payload is written and the lock is held
                time.sleep(3600)
        box._test_hook = hold_inside_lock
    for i in range(count):
        if box.push(make_payload(index, i), timeout=60) is not PushStatus.OK:
            os._exit(3)
    box.close()


def _consume(name: str, out_path: str, impl: str | None = None, bulk: bool = False) -> None:
    """Rows (producer, seq, producer index, record number, payload intact) per record taken, until a stop
    record. bulk: with pop_into, 8 records at a time (no Record: producer -1, seq the payload's record
    number; an empty payload is the stop record)."""
    box = Mailbox.attach(name, impl=impl)
    rows, out, lengths = [], np.zeros((8, 64), np.uint8), np.zeros(8, np.uint32)
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:
        if bulk:
            taken = [out[k, :lengths[k]].tobytes() for k in range(box.pop_into(out, lengths, timeout=1.0))]
            records = [(-1, None, payload) for payload in taken]
        else:
            record = box.pop(timeout=1.0)
            records = [] if record is None else [(record.producer, record.seq, record.payload)]
        if any(payload == b"" for *_, payload in records):  # the stop record
            assert records[-1][2] == b"", "records after a stop record"
            records.pop()
            stop = True
        else:
            stop = False
        for producer, seq, payload in records:
            index, i, ok = check_payload(payload)
            rows.append((producer, i if seq is None else seq, index, i, ok))
        if stop:
            break
    np.save(out_path, np.array(rows, dtype=np.int64).reshape(-1, 5))
    box.close()


def _start(target, *args) -> multiprocessing.Process:
    process = CTX.Process(target=target, args=args, daemon=True)
    process.start()
    return process


@pytest.mark.parametrize("variant", ["same", "other", "bulk"])
def test_four_producers_two_consumers_with_two_producers_killed(name, tmp_path, engine, variant):
    """native/other: producers and consumers alternate between the engines (the one holding the lock
    when killed is native, the next lockers of both kinds repair it); python/other: a flock ring;
    bulk: the second consumer takes its records with pop_into, 8 at a time."""
    mixed = engine == "native" and variant == "other"
    impl = (lambda i: ("native", "python")[i % 2]) if mixed else (lambda i: None)
    lock = "flock" if engine == "python" and variant == "other" else "mutex"
    box = Mailbox.create(name, record_size=64, capacity=64, lock=lock)
    read_fd, write_fd = os.pipe()
    outs = [str(tmp_path / f"consumer{c}.npy") for c in range(2)]
    consumers = [_start(_consume, name, out, impl(c), variant == "bulk" and c == 1) for c, out in enumerate(outs)]
    producers = [_start(_produce, name, index, PER_PRODUCER, None, None, impl(index)) for index in range(4)]
    holder = _start(_produce, name, 4, 10**9, HOLD_AT, write_fd, impl(4))
    runaway = _start(_produce, name, 5, 10**9, None, None, impl(5))

    assert os.read(read_fd, 1) == b"h"  # the holder is inside the critical section, half-way
    time.sleep(0.3)  # everyone else piles up on the lock
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    time.sleep(0.2)
    os.kill(runaway.pid, signal.SIGKILL)  # wherever it is: in the lock or not
    runaway.join()
    for process in producers:
        process.join(90)
        assert process.exitcode == 0
    for stopped in range(1, len(consumers) + 1):  # one stop record at a time: nobody can take two
        assert box.push(b"", tag=STOP_TAG, timeout=30) is PushStatus.OK
        give_up = time.monotonic() + 60
        while sum(not c.is_alive() for c in consumers) < stopped and time.monotonic() < give_up:
            time.sleep(0.01)
    for process in consumers:
        process.join(60)
        assert process.exitcode == 0
    rows = [np.load(out) for out in outs]
    everything = np.concatenate(rows)

    assert everything[:, 4].all(), "a torn or corrupted payload was delivered"
    assert (everything[:, 1] == everything[:, 3]).all(), "Record.seq differs from the producer's count"
    named = everything[everything[:, 0] >= 0]  # pop_into's rows carry no producer id
    ids = [set(named[named[:, 2] == index, 0].tolist()) for index in range(6)]
    seen = [v for v in ids if v]  # bulk: the Record-taking consumer may have got none of some producer's
    assert all(len(v) == 1 for v in seen) and len(set.union(set(), *seen)) == len(seen), "producer ids"
    assert len(seen) == 6 or variant == "bulk"
    for index in range(6):
        got = np.sort(everything[everything[:, 2] == index, 3])
        expected = {4: HOLD_AT}.get(index, PER_PRODUCER if index < 4 else len(got))
        assert np.array_equal(got, np.arange(expected)), f"producer {index}: lost, duplicated or torn records"
    for part in rows:  # FIFO per producer, as each consumer sees it
        for index in range(6):
            seqs = part[part[:, 2] == index, 1]
            assert (np.diff(seqs) > 0).all(), f"producer {index}'s records reordered"
    stats = box.stats()
    total = len(everything) + len(consumers)
    assert (stats.pushed, stats.popped, stats.depth, stats.torn, stats.expired) == (total, total, 0, 0, 0)
    assert stats.producers == 6 + 1
    box.close()


def test_a_lock_holder_killed_mid_write_is_repaired_by_the_next_locker(name, caplog):
    box = Mailbox.create(name, record_size=64, capacity=8)
    assert box.push(b"before") is PushStatus.OK
    read_fd, write_fd = os.pipe()
    holder = _start(_produce, name, 7, 10, 0, write_fd)  # stops half-way through its first payload
    assert os.read(read_fd, 1) == b"h"
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with caplog.at_level(logging.WARNING):
        assert box.push(b"after", timeout=5) is PushStatus.OK
    assert "died holding" in caplog.text and "repaired" in caplog.text
    assert [record.payload for record in iter(box.pop, None)] == [b"before", b"after"]
    stats = box.stats()
    assert (stats.pushed, stats.popped, stats.torn, stats.depth, stats.producers) == (2, 2, 0, 0, 2)
    box.close()


def test_a_mutex_initialised_in_another_boot_is_initialised_afresh(name):
    """A ring file that outlived a reboot may hold a mutex locked by a process of that boot: the first
    attach of this boot re-initialises it. Here a live child holds the lock and the boot id is edited;
    without the repair the subprocess's push would block for ever (and the run time out)."""
    box = Mailbox.create(name, record_size=64, capacity=8)
    read_fd, write_fd = os.pipe()
    holder = _start(_produce, name, 7, 10, 0, write_fd)
    assert os.read(read_fd, 1) == b"h"
    path = segment_path("pbm", name)
    with open(path, "r+b") as f:
        f.seek(layout.PBM_LOCK_BOOT_OFFSET)
        f.write(b"\x01" * 16)
    code = f"from sage.mailbox import Mailbox; print(Mailbox.attach({name!r}).push(b'fresh', timeout=1).name)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert out.stdout.strip() == "OK" and "initialising it afresh" in out.stderr
    assert path.read_bytes()[layout.PBM_LOCK_BOOT_OFFSET:layout.PBM_LOCK_BOOT_OFFSET + 16] == BOOT_ID
    assert box.pop().payload == b"fresh" and box.stats().depth == 0
    box.close()


def _consume_and_hold(name: str, signal_fd: int) -> None:
    box = Mailbox.attach(name)

    def hold_before_commit(where: str) -> None:
        os.write(signal_fd, b"c")  # the record is read but read_index not yet advanced
        time.sleep(3600)
    box._test_hook = hold_before_commit
    box.pop(timeout=10)


def test_consumer_killed_inside_pop_loses_nothing_and_wedges_no_producer(name):
    box = Mailbox.create(name, record_size=16, capacity=4)
    for payload in (b"a", b"b", b"c"):
        box.push(payload)
    read_fd, write_fd = os.pipe()
    consumer = _start(_consume_and_hold, name, write_fd)
    assert os.read(read_fd, 1) == b"c"
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.join()
    assert box.push(b"d") is PushStatus.OK  # the dead consumer's lock is gone
    start = time.monotonic()
    assert box.push(b"e", timeout=0.2) is PushStatus.FULL  # nobody consumes: FULL after the timeout
    assert 0.15 < time.monotonic() - start < 5
    assert [box.pop().payload for _ in range(4)] == [b"a", b"b", b"c", b"d"]
    stats = box.stats()
    assert (stats.pushed, stats.popped, stats.full, stats.depth) == (4, 4, 1, 0)
    box.close()


def _sleep_then_report(name: str, conn) -> None:
    mailbox_module._SLEEP_SLICE_NS = 60 * 10**9  # only the doorbell can wake it within the test
    box = Mailbox.attach(name, wait="sleep")
    conn.send("ready")
    cpu, wall = time.process_time(), time.monotonic()
    record = box.pop(timeout=30)
    conn.send((record.payload, time.monotonic() - wall, time.process_time() - cpu))


def test_sleeping_consumer_is_woken_by_the_doorbell_without_spinning(name):
    box = Mailbox.create(name, record_size=16, capacity=4)
    parent, child = CTX.Pipe()
    consumer = _start(_sleep_then_report, name, child)
    assert parent.recv() == "ready"
    time.sleep(1.0)
    box.push(b"wake")
    payload, waited, cpu = parent.recv()
    consumer.join(10)
    assert payload == b"wake" and 0.8 < waited < 10
    assert cpu < 0.3, f"the waiting consumer used {cpu:.2f} s of CPU in {waited:.2f} s: it spun"
    box.close()


def _push_with_inherited_handle(box: Mailbox, count: int) -> None:
    for i in range(count):
        if box.push(make_payload(1, i), timeout=60) is not PushStatus.OK:
            os._exit(3)


def test_a_forked_child_using_its_parents_handle_is_a_separate_producer(name):
    """Without a description of its own, the child would share the parent's flock (no exclusion)
    and its producer id (merged sequences)."""
    box = Mailbox.create(name, record_size=64, capacity=4096)  # room for everything: no waiting on FULL
    box.push(make_payload(0, 0))  # the parent takes producer id 0 before the fork
    child = _start(_push_with_inherited_handle, box, 2000)
    reader = Mailbox.attach(name)
    got = {0: [], 1: []}
    for i in range(1, 2000):
        assert box.push(make_payload(0, i), timeout=60) is PushStatus.OK
        while (record := reader.pop()) is not None:
            index, number, ok = check_payload(record.payload)
            assert ok
            got[index].append((record.producer, record.seq, number))
    child.join(60)
    assert child.exitcode == 0
    for record in iter(reader.pop, None):
        index, number, _ = check_payload(record.payload)
        got[index].append((record.producer, record.seq, number))
    for index in (0, 1):
        producers, seqs, numbers = zip(*got[index], strict=True)
        assert len(set(producers)) == 1 and list(seqs) == list(numbers) == list(range(2000))
    assert got[0][0][0] != got[1][0][0]
    box.close()
    reader.close()
