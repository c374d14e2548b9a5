"""A bounded, persistent store of salient experiences (SQLite in WAL mode).

An experience is a payload of named NumPy arrays (e.g. a puzzle, the model's answer, a label)
with its stream, salience, provenance and episode. It lives in one of three tiers:

    recent (0)        every admitted experience enters here; a FIFO of `recent_capacity`
    episode (1)       what the recent buffer let through when it overflowed: the oldest rows whose
                      decayed priority is at least the buffer's median; the rest are dropped
    consolidated (2)  experiences a sleep has trained on and whose new weights were accepted

The decayed priority of a row is salience * 2^(-age / half_life[tier]); a tier past its capacity
drops its lowest-priority rows (recent: promotes or drops its oldest, as above). Admission is
adaptive: `offer` writes an experience when its salience reaches the `threshold_quantile` of the
last `threshold_window` offered saliences (kept in the database, so the threshold survives a
restart); during the first `warmup` offers everything is admitted. `sample` draws replay
batches without replacement with probability proportional to priority^alpha.

Guarantees (tests/test_experience.py): every write is one transaction together with the evictions
it causes, so a writer killed with SIGKILL leaves an intact database holding every committed row
and no part of the interrupted one; rows never exceed the sum of the tier capacities, and the files
stay bounded: the database because the pages of dropped rows are reused, the WAL because SQLite
checkpoints it every `wal_autocheckpoint` pages and then truncates it to `journal_size_limit`
(so it holds at most about that many pages plus one transaction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Self

import numpy as np

logger = logging.getLogger(__name__)

RECENT, EPISODE, CONSOLIDATED = 0, 1, 2
TIER_NAMES = ("recent", "episode", "consolidated")
# Where a payload's label came from: the answer checked itself (a Sudoku verifies without a label),
# the exact solver supplied it (standing in for a slow "cognition" source), or nothing did yet.
PROVENANCES = ("verified", "solver-labelled", "unlabelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    created REAL NOT NULL,
    salience REAL NOT NULL CHECK (salience >= 0 AND salience <= 1),
    tier INTEGER NOT NULL CHECK (tier IN (0, 1, 2)),
    provenance TEXT NOT NULL,
    episode TEXT,
    replays INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS experiences_tier ON experiences (tier, created);
CREATE TABLE IF NOT EXISTS offers (seq INTEGER PRIMARY KEY AUTOINCREMENT, salience REAL NOT NULL);
"""


