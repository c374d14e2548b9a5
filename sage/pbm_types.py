"""What the PBM mailbox API hands out, shared by its two engines (sage.pbm_python and the C one)."""

from __future__ import annotations

import dataclasses
import enum
import typing

from sage import segment


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


class Record(typing.NamedTuple):  # a NamedTuple: built 3x faster than a frozen dataclass (and from C)
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
