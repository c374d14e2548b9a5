"""Sudoku-Extreme style dataset: equivalence classes under the symmetry group, sources, the builder.

Encoding as the reference (sapientinc/HRM dataset/build_sudoku_dataset.py): 81 tokens, 0 pad,
1 blank, 2..10 the digits 1..9; labels are the full solution in the same code, every cell
supervised; one puzzle identifier (0, blank); each original training puzzle is a group holding
itself followed by its augmentations; test puzzles are not augmented.

Augmentations (`SudokuTransform`, in sudoku_solver.py) are the reference's `shuffle_sudoku`: a
digit relabelling, an optional transpose, a permutation of bands and of rows within each band, of
stacks and of columns within each stack. They form a group G (|G| = 9! * 2 * 6^8). Train and test
are split by G-equivalence class, decided exactly: an invariant key (`orbit_keys`) buckets the
puzzles (equivalent puzzles always share a key), and `find_transform`, an exhaustive pruned
search, settles the few puzzles that share a key.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Iterable, Sequence

import numpy as np

from hrm_jax.data.format import PuzzleDatasetMetadata, write_split
from hrm_jax.data.samples import sample_path
from hrm_jax.data.sudoku_solver import LINE_PERMS, Collection, SudokuTransform, read_collection, solve_many

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- equivalence
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic): a fixed, well-spread hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _cell_codes(g: np.ndarray, turned: bool) -> np.ndarray:
    """Invariant codes uint64[N, 81] of the given cells of grids g int[N, 9, 9] (0 for blanks).

    Round 0 describes each given by counts every group element preserves: givens in its row,
    column, box, band, stack; occurrences of its digit in the grid, its band, its stack. Two
    rounds of colour refinement (as Weisfeiler-Lehman) then add the sums of hashed codes of the
    givens sharing its row, its column, its box and its digit. `turned` describes g.T without
    transposing: rows and columns (bands and stacks) swap roles.
    """
    given = g > 0
    n = np.arange(g.shape[0])[:, None, None]
    band_of, stack_of = np.arange(9)[:, None] // 3, np.arange(9)[None, :] // 3
    onehot = (g[..., None] == np.arange(10)).astype(np.int16)             # [N, 9, 9, 10]
    box = given.reshape(-1, 3, 3, 3, 3).sum((2, 4))                        # [N, band, stack]
    band_digit = onehot.reshape(-1, 3, 27, 10).sum(2)[n, band_of, g]
    stack_digit = onehot.reshape(-1, 9, 3, 3, 10).sum((1, 3))[n, stack_of, g]
    row = np.broadcast_to(given.sum(2)[:, :, None], g.shape)
    col = np.broadcast_to(given.sum(1)[:, None, :], g.shape)
    band, stack = box.sum(2)[n, band_of], box.sum(1)[n, stack_of]
    if turned:
        row, col, band, stack, band_digit, stack_digit = col, row, stack, band, stack_digit, band_digit
    code = np.zeros(g.shape, np.uint64)
    for feature in (row, col, box[n, band_of, stack_of], band, stack,
                    onehot.sum((1, 2))[n, g], band_digit, stack_digit):
        code = code * np.uint64(32) + feature.astype(np.uint64)
    for _ in range(2):
        h = np.where(given, _mix(code), np.uint64(0))
        row_sum = np.broadcast_to(h.sum(2, dtype=np.uint64)[:, :, None], g.shape)
        col_sum = np.broadcast_to(h.sum(1, dtype=np.uint64)[:, None, :], g.shape)
        box_sum = h.reshape(-1, 3, 3, 3, 3).sum((2, 4), dtype=np.uint64)[n, band_of, stack_of]
        digit_sum = np.stack([np.where(g == d, h, np.uint64(0)).sum((1, 2), dtype=np.uint64)
                              for d in range(10)], axis=1)[n, g]
        if turned:
            row_sum, col_sum = col_sum, row_sum
        for part in (row_sum, col_sum, box_sum, digit_sum):
            code = _mix(code * np.uint64(0x9E3779B97F4A7C15) + part)
    return np.where(given, code, np.uint64(0)).reshape(-1, 81)


def orbit_keys(grids: np.ndarray, chunk: int = 4096) -> list[bytes]:
    """An invariant of the symmetry group for each of int[N, 81] grids: equivalent grids always
    get equal keys; different classes rarely collide (`find_transform` settles those).

    The key is the sorted multiset of the cells' invariant codes (`_cell_codes`), taken in the
    orientation (as is or transposed) whose sorted list is lexicographically smaller, since a
    transpose is in the group but swaps the roles of rows and columns.
    """
    grids = np.asarray(grids).reshape(-1, 81)
    keys: list[bytes] = []
    with np.errstate(over="ignore"):  # the hashes wrap around on purpose
        for start in range(0, len(grids), chunk):
            g = grids[start:start + chunk].astype(np.int64).reshape(-1, 9, 9)
            plain = np.sort(_cell_codes(g, turned=False), axis=1)
            turned = np.sort(_cell_codes(g, turned=True), axis=1)
            differs = plain != turned
            first = np.argmax(differs, axis=1)
            rows = np.arange(len(plain))
            use_turned = differs.any(1) & (turned[rows, first] < plain[rows, first])
            keys.extend(k.tobytes() for k in np.where(use_turned[:, None], turned, plain))
    return keys


def find_transform(a: np.ndarray, b: np.ndarray) -> SudokuTransform | None:
    """A group element g with g.apply(a) == b for grids int[81], or None when there is none.

    Exhaustive over the 2 * 1296 * 1296 position maps, pruned by given counts: rows (columns)
    must map to rows (columns) with the same number of givens and the given masks must match;
    then the digits must relabel one-to-one.
    """
    a9, b9 = np.asarray(a).reshape(9, 9), np.asarray(b).reshape(9, 9)
    b_mask = b9 > 0
    for transpose in (False, True):
        src = a9.T if transpose else a9
        mask = src > 0
        rows_ok = LINE_PERMS[np.all(mask.sum(1)[LINE_PERMS] == b_mask.sum(1), axis=1)]
        cols_ok = LINE_PERMS[np.all(mask.sum(0)[LINE_PERMS] == b_mask.sum(0), axis=1)]
        for rows in rows_ok:
            moved = mask[rows][:, cols_ok]                     # [9, n_cols, 9]
            for cols in cols_ok[np.all(moved == b_mask[:, None, :], axis=(0, 2))]:
                digit_map = _digit_bijection(src[rows][:, cols], b9)
                if digit_map is not None:
                    return SudokuTransform(digit_map, transpose, rows, cols)
    return None


def _digit_bijection(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """int8[10] d with d[x] == y on the givens (same masks assumed), completed to a permutation
    of 1..9, or None when the givens do not relabel one-to-one."""
    pairs = set(zip(x[x > 0].tolist(), y[y > 0].tolist()))
    forward = dict(pairs)
    if len(forward) != len(pairs) or len(set(forward.values())) != len(forward):
        return None
    unused = iter(sorted(set(range(1, 10)) - set(forward.values())))
    return np.array([0] + [forward[d] if d in forward else next(unused) for d in range(1, 10)],
                    dtype=np.int8)


def equivalence_classes(grids: np.ndarray) -> np.ndarray:
    """Exact classes under the symmetry group: int[N, 81] -> int64[N] class ids numbered in order
    of first appearance. Grids sharing an `orbit_keys` key are compared with `find_transform`
    against one representative per class found so far."""
    keys = orbit_keys(grids)
    grids = np.asarray(grids).reshape(-1, 81)
    class_of = np.empty(len(keys), np.int64)
    reps_by_key: dict[bytes, list[tuple[int, int]]] = {}  # key -> [(representative, class id)]
    next_id = 0
    for i, key in enumerate(keys):
        reps = reps_by_key.setdefault(key, [])
        match = next((cid for rep, cid in reps
                      if np.array_equal(grids[rep], grids[i])
                      or find_transform(grids[rep], grids[i]) is not None), None)
        if match is None:
            match, next_id = next_id, next_id + 1
            reps.append((i, match))
        class_of[i] = match
    return class_of


# ----------------------------------------------------------------------------- sources
SEQ_LEN = 81
VOCAB_SIZE = 11  # 0 pad, 1 blank, 2..10 digits 1..9 (reference: digits + 1, pad 0)
# Training and test pools: the hard collections. Sudoku-Extreme is hard on purpose (the paper
# tests on held-out hard puzzles); 17_clue is mostly easy and serg_benchmark has no unique
# solutions, so both stay out unless asked for (see the README of the shared data).
DEFAULT_POOL = ("forum_hardest_1905_11plus", "magictour_top1465")
SAMPLE_PATH = sample_path("sudoku_sample.txt")
# The full collections beside a checkout (the repository cloned next to a `shared/` folder), looked
# up from the working directory; HRM_SUDOKU_DATA points anywhere else.
SHARED_DIR = pathlib.Path("..") / "shared" / "data" / "sudoku"


class SudokuDataError(ValueError):
    """Sudoku source data is missing or too small for the requested build."""


def default_source_dir() -> pathlib.Path:
    """Where the puzzle collections are: $HRM_SUDOKU_DATA, else ../shared/data/sudoku relative to
    the working directory, else the bundled sample (hrm_jax/data/samples/sudoku_sample.txt)."""
    env = os.environ.get("HRM_SUDOKU_DATA")
    if env:
        if not os.path.exists(env):
            raise SudokuDataError(f"HRM_SUDOKU_DATA={env!r} does not exist; point it at a "
                                  "directory of puzzle .txt files or at one such file")
        return pathlib.Path(env)
    if SHARED_DIR.is_dir():
        return SHARED_DIR.resolve()
    if SAMPLE_PATH.is_file():
        return SAMPLE_PATH
    raise SudokuDataError("no Sudoku puzzles found: set HRM_SUDOKU_DATA to a directory of "
                          "puzzle .txt files (one 81-character puzzle per line)")


def load_collections(source: str | os.PathLike, names: Iterable[str] | None = None
                     ) -> dict[str, Collection]:
    """Read the collections of `source` (a directory of .txt files, or one file) by file stem;
    `names` restricts which are read and must all exist."""
    source = pathlib.Path(source)
    if source.is_file():
        files = {source.stem: source}
    elif source.is_dir():
        files = {p.stem: p for p in sorted(source.glob("*.txt")) if not p.stem.startswith("LICENSE")}
    else:
        raise SudokuDataError(f"{source} is neither a puzzle file nor a directory")
    wanted = list(files) if names is None else list(names)
    missing = [n for n in wanted if n not in files]
    if missing:
        raise SudokuDataError(f"collections {missing} not in {source}; available: {sorted(files)}")
    return {n: read_collection(str(files[n]), n) for n in wanted}


def scan_collections(source: str | os.PathLike, names: Iterable[str] | None = None, *,
                     solve_limit: int | None = 0, workers: int = 1) -> dict[str, dict]:
    """Validation report per collection: lines, accepted, rejected by reason; with solve_limit
    (None: all) the first well-formed puzzles are also solved and counted by solution count."""
    report = {}
    for name, col in load_collections(source, names).items():
        entry = {"puzzle_lines": col.num_lines, "well_formed": len(col.grids),
                 "rejected": dict(col.rejected)}
        grids = col.grids if solve_limit is None else col.grids[:solve_limit]
        if len(grids):
            start = time.perf_counter()
            counts = solve_many(grids, workers)[0]
            entry["solved"] = {"puzzles": len(grids), "unique": int((counts == 1).sum()),
                               "no_solution": int((counts == 0).sum()),
                               "multiple_solutions": int((counts >= 2).sum()),
                               "ms_per_puzzle": 1e3 * (time.perf_counter() - start) / len(grids)}
        report[name] = entry
    return report


# ----------------------------------------------------------------------------- the builder
class _ClassRegistry:
    """Puzzles claimed by a split, bucketed by orbit key, to refuse equivalent newcomers."""

    def __init__(self) -> None:
        self._buckets: dict[bytes, list[tuple[np.ndarray, str]]] = {}

    def claim(self, grid: np.ndarray, key: bytes, split: str) -> str | None:
        """Register grid for split, or return the split of an equivalent claimed grid."""
        bucket = self._buckets.setdefault(key, [])
        for other, other_split in bucket:
            if np.array_equal(other, grid) or find_transform(other, grid) is not None:
                return other_split
        bucket.append((grid, split))
        return None


@dataclasses.dataclass
class _Pool:
    grids: np.ndarray        # int8[P, 81]
    source: np.ndarray       # int8[P] index into names
    names: list[str]
    order: np.ndarray        # random visiting order of the pool
    seen: np.ndarray         # bool[P], visited by an earlier selection
    registry: _ClassRegistry


def select_puzzles(pool: _Pool, split: str, eligible: np.ndarray, quota: int | None, workers: int
            ) -> tuple[list[tuple[int, np.ndarray, int]], collections.Counter]:
    """Visit eligible pool puzzles in random order; keep those of a new equivalence class with
    exactly one solution until `quota` (None: all). Returns [(pool index, solution, rating)]
    and counts of the skipped by reason."""
    candidates = [int(i) for i in pool.order if eligible[i] and not pool.seen[i]]
    accepted, skipped, pos = [], collections.Counter(), 0
    while pos < len(candidates) and (quota is None or len(accepted) < quota):
        need = len(candidates) if quota is None else quota - len(accepted)
        # A little spare for rejects; at most 4096 at a time so that progress can be logged.
        chunk = candidates[pos:pos + min(need + need // 20 + 16, 4096)]
        pos += len(chunk)
        pool.seen[chunk] = True
        fresh = []
        for i, key in zip(chunk, orbit_keys(pool.grids[chunk])):
            clash = pool.registry.claim(pool.grids[i], key, split)
            if clash is None:
                fresh.append(i)
            else:
                skipped[f"equivalent_to_{clash}"] += 1
        counts, solutions, _, backtracks = solve_many(pool.grids[fresh], workers)
        for i, count, solution, rating in zip(fresh, counts, solutions, backtracks):
            if quota is not None and len(accepted) >= quota:
                skipped["spare_not_used"] += 1  # claimed, so kept out of later splits too
            elif count == 1:
                accepted.append((i, solution, int(rating)))
            else:
                skipped["no_solution" if count == 0 else "multiple_solutions"] += 1
        log.info("%s: %d accepted after visiting %d of %d candidates", split, len(accepted), pos,
                 len(candidates))
    if quota is not None and len(accepted) < quota:
        raise SudokuDataError(f"{split}: only {len(accepted)} usable puzzles of {quota} asked "
                              f"(skipped: {dict(skipped)}); lower the size or add collections")
    return accepted, skipped


def reveal_givens(puzzles: np.ndarray, solutions: np.ndarray, max_blanks: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """Fill random blanks of each puzzle from its solution until at most max_blanks remain.

    Adding correct givens keeps a unique solution unique, so the result needs no re-check. Used
    for easier sets (the CPU quick start); the difficulty rating stays the original puzzle's.
    """
    out = puzzles.copy()
    for grid, solution in zip(out, solutions):
        blanks = np.flatnonzero(grid == 0)
        if len(blanks) > max_blanks:
            fill = rng.choice(blanks, len(blanks) - max_blanks, replace=False)
            grid[fill] = solution[fill]
    return out


def _augment(puzzles: np.ndarray, solutions: np.ndarray, num_aug: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """int8[G, 81] originals -> int8[G * (1 + num_aug), 81]: each original followed by its
    augmentations (the reference's group layout); puzzle and solution share each transform."""
    inputs = np.empty((len(puzzles), 1 + num_aug, 81), np.int8)
    labels = np.empty_like(inputs)
    inputs[:, 0], labels[:, 0] = puzzles, solutions
    for g in range(len(puzzles) if num_aug else 0):
        transform = SudokuTransform.random(rng, (num_aug,))
        inputs[g, 1:] = transform.apply(puzzles[g])
        labels[g, 1:] = transform.apply(solutions[g])
    return inputs.reshape(-1, 81), labels.reshape(-1, 81)


_DIFFICULTY_DOC = ("all__difficulty.npy: int32 per example, dead ends met by "
                   "hrm_jax.data.sudoku_solver.solve (naked/hidden singles, minimum-remaining-"
                   "values branching) before its first solution; augmentations share the "
                   "original's value (cf. the 'rating' column of sapientinc/sudoku-extreme)")


def _write_split(out_dir: str, split: str, picked: list[tuple[int, np.ndarray, int]], pool: _Pool,
                 num_aug: int, rng: np.random.Generator, extra: dict, max_blanks: int | None = None) -> dict:
    """Augment, encode (digits + 1, as the reference) and write one split; returns its report."""
    index = np.array([i for i, _, _ in picked], dtype=np.int64)
    solutions = np.stack([s for _, s, _ in picked])
    puzzles = pool.grids[index]
    if max_blanks is not None:
        puzzles = reveal_givens(puzzles, solutions, max_blanks, rng)
    inputs, labels = _augment(puzzles, solutions, num_aug, rng)
    per_group = 1 + num_aug
    difficulty = np.repeat(np.array([r for _, _, r in picked], np.int32), per_group)
    source = np.repeat(pool.source[index], per_group)
    n = len(inputs)
    arrays = {"inputs": (inputs + 1).astype(np.uint8), "labels": (labels + 1).astype(np.uint8),
              "puzzle_identifiers": np.zeros(n, np.int32),
              "puzzle_indices": np.arange(n + 1, dtype=np.int32),
              "group_indices": np.arange(0, n + 1, per_group, dtype=np.int32)}
    metadata = PuzzleDatasetMetadata(
        seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE, pad_id=0, ignore_label_id=0,
        blank_identifier_id=0, num_puzzle_identifiers=1, total_groups=len(picked),
        mean_puzzle_examples=1, sets=("all",), extra=extra)
    write_split(out_dir, split, metadata, {"all": arrays},
                extra_arrays={"all__difficulty": difficulty, "all__source": source})
    return {"puzzles": len(picked), "examples": n,
            "sources": {pool.names[s]: int((pool.source[index] == s).sum())
                        for s in np.unique(pool.source[index])},
            "difficulty": {"mean": float(difficulty.mean()), "median": float(np.median(difficulty)),
                           "max": int(difficulty.max())}}


def make_pool(collections_: dict[str, Collection], rng: np.random.Generator) -> _Pool:
    names = list(collections_)
    grids = np.concatenate([c.grids for c in collections_.values()])
    source = np.concatenate([np.full(len(c.grids), k, np.int8)
                             for k, c in enumerate(collections_.values())])
    return _Pool(grids, source, names, rng.permutation(len(grids)), np.zeros(len(grids), bool),
                 _ClassRegistry())


def build_sudoku_dataset(out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                         train_size: int = 1000, num_aug: int = 1000, test_size: int | None = None,
                         seed: int = 0, train_pool: Sequence[str] | None = None,
                         test_pool: Sequence[str] | None = None, workers: int | None = None,
                         max_blanks: int | None = None) -> dict:
    """Build `<out_dir>/{train,test}` in the reference's format and return the build report.

    train_size puzzles are drawn at random from the train pool, each with num_aug augmentations
    (a group of 1 + num_aug puzzles); test_size puzzles (None: every remaining one) come from
    the test pool without augmentation. Pools default to DEFAULT_POOL where present (else every
    collection of the source). Each pick must have exactly one solution and belong to an
    equivalence class that no earlier pick (of either split) belongs to, so no test puzzle is a
    transform of a training puzzle. Also writes identifiers.json (as the reference) and
    build_report.json. workers: solver processes (None: all CPUs). max_blanks: reveal solution
    cells of every puzzle (both splits) until at most this many blanks remain (easier sets).
    """
    start = time.perf_counter()
    if train_size < 1 or num_aug < 0 or (test_size is not None and test_size < 0):
        raise SudokuDataError(f"need train_size >= 1, num_aug >= 0, test_size >= 0 or None; got "
                              f"{train_size}, {num_aug}, {test_size}")
    if max_blanks is not None and not 0 <= max_blanks <= 81:
        raise SudokuDataError(f"max_blanks must be in 0..81 or None, got {max_blanks}")
    source = pathlib.Path(source_dir) if source_dir is not None else default_source_dir()
    if train_pool is None or test_pool is None:
        present = [p.stem for p in ([source] if source.is_file() else source.glob("*.txt"))]
        default = [n for n in DEFAULT_POOL if n in present] or sorted(
            n for n in present if not n.startswith("LICENSE"))
        train_pool = list(train_pool) if train_pool is not None else default
        test_pool = list(test_pool) if test_pool is not None else default
    collections_ = load_collections(source, dict.fromkeys([*train_pool, *test_pool]))
    rng = np.random.default_rng(seed)
    pool = make_pool(collections_, rng)
    workers = workers or os.cpu_count() or 1
    in_pool = lambda names: np.isin(pool.source, [pool.names.index(n) for n in names])  # noqa: E731
    train, train_skipped = select_puzzles(pool, "train", in_pool(train_pool), train_size, workers)
    test, test_skipped = select_puzzles(pool, "test", in_pool(test_pool), test_size, workers)
    if not test:
        raise SudokuDataError("the test pool has no usable puzzle left after the training draw")
    extra = {"task": "sudoku", "encoding": "0 pad, 1 blank, 2..10 digits 1..9",
             "difficulty": _DIFFICULTY_DOC, "source": "all__source.npy: int8 per example, index "
             "into source_names", "source_names": pool.names, "seed": seed, "max_blanks": max_blanks}
    os.makedirs(out_dir, exist_ok=True)
    report = {
        "source": str(source), "train_pool": list(train_pool), "test_pool": list(test_pool),
        "seed": seed, "num_aug": num_aug,
        "collections": {n: {"puzzle_lines": c.num_lines, "well_formed": len(c.grids),
                            "rejected": c.rejected} for n, c in collections_.items()},
        "train": _write_split(out_dir, "train", train, pool, num_aug, rng, {**extra, "num_aug": num_aug},
                              max_blanks),
        "test": _write_split(out_dir, "test", test, pool, 0, rng, {**extra, "num_aug": 0}, max_blanks),
    }
    report["train"]["skipped"], report["test"]["skipped"] = dict(train_skipped), dict(test_skipped)
    report["seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out_dir, "identifiers.json"), "w", encoding="utf-8") as f:
        json.dump(["<blank>"], f)
    with open(os.path.join(out_dir, "build_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    log.info("built %s in %.1f s: %d train groups, %d test puzzles", out_dir, report["seconds"],
             len(train), len(test))
    return report


def build_quickstart_dataset(out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                             seed: int = 0, workers: int | None = None, max_blanks: int | None = None,
                             train_size: int = 200, num_aug: int = 8, test_size: int = 200) -> dict:
    """A small dataset for smoke runs (200 train puzzles x 8 augmentations, 200 test) in seconds."""
    return build_sudoku_dataset(out_dir, source_dir=source_dir, train_size=train_size, num_aug=num_aug,
                                test_size=test_size, seed=seed, workers=workers, max_blanks=max_blanks)
