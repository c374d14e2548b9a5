"""The binary layout of SAGE's shared segments (PBM rings version 2, FTM arenas and descriptors version 1):
what a C, C++ or CUDA-host producer needs.

All integers are little-endian and naturally aligned; every index and counter is an 8-byte aligned
u64, written with one store. Times are CLOCK_MONOTONIC nanoseconds (system-wide on Linux, so every
process on the machine shares the clock). CRC32 is zlib's (the IEEE polynomial, `crc32()` of zlib).

PBM ring file `pbm-<name>` (in /dev/shm, else the temp directory)
-----------------------------------------------------------------
Header, 4096 bytes; the immutable part [0, 80) is covered by `header_crc`:

    off  size  field
      0     4  magic            b"PBM1"
      4     4  version          u32 = 2
      8     4  header_size      u32 = 4096 (slot 0 starts here)
     12     4  slot_header      u32 = 56 (payload offset inside a slot)
     16     8  record_size      u64, largest payload in bytes
     24     8  stride           u64, bytes per slot = round_up(56 + record_size, 64)
     32     8  capacity         u64, slots
     40     8  creator_pid      u64
     48     8  creator_start    u64, clock ticks since boot (/proc/<pid>/stat field 22)
     56    16  boot_id          the creator's /proc/sys/kernel/random/boot_id as 16 raw bytes
     72     4  flags            u32, bit 0 PAYLOAD_CRC: slot crc covers the payload too (else bytes [16, 56) only);
                                bit 1 LOCK_MUTEX: the ring's lock is the mutex at 256 (else flock on the file)
     76     4  reserved         0
     80     4  header_crc       u32, crc32 of bytes [0, 80)
     84     4  state            u32: 1 live, 2 retired (recreated or unlinked: handles must re-attach)
    128     8  write_index      u64, records ever published (= pushed)
    136     8  read_index       u64, records ever taken off the ring (popped + expired + torn)
    144     8  full             u64, pushes answered FULL
    152     8  too_big          u64, pushes answered TOO_BIG
    160     8  expired          u64, records dropped at pop because their deadline had passed
    168     8  torn             u64, records dropped at pop because seq or crc did not match
    176     8  next_producer    u64, producer ids handed out so far
    184     8  wake_until_ns    u64, a consumer sleeps on the doorbell until at least this time
    192     8  sleepers         u64, consumers sleeping on the doorbell now (a dead one stays counted,
                                but only rings while wake_until_ns is in the future count)
    256    64  mutex            LOCK_MUTEX: a pthread_mutex_t of the machine's libc (glibc: 40 bytes on
                                x86-64, 48 on aarch64), initialised process-shared (PTHREAD_PROCESS_SHARED),
                                robust (PTHREAD_MUTEX_ROBUST) and error-checking (PTHREAD_MUTEX_ERRORCHECK)
    320    16  lock_boot_id     LOCK_MUTEX: the boot id of the process that initialised the mutex

Slot i (record position p lives in slot p % capacity) at header_size + i * stride:

    off  size  field
      0     8  seq              u64 = p + 1 once the record at position p is written (0: never)
      8     4  crc              u32, crc32(bytes [16, 56), crc32(payload)) with PAYLOAD_CRC, else
                                crc32(bytes [16, 56)): the payload's CRC first, continued over the
                                header fields, so a producer computes the costly part before locking
     12     4  length           u32, payload bytes
     16     4  producer         u32, producer id (from next_producer)
     20     4  pid              u32, producer process id
     24     8  producer_seq     u64, 0, 1, 2, ... per producer id
     32     8  pushed_ns        u64
     40     8  deadline_ns      u64, 0 = no ttl
     48     4  tag              u32
     52     4  reserved         0
     56     -  payload

Protocol (memory ordering): every access to the indices, counters and slots happens under the
ring's lock. With LOCK_MUTEX (what sage creates wherever the libc has robust mutexes) that is
pthread_mutex_lock on the mutex at 256: a lock that returns EOWNERDEAD (its holder died inside the
critical section) is repaired with pthread_mutex_consistent and the locker goes on, because the ring
is consistent at every store (see below); ENOTRECOVERABLE means the ring must be recreated. Without
LOCK_MUTEX it is an exclusive `flock(fd, LOCK_EX)` on the ring file (the whole file, per open file
description), which the kernel drops when its holder dies. Either lock's acquire and release order
everything inside it, so no other ordering is needed for the protocol: a producer killed inside the
critical section leaves write_index unchanged and its half-written slot is overwritten by the next
producer. Indices, counters and slot seq are written with single aligned 8-byte stores (release
stores in sage's C engine), so an unlocked read (a hint only, below) never sees half a value.

Before its first lock a process that attaches checks lock_boot_id under flock on the file: if it is
not this boot's id, the mutex may be held by a process of a previous boot (a ring file on a disk
that outlived a reboot), so it initialises the mutex afresh and writes its boot id. Every process of
one boot passes this check before using the mutex, so at most the first one re-initialises it.
flock on the file also serialises creation, stale-segment recovery and this check (never the data path).

A producer (p = write_index):
  1. take the lock; if the state word is not 1, unlock and re-attach.
  2. if p - read_index == capacity: full += 1, unlock, answer FULL.
  3. write the slot's bytes [16, 56 + length): body fields, then the payload.
  4. write crc (zlib: crc32(slot[16:56], crc32(payload)) with PAYLOAD_CRC, else crc32(slot[16:56])),
     length, seq = p + 1. (crc32(payload) may be computed before step 1.)
  5. write_index = p + 1: the commit point. Read sleepers and wake_until_ns. Release the lock.
  6. if sleepers > 0 and wake_until_ns > now: write one byte to the doorbell FIFO `pbm-<name>.bell` (open it
     O_RDWR | O_NONBLOCK; EAGAIN means it is already full of rings and can be ignored).
A consumer (r = read_index):
  1. take the lock; while r < write_index: read slot r % capacity; if seq != r + 1 or the crc does
     not match, read_index = r + 1, torn += 1 and go on; if 0 < deadline_ns <= now, read_index =
     r + 1, expired += 1 and go on; else copy the payload out, read_index = r + 1 (the commit
     point) and deliver it. Release the lock. (sage's C engine checks the crc of a record it delivers
     on its copy after releasing the lock, and counts a mismatch in torn under the lock again.)
  2. to sleep: under the lock, if the ring is still empty, sleepers += 1 and wake_until_ns =
     max(wake_until_ns, the time it will wake up by itself); unlock; poll/select the doorbell;
     read it empty; then, under the lock again, sleepers -= 1 (if > 0) and go on with 1.
A CUDA kernel cannot take the lock: a host thread owns the producer side and copies from the device.
The unlocked read of read_index and write_index that sage does before taking the lock is only a
hint (an empty ring costs no syscall); the decision is always re-made under the lock.

FTM arena file `ftm-<name>` (version 1; it takes flock on the arena file for every operation)
---------------------------
Header, 4096 bytes ([0, 80) covered by header_crc, as for PBM):

    off  size  field
      0     4  magic            b"FTM1"
      4     4  version          u32 = 1
      8     4  header_size      u32 = 4096 (the buffer table starts here)
     12     4  entry_size       u32 = 256 (one table entry per buffer)
     16     8  buffer_size      u64, bytes per buffer, a multiple of 4096
     24     8  buffers          u64
     32     8  data_offset      u64, page-aligned start of buffer 0 (buffer i at data_offset + i * buffer_size)
     40    32  creator_pid, creator_start, boot_id as in PBM (40, 48, 56)
     72     8  flags, reserved  0, 0
     80     4  header_crc       u32, crc32 of bytes [0, 80)
     84     4  state            1 live, 2 retired
    128     8  allocs, published, opened, released, reclaimed, expired, exhausted (u64 each, 128..184)

Table entry for buffer i at header_size + i * 256:

    off  size  field
      0     4  state            u32: 0 free, 1 writing, 2 published
      4     4  pending          u32, opens still expected for the published descriptor
      8     8  generation       u64, bumped at every alloc; a descriptor names one generation
     16     8  writer_pid       u64 (writing: the owner; reclaimed when it dies)
     24     8  writer_start     u64
     32     8  handoff_deadline u64, ns: pending opens lapse after it (0 = never)
     40    24  reserved
     64   192  8 leases of 24 bytes: pid u64 (0 = empty), start u64, expiry_ns u64 (0 = until released)

A buffer returns to free when it is published, has no pending opens and no lease. Leases whose
owner is dead or whose expiry passed, writers that died and pending opens past the hand-off
deadline are reclaimed under the arena lock (flock on the arena file) at every alloc.

FTM descriptor, 128 bytes (what travels through a PBM ring):

    off  size  field
      0     4  magic            b"FTD1"
      4     2  version          u16 = 1
      6     1  dtype            u8: 1 float16, 2 float32, 3 bfloat16, 4 int32
      7     1  ndim             u8, 0..4
      8    32  arena            the arena name, ASCII, NUL-padded
     40     8  offset           u64, byte offset of element 0 from the start of the arena file
     48     8  nbytes           u64
     56     4  buffer           u32, buffer index
     60     4  tag              u32
     64     8  generation       u64
     72    16  shape            u32[4] (unused dims 0)
     88    32  strides          i64[4], bytes
    120     8  deadline_ns      u64, 0 = no ttl
"""

