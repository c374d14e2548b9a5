"""A shared segment file's life: atomic creation, validation at attach, stale-owner recovery.

Both segment kinds (PBM rings, FTM arenas) start with the same 80-byte immutable prefix shape
(magic, version, sizes, creator pid / start time / boot id, flags) guarded by a CRC32 at byte 80 and
a u32 state word at byte 84 (see sage.layout). A new segment is written to a private temp file and then
hard-linked under its name, so no process ever opens a half-initialised header; a creator that dies
before the link leaves only a temp file that the next create removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import pathlib
import struct
import zlib
from collections.abc import Callable

from sage import layout
from sage.shm import BOOT_ID, FileLock, ProcessId

log = logging.getLogger(__name__)

_STATE = struct.Struct("<I")
_VERSIONS = {layout.PBM_MAGIC: layout.PBM_VERSION, layout.FTM_MAGIC: layout.FTM_VERSION}
_CRC = struct.Struct("<I")


class SegmentError(Exception):
    """Base of the errors raised for a shared segment: one line naming the problem and the fix."""


class SegmentExistsError(SegmentError, FileExistsError):
    """A live segment of that name exists (its creator is running): pick another name."""


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    """No segment of that name: create it first or check the name."""


class SegmentCorruptError(SegmentError, ValueError):
    """The segment's header is not a valid one of this layout (magic, version or checksum)."""


class SegmentRetiredError(SegmentError):
    """The segment was replaced by a newer one of the same name: attach again."""


@dataclasses.dataclass(frozen=True)
class Header:
    """The immutable prefix: magic, version, three u32 and five u64 fields, the boot id, flags."""

    magic: bytes
    version: int
    header_size: int
    u32_field: int  # PBM: slot header size; FTM: table entry size
    a: int  # PBM: record_size; FTM: buffer_size
    b: int  # PBM: stride; FTM: buffers
    c: int  # PBM: capacity; FTM: data_offset
    creator: ProcessId
    flags: int = 0

    def pack(self) -> bytes:
        return layout.PBM_FIXED.pack(self.magic, self.version, self.header_size, self.u32_field, self.a,
                                     self.b, self.c, self.creator.pid, self.creator.start, self.creator.boot,
                                     self.flags, 0)


def write_header(mm: mmap.mmap, header: Header) -> None:
    fixed = header.pack()
    mm[0:len(fixed)] = fixed
    _CRC.pack_into(mm, layout.PBM_HEADER_CRC, zlib.crc32(fixed))
    _STATE.pack_into(mm, layout.PBM_STATE, layout.STATE_LIVE)


def read_header(mm: mmap.mmap, path: pathlib.Path, magic: bytes, what: str) -> Header:
    """Parse and check the prefix; any mismatch is one SegmentCorruptError naming the file."""
    if len(mm) < layout.HEADER_SIZE:
        raise SegmentCorruptError(f"{path} is {len(mm)} bytes, shorter than a {what} header; "
                                  f"remove it and create the {what} again")
    fields = layout.PBM_FIXED.unpack_from(mm, 0)
    if fields[0] != magic:
        raise SegmentCorruptError(f"{path} is not a {what} (magic {fields[0]!r}, expected {magic!r}); "
                                  f"remove it or pick another name")
    version = _VERSIONS[magic]
    if fields[1] != version:
        raise SegmentCorruptError(f"{path} has layout version {fields[1]}, this sage speaks version {version}; "
                                  f"stop the processes using it, remove it and create the {what} again")
    stored = _CRC.unpack_from(mm, layout.PBM_HEADER_CRC)[0]
    if zlib.crc32(mm[0:layout.PBM_FIXED.size]) != stored:
        raise SegmentCorruptError(f"{path}: header checksum mismatch (the header was overwritten); "
                                  f"remove it and create the {what} again")
    return Header(fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6],
                  ProcessId(fields[7], fields[8], fields[9]), fields[10])


def state(mm: mmap.mmap) -> int:
    return _STATE.unpack_from(mm, layout.PBM_STATE)[0]


def retire(mm: mmap.mmap) -> None:
    """Tell every handle still mapping this file that it was recreated or unlinked."""
    _STATE.pack_into(mm, layout.PBM_STATE, layout.STATE_RETIRED)


def adopt(mm: mmap.mmap, header: Header) -> None:
    """A new creator takes over a stale segment in place, records kept."""
    write_header(mm, dataclasses.replace(header, creator=ProcessId.current()))


@dataclasses.dataclass
class Opened:
    fd: int
    mm: mmap.mmap
    header: Header


def open_existing(path: pathlib.Path, magic: bytes, what: str, name: str) -> Opened:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise SegmentNotFoundError(f"no {what} named {name!r} (looked for {path}); create it first") from None
    try:
        size = os.fstat(fd).st_size
        if size < layout.HEADER_SIZE:
            raise SegmentCorruptError(f"{path} is {size} bytes, shorter than a {what} header; "
                                      f"remove it and create the {what} again")
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    try:
        return Opened(fd, mm, read_header(mm, path, magic, what))
    except BaseException:
        mm.close()
        os.close(fd)
        raise


def create_new(path: pathlib.Path, size: int, init: Callable[[mmap.mmap], None], what: str, name: str,
               *, stale: str, compatible: Callable[[Header], bool], magic: bytes) -> Opened:
    """Create `path` (size bytes, initialised by `init`), recovering a stale one.

    stale="reset" retires and replaces a segment whose creator is dead; stale="adopt" takes it over
    in place when `compatible(header)` holds (its records survive), else resets it.
    """
    if stale not in ("reset", "adopt"):
        raise ValueError(f"stale must be 'reset' or 'adopt', got {stale!r}")
    for _ in range(8):  # a concurrent create may win the link; look again
        if path.exists():
            adopted = _recover_existing(path, magic, what, name, stale, compatible)
            if adopted is not None:
                return adopted
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            init(mm)
            try:
                os.link(tmp, path)
            except FileExistsError:
                mm.close()
                os.close(fd)
                continue
            return Opened(fd, mm, read_header(mm, path, magic, what))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    raise SegmentExistsError(f"{what} {name!r} kept being recreated by other processes; retry")


def _recover_existing(path: pathlib.Path, magic: bytes, what: str, name: str, stale: str,
                      compatible: Callable[[Header], bool]) -> Opened | None:
    try:
        opened = open_existing(path, magic, what, name)
    except SegmentNotFoundError:
        return None
    try:
        creator = opened.header.creator
        with FileLock(opened.fd):
            if state(opened.mm) == layout.STATE_LIVE and creator.alive():
                raise SegmentExistsError(
                    f"{what} {name!r} exists and its creator (pid {creator.pid}) is alive; attach to it, or "
                    f"unlink it first")
            if stale == "adopt" and state(opened.mm) == layout.STATE_LIVE and compatible(opened.header):
                adopt(opened.mm, opened.header)
                log.warning("adopted stale %s %r of dead pid %d (records kept)", what, name, creator.pid)
                return Opened(opened.fd, opened.mm, read_header(opened.mm, path, magic, what))
            retire(opened.mm)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            reason = "another boot" if creator.boot != BOOT_ID else f"dead pid {creator.pid}"
            log.warning("reset stale %s %r left by %s", what, name, reason)
    except BaseException:
        opened.mm.close()
        os.close(opened.fd)
        raise
    opened.mm.close()
    os.close(opened.fd)
    return None
