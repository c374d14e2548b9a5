"""Persistent HRM carries per stream: z_H/z_L kept between a stream's requests, bounded in memory,
snapshotted to disk atomically.

At most `max_live` streams stay in memory; using one more evicts the least recently used to disk.
A snapshot is `<directory>/<sha256(stream)[:32]>.npz` (z_H, z_L and the stream id) written to a
temporary file in the same directory, fsynced and renamed over the old one, so a crash at any point
leaves either the previous or the new snapshot, never a torn one. `flush()` writes every carry
changed since its last snapshot (the server calls it periodically and at shutdown); after a
SIGKILL a stream resumes from its last snapshot.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1


class CarryStore:
    def __init__(self, directory: str | os.PathLike, max_live: int, shape: tuple[int, int], dtype: np.dtype):
        if max_live < 1:
            raise ValueError(f"max_live must be >= 1, got {max_live}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_live, self.shape, self.dtype = max_live, tuple(shape), np.dtype(dtype)
        self._live: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._dirty: set[str] = set()
        self._files = {path.name for path in self.directory.glob("*.npz")}  # counted for stats, not re-globbed
        self.evictions = self.loads = self.snapshots = self.rejected = 0

    def path_for(self, stream: str) -> Path:
        return self.directory / f"{hashlib.sha256(stream.encode()).hexdigest()[:32]}.npz"

    def __len__(self) -> int:
        return len(self._live)

    def get(self, stream: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The stream's carry (from memory or its snapshot), or None for a stream never seen."""
        if stream in self._live:
            self._live.move_to_end(stream)
            return self._live[stream]
        carry = self._load(stream)
        if carry is not None:
            self.loads += 1
            self._insert(stream, carry, dirty=False)
        return carry

    def put(self, stream: str, z_H: np.ndarray, z_L: np.ndarray) -> None:
        self._insert(stream, (np.array(z_H, self.dtype), np.array(z_L, self.dtype)), dirty=True)

    def reset(self, stream: str) -> None:
        """Forget the stream: its next request starts from H_init/L_init."""
        self._live.pop(stream, None)
        self._dirty.discard(stream)
        self.path_for(stream).unlink(missing_ok=True)
        self._files.discard(self.path_for(stream).name)

    def flush(self) -> int:
        """Snapshot every carry changed since its last snapshot; returns how many were written."""
        written = 0
        for stream in list(self._dirty):
            self._write(stream, *self._live[stream])
            written += 1
        self._dirty.clear()
        return written

    def on_disk(self) -> int:
        return len(self._files)

    def _insert(self, stream: str, carry: tuple[np.ndarray, np.ndarray], dirty: bool) -> None:
        self._live[stream] = carry
        self._live.move_to_end(stream)
        if dirty:
            self._dirty.add(stream)
        while len(self._live) > self.max_live:
            old, old_carry = self._live.popitem(last=False)
            if old in self._dirty:
                self._write(old, *old_carry)
                self._dirty.discard(old)
            self.evictions += 1

    def _write(self, stream: str, z_H: np.ndarray, z_L: np.ndarray) -> None:
        path = self.path_for(stream)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, z_H=z_H, z_L=z_L, stream=np.array(stream), version=np.array(SNAPSHOT_VERSION))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._files.add(path.name)
        self.snapshots += 1

    def _load(self, stream: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path_for(stream)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                ok = (int(data["version"]) == SNAPSHOT_VERSION and str(data["stream"]) == stream
                      and data["z_H"].shape == self.shape and data["z_H"].dtype == self.dtype
                      and data["z_L"].shape == self.shape and data["z_L"].dtype == self.dtype)
                carry = (data["z_H"].copy(), data["z_L"].copy()) if ok else None
        except (OSError, ValueError, KeyError) as err:
            logger.warning("carry snapshot %s unreadable (%s); stream %r starts fresh", path, err, stream)
            carry = None
            ok = False
        if not ok:
            self.rejected += 1
            logger.warning("carry snapshot %s does not fit this model (shape %s, %s); stream %r starts fresh",
                           path, self.shape, self.dtype, stream)
        return carry