from __future__ import annotations

import struct

PBM_VERSION = 2  # 2: the robust mutex (flags bit 1, offsets 256 and 320); 1 took flock for every call
FTM_VERSION = 1
FTD_VERSION = 1
HEADER_SIZE = 4096
CACHE_LINE = 64
PAGE = 4096

STATE_LIVE = 1
STATE_RETIRED = 2

# ---- PBM ----
PBM_MAGIC = b"PBM1"
PBM_SLOT_HEADER = 56
PBM_FIXED = struct.Struct("<4sIIIQQQQQ16sII")  # [0, 80): magic .. boot_id, flags, reserved
PBM_HEADER_CRC = 80
PBM_STATE = 84
PBM_PAYLOAD_CRC = 1
PBM_LOCK_MUTEX = 2
PBM_FLAGS = PBM_PAYLOAD_CRC | PBM_LOCK_MUTEX
PBM_MUTEX_OFFSET = 256
PBM_MUTEX_BYTES = 64
PBM_LOCK_BOOT_OFFSET = 320
PBM_COUNTERS_OFFSET = 128
PBM_COUNTERS = ("write_index", "read_index", "full", "too_big", "expired", "torn", "next_producer",
                "wake_until_ns", "sleepers")
(PBM_WRITE, PBM_READ, PBM_FULL, PBM_TOO_BIG, PBM_EXPIRED, PBM_TORN, PBM_NEXT_PRODUCER, PBM_WAKE_UNTIL,
 PBM_SLEEPERS) = range(9)
