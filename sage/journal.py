"""A write-ahead journal of the requests a server has taken from its inbox and not yet answered.

Popping a record from the inbox removes it from shared memory, so a server killed before it answers
would lose the request. The server therefore appends every popped request here before working on
it and appends a `done` mark once its answer is in the reply mailbox; a restarted server replays
the requests without a mark. Entries are `kind (b"R" | b"D"), id u64, length u32, crc32 u32,
payload`, each written with one `write` on an O_APPEND descriptor: it survives the process being
killed (the data is in the kernel's page cache), not a power loss (no fsync per request, which would
cost milliseconds on an SD card). A torn last entry (a kill mid-write) fails its length or CRC check
and is ignored. Opening, and growing past `compact_bytes`, rewrite the file with only the
unfinished requests (to a temporary file, then renamed).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

ENTRY = struct.Struct("<cQII")
REQUEST, DONE = b"R", b"D"


def _read_entries(data: bytes) -> list[tuple[bytes, int, bytes]]:
    entries, offset = [], 0
    while offset + ENTRY.size <= len(data):
        kind, ident, length, crc = ENTRY.unpack_from(data, offset)
        payload = data[offset + ENTRY.size:offset + ENTRY.size + length]
        if kind not in (REQUEST, DONE) or len(payload) != length or zlib.crc32(payload) != crc:
            logger.warning("journal: ignoring a torn or corrupt tail at byte %d", offset)
            break
        entries.append((kind, ident, payload))
        offset += ENTRY.size + length
    return entries


def _entry(kind: bytes, ident: int, payload: bytes = b"") -> bytes:
    return ENTRY.pack(kind, ident, len(payload), zlib.crc32(payload)) + payload


class Journal:
    def __init__(self, path: str | os.PathLike, compact_bytes: int = 64 << 20) -> None:
        self.path, self.compact_bytes = Path(path), compact_bytes
        data = self.path.read_bytes() if self.path.is_file() else b""
        pending: dict[int, bytes] = {}
        for kind, ident, payload in _read_entries(data):
            if kind == REQUEST:
                pending[ident] = payload
            else:
                pending.pop(ident, None)
        self._unfinished = list(pending.items())
        self._pending = pending
        self._next = max(pending, default=-1) + 1
        self._fd = -1
        self._compact()

    def _compact(self) -> None:
        self.close()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(_entry(REQUEST, i, p) for i, p in self._pending.items()))
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = self.path.stat().st_size

    def unfinished(self) -> list[tuple[int, bytes]]:
        """(id, request bytes) of the requests a previous run took and did not answer, oldest first."""
        return list(self._unfinished)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def begin(self, payload: bytes) -> int:
        ident, self._next = self._next, self._next + 1
        self._pending[ident] = payload
        self._append(_entry(REQUEST, ident, payload))
        return ident

    def done(self, ident: int) -> None:
        self._pending.pop(ident, None)
        self._append(_entry(DONE, ident))
        if self._size > self.compact_bytes:
            self._compact()

    def _append(self, entry: bytes) -> None:
        os.write(self._fd, entry)
        self._size += len(entry)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
