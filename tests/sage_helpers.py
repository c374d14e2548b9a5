"""Shared pieces of the sage tests: unique segment names that are removed afterwards, header edits."""

from __future__ import annotations

import os
import struct
import uuid
import zlib

from sage import layout
from sage.shm import shm_dir


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
