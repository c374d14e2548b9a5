"""The published-weights directory a server polls for hot swaps (stdlib only: a server reads the
pointer without JAX).

Layout::

    <weights_dir>/CURRENT.json   {"version": N, "path": "<weights_dir>/v00000N", ...}: the weights to serve
    <weights_dir>/v00000N/       one params-only hrm_jax checkpoint per version (hrm_jax.checkpoint.save_params;
                                 hrm_jax.checkpoint.load_params_for_eval reads `path`)

The checkpoint of a version is complete before the pointer names it, and the pointer is replaced
atomically (written to a temporary file, flushed to disk, renamed over the old one, and the
directory entry flushed), so a reader sees either the old version or the new one, never a torn
file or a version still being written. Versions only increase; a server swaps when the version it
reads is larger than the one it serves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

POINTER = "CURRENT.json"


class WeightsError(ValueError):
    """The weights directory or its pointer is missing or malformed."""


def version_dir(weights_dir: str | os.PathLike, version: int) -> str:
    return os.path.join(os.path.abspath(os.fspath(weights_dir)), f"v{version:06d}")


def read_current(weights_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The pointer's record ({"version", "path", ...}), or None when nothing is published yet."""
    path = os.path.join(os.fspath(weights_dir), POINTER)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: unreadable weights pointer ({err}); restore it or republish") from None
    if not isinstance(record, dict) or not isinstance(record.get("version"), int) or "path" not in record:
        raise WeightsError(f"{path}: a weights pointer needs an integer 'version' and a 'path'")
    return record


def write_current(weights_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Atomically replaces the pointer with `record` (must hold an int 'version' above the current one)."""
    weights_dir = os.fspath(weights_dir)
    current = read_current(weights_dir)
    if current is not None and record["version"] <= current["version"]:
        raise WeightsError(f"version {record['version']} is not above the published {current['version']}")
    fd, tmp = tempfile.mkstemp(prefix=".CURRENT.", suffix=".json", dir=weights_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(weights_dir, POINTER))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    directory = os.open(weights_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def prune(weights_dir: str | os.PathLike, keep: int) -> list[int]:
    """Deletes all but the newest `keep` version directories (never the published one); returns the
    deleted versions."""
    if keep < 1:
        raise WeightsError(f"keep must be >= 1, got {keep}")
    current = read_current(weights_dir)
    versions = sorted(int(name[1:]) for name in os.listdir(weights_dir)
                      if name.startswith("v") and name[1:].isdigit())
    doomed = [v for v in versions[:-keep] if current is None or v != current["version"]]
    for v in doomed:
        shutil.rmtree(version_dir(weights_dir, v))
    return doomed
