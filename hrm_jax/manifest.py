"""Checksum manifests of finished checkpoints: a damaged or half-written one is told apart from a good one.

orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every item is
committed, so a save killed mid-write is never listed as a step. What the rename cannot catch is a
finished checkpoint damaged later (a truncated copy, flipped bytes on disk, an item deleted) or a
process killed after the rename but before anything else ran. So after orbax reports the save
complete, `write` records the size and SHA-256 of every file of the step in `<step>/MANIFEST_FILE`
(written to a temporary name, flushed and renamed: the manifest itself is all or nothing), and
`problem` compares a step against it. A step whose metadata promises a manifest (`MANIFEST_KEY`)
but has none is a save that did not finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

logger = logging.getLogger(__name__)

MANIFEST_FILE = "hrm_manifest.json"
# Set in a checkpoint's JSON metadata by writers that add a manifest; older checkpoints lack it.
MANIFEST_KEY = "manifest"
_CHUNK = 1 << 20


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under step_dir, as sorted '/'-separated relative paths (the manifest excluded)."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def write(step_dir: str | os.PathLike) -> str:
    """Records {relative path: [size, sha256]} of every file in a finished step dir; returns its path."""
    step_dir = os.fspath(step_dir)
    entries = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
               for rel in _files(step_dir)}
    path = os.path.join(step_dir, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def problem(step_dir: str | os.PathLike) -> str | None:
    """None if the step dir matches its manifest, else what is wrong (one phrase naming the file)."""
    step_dir = os.fspath(step_dir)
    path = os.path.join(step_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return f"no {MANIFEST_FILE}: the save did not finish"
    try:
        with open(path, encoding="utf-8") as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST_FILE} ({type(err).__name__})"
    present = set(_files(step_dir))
    for rel, (size, digest) in sorted(expected.items()):
        full = os.path.join(step_dir, rel)
        if rel not in present:
            return f"{rel} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{rel} has {actual} bytes, the save wrote {size} (truncated or overwritten)"
        if _sha256(full) != digest:
            return f"{rel} does not match its checksum (damaged bytes)"
    return None