SLOT_HEAD = struct.Struct("<QII")  # at slot offset 0: seq, crc, length
SLOT_BODY = struct.Struct("<IIQQQII")  # at slot offset 16: producer .. reserved, 40 bytes
SLOT_BODY_OFFSET = 16


def pbm_stride(record_size: int) -> int:
    return -(-(PBM_SLOT_HEADER + record_size) // CACHE_LINE) * CACHE_LINE


# ---- FTM ----
FTM_MAGIC = b"FTM1"
FTM_FIXED = PBM_FIXED  # the same prefix shape
FTM_HEADER_CRC = PBM_HEADER_CRC
FTM_STATE = PBM_STATE
FTM_COUNTERS_OFFSET = 128
FTM_COUNTERS = ("allocs", "published", "opened", "released", "reclaimed", "expired", "exhausted")
FTM_ENTRY_SIZE = 256
FTM_LEASES = 8
FTM_LEASE_OFFSET = 64
# Entry viewed as 32 u64 words: word 0 packs state (low u32) and pending (high u32).
ENTRY_STATE_PENDING, ENTRY_GENERATION, ENTRY_WRITER_PID, ENTRY_WRITER_START, ENTRY_HANDOFF_DEADLINE = range(5)
BUF_FREE, BUF_WRITING, BUF_PUBLISHED = 0, 1, 2

FTD_MAGIC = b"FTD1"
DESCRIPTOR = struct.Struct("<4sHBB32sQQIIQ4I4qQ")