class ExperienceStoreError(ValueError):
    """Bad input to the store (salience, provenance, payload) or an unreadable database file."""


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Capacities (rows), decay half-lives (seconds) and the admission rule."""

    recent_capacity: int = 256
    episode_capacity: int = 2048
    consolidated_capacity: int = 2048
    half_life_s: tuple[float, float, float] = (3600.0, 7 * 86400.0, 90 * 86400.0)
    threshold_quantile: float = 0.5
    threshold_window: int = 512
    warmup: int = 32
    max_payload_bytes: int = 1 << 20
    journal_size_limit: int = 4 << 20  # bytes the WAL is truncated to after a checkpoint
    wal_autocheckpoint: int = 1000  # WAL pages that trigger a checkpoint (SQLite's default)
    synchronous: str = "FULL"  # NORMAL survives a killed process too; FULL also a power cut

    def __post_init__(self) -> None:
        for name in ("recent_capacity", "episode_capacity", "consolidated_capacity", "threshold_window",
                     "max_payload_bytes", "journal_size_limit", "wal_autocheckpoint"):
            if getattr(self, name) < 1:
                raise ExperienceStoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.half_life_s) != 3 or min(self.half_life_s) <= 0:
            raise ExperienceStoreError(f"half_life_s needs three positive values, got {self.half_life_s}")
        if not 0 <= self.threshold_quantile <= 1 or self.warmup < 0:
            raise ExperienceStoreError("threshold_quantile must be in [0, 1] and warmup >= 0")
        if self.synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ExperienceStoreError(f"synchronous must be NORMAL, FULL or EXTRA, got {self.synchronous!r}")

    @property
    def capacities(self) -> tuple[int, int, int]:
        return (self.recent_capacity, self.episode_capacity, self.consolidated_capacity)


@dataclasses.dataclass(frozen=True)
class Experience:
    """One stored experience (payload arrays decoded)."""

    id: int
    stream: str
    created: float
    salience: float
    tier: int
    provenance: str
    episode: str | None
    replays: int
    payload: dict[str, np.ndarray]
    meta: dict[str, Any]


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Named arrays -> .npz bytes (no pickles, so a stored row can never run code on load)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in payload.items()})
    return buffer.getvalue()


def decode_payload(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class ExperienceStore:
    """The store at `path` (created if missing). One writer at a time; readers may run alongside
    (WAL). `clock` gives the time in seconds (a test can pass a fake one)."""

    def __init__(self, path: str | os.PathLike, config: StoreConfig | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = os.fspath(path)
        self.config = config or StoreConfig()
        self.clock = clock
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self.config.synchronous}")
            self._db.execute(f"PRAGMA journal_size_limit={self.config.journal_size_limit}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={self.config.wal_autocheckpoint}")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ExperienceStoreError(f"{self.path}: not a usable experience store ({err}); move it away "
                                       "and a new one is created") from None

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- admission -----------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The salience an offer must reach now (0 during warm-up)."""
        values = [v for (v,) in self._db.execute("SELECT salience FROM offers")]
        if len(values) < max(self.config.warmup, 1):
            return 0.0
        return float(np.quantile(values, self.config.threshold_quantile))

    def offer(self, stream: str, payload: Mapping[str, Any], salience: float, **fields: Any) -> int | None:
        """Writes the experience if its salience reaches the adaptive threshold; returns its id or
        None. The offered salience enters the threshold's window either way. `fields` as `add`."""
        _check_salience(salience)
        admit = salience >= self.threshold
        with self._transaction() as db:
            db.execute("INSERT INTO offers (salience) VALUES (?)", (float(salience),))
            db.execute("DELETE FROM offers WHERE seq <= (SELECT MAX(seq) FROM offers) - ?",
                       (self.config.threshold_window,))
            return self._insert(db, [(stream, payload, salience, fields)])[0] if admit else None

    def add(self, stream: str, payload: Mapping[str, Any], salience: float, *, provenance: str = "unlabelled",
            episode: str | None = None, meta: Mapping[str, Any] | None = None) -> int:
        """Writes the experience unconditionally (into the recent tier); returns its id."""
        return self.add_many([(stream, payload, salience,
                               {"provenance": provenance, "episode": episode, "meta": meta})])[0]

    def add_many(self, items: Sequence[tuple[str, Mapping[str, Any], float, Mapping[str, Any]]]) -> list[int]:
        """Writes (stream, payload, salience, fields) items in one transaction; all or none."""
        with self._transaction() as db:
            return self._insert(db, items)

    def _insert(self, db: sqlite3.Connection, items) -> list[int]:
        ids = []
        now = self.clock()
        for stream, payload, salience, fields in items:
            _check_salience(salience)
            provenance = fields.get("provenance") or "unlabelled"
            _check_provenance(provenance)
            blob = encode_payload(payload)
            if len(blob) > self.config.max_payload_bytes:
                raise ExperienceStoreError(f"payload of {len(blob)} bytes exceeds max_payload_bytes="
                                           f"{self.config.max_payload_bytes}; store less or raise the limit")
            cursor = db.execute(
                "INSERT INTO experiences (stream, created, salience, tier, provenance, episode, payload, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (stream, now, float(salience), RECENT, provenance, fields.get("episode"), blob,
                 json.dumps(dict(fields.get("meta") or {}))))
            ids.append(int(cursor.lastrowid))
        self._enforce_bounds(db, now)
        return ids

    # -- tiers and decay -----------------------------------------------------------------------
    def _priorities(self, db: sqlite3.Connection, tier: int, now: float) -> tuple[np.ndarray, np.ndarray]:
        rows = db.execute("SELECT id, salience, created FROM experiences WHERE tier = ? ORDER BY created, id",
                          (tier,)).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0)
        ids, salience, created = (np.array(c) for c in zip(*rows))
        age = np.maximum(now - created.astype(np.float64), 0.0)
        return ids.astype(np.int64), salience * np.exp2(-age / self.config.half_life_s[tier])

    def _enforce_bounds(self, db: sqlite3.Connection, now: float) -> None:
        ids, priority = self._priorities(db, RECENT, now)
        excess = len(ids) - self.config.recent_capacity
        if excess > 0:
            median = float(np.median(priority))
            oldest, oldest_priority = ids[:excess], priority[:excess]
            promote = oldest[oldest_priority >= median].tolist()
            drop = oldest[oldest_priority < median].tolist()
            db.executemany("UPDATE experiences SET tier = ? WHERE id = ?", [(EPISODE, i) for i in promote])
            db.executemany("DELETE FROM experiences WHERE id = ?", [(i,) for i in drop])
        for tier in (EPISODE, CONSOLIDATED):
            self._drop_lowest(db, tier, now)

    def _drop_lowest(self, db: sqlite3.Connection, tier: int, now: float) -> None:
        ids, priority = self._priorities(db, tier, now)
        excess = len(ids) - self.config.capacities[tier]
        if excess > 0:
            lowest = ids[np.argsort(priority, kind="stable")[:excess]]
            db.executemany("DELETE FROM experiences WHERE id = ?", [(int(i),) for i in lowest])

    def consolidate(self, ids: Sequence[int]) -> None:
        """Moves experiences into the consolidated tier (a sleep trained on them and kept the weights)."""
        with self._transaction() as db:
            db.executemany("UPDATE experiences SET tier = ? WHERE id = ?", [(CONSOLIDATED, int(i)) for i in ids])
            self._drop_lowest(db, CONSOLIDATED, self.clock())

    # -- labels --------------------------------------------------------------------------------
    def relabel(self, experience_id: int, provenance: str, **arrays: Any) -> None:
        """Sets the provenance and adds/replaces payload arrays (e.g. a solver's label)."""
        _check_provenance(provenance)
        with self._transaction() as db:
            row = db.execute("SELECT payload FROM experiences WHERE id = ?", (experience_id,)).fetchone()
            if row is None:
                raise ExperienceStoreError(f"no experience with id {experience_id} (evicted or never stored)")
            payload = {**decode_payload(row[0]), **arrays}
            db.execute("UPDATE experiences SET provenance = ?, payload = ? WHERE id = ?",
                       (provenance, encode_payload(payload), experience_id))

    # -- reading -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT tier, COUNT(*) FROM experiences GROUP BY tier").fetchall())
        return {name: int(found.get(tier, 0)) for tier, name in enumerate(TIER_NAMES)}

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM experiences").fetchone()[0])

    def get(self, ids: Sequence[int]) -> list[Experience]:
        """Experiences by id, in the order asked (missing ids are skipped)."""
        by_id = {}
        for i in ids:
            row = self._db.execute("SELECT * FROM experiences WHERE id = ?", (int(i),)).fetchone()
            if row is not None:
                by_id[int(i)] = _experience(row)
        return [by_id[int(i)] for i in ids if int(i) in by_id]

    def all(self) -> list[Experience]:
        return [_experience(r) for r in self._db.execute("SELECT * FROM experiences ORDER BY id")]

    def sample(self, n: int, rng: np.random.Generator, *, tiers: Sequence[int] = (RECENT, EPISODE, CONSOLIDATED),
               alpha: float = 1.0, provenances: Sequence[str] | None = None) -> list[Experience]:
        """Up to n experiences without replacement, P(i) proportional to priority_i^alpha (alpha 0:
        uniform); counts a replay for each."""
        now = self.clock()
        ids, priority = [], []
        for tier in tiers:
            tier_ids, tier_priority = self._priorities(self._db, tier, now)
            ids.append(tier_ids)
            priority.append(tier_priority)
        ids, priority = np.concatenate(ids), np.concatenate(priority)
        if provenances is not None:
            allowed = {int(i) for (i,) in self._db.execute(
                f"SELECT id FROM experiences WHERE provenance IN ({','.join('?' * len(provenances))})",
                tuple(provenances))}
            keep = np.array([int(i) in allowed for i in ids], bool)
            ids, priority = ids[keep], priority[keep]
        if len(ids) == 0 or n < 1:
            return []
        weights = np.power(priority, alpha) + 1e-12  # a zero salience stays drawable last
        picked = rng.choice(ids, size=min(n, len(ids)), replace=False, p=weights / weights.sum())
        with self._transaction() as db:
            db.executemany("UPDATE experiences SET replays = replays + 1 WHERE id = ?", [(int(i),) for i in picked])
        return self.get(picked.tolist())

    def file_bytes(self) -> tuple[int, int]:
        """Bytes on disk: (the database, its WAL)."""
        return tuple(os.path.getsize(p) if os.path.exists(p) else 0 for p in (self.path, self.path + "-wal"))


def _experience(row: tuple) -> Experience:
    id_, stream, created, salience, tier, provenance, episode, replays, payload, meta = row
    return Experience(int(id_), stream, float(created), float(salience), int(tier), provenance, episode,
                      int(replays), decode_payload(payload), json.loads(meta))


def _check_salience(salience: float) -> None:
    if not 0 <= float(salience) <= 1:
        raise ExperienceStoreError(f"salience must be in [0, 1], got {salience}")


def _check_provenance(provenance: str) -> None:
    if provenance not in PROVENANCES:
        raise ExperienceStoreError(f"provenance must be one of {PROVENANCES}, got {provenance!r}")
