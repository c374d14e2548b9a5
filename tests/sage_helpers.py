"""Shared pieces of the sage tests: unique segment names that are removed afterwards, header edits."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import uuid
import zlib

from sage import layout
from sage.mailbox import native_engine_status
from sage.shm import shm_dir

# The mailbox engines built here: the C one where sage._pbm is built (pip install -e . builds it in place).
ENGINES = ["native", "python"] if native_engine_status() is None else ["python"]


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def remove_segments(name: str) -> None:
    for path in shm_dir().glob(f"*-{name}*"):
        path.unlink(missing_ok=True)


def rewrite_header(path, **fields) -> None:
    """Change fields of a segment's immutable prefix and re-seal its CRC (a well-formed header that
    says something else), e.g. rewrite_header(p, creator_pid=1)."""
    names = ("magic", "version", "header_size", "u32_field", "a", "b", "c", "creator_pid", "creator_start",
             "boot_id", "flags", "reserved")
    with open(path, "r+b") as f:
        raw = f.read(layout.PBM_FIXED.size)
        values = dict(zip(names, layout.PBM_FIXED.unpack(raw), strict=True))
        values.update(fields)
        fixed = layout.PBM_FIXED.pack(*(values[n] for n in names))
        f.seek(0)
        f.write(fixed + struct.pack("<I", zlib.crc32(fixed)))


@contextlib.contextmanager
def running(server, boxes, join_timeout: float = 60):
    """Runs `server` (sage.serve.Server) in a thread for the block; then stops it, checks that it stopped and
    removes its mailboxes."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.request_stop()
        thread.join(join_timeout)
        assert not thread.is_alive()
        for box in boxes:
            box.unlink()
            box.close()
