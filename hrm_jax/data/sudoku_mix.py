"""Sudoku sets of mixed difficulty: the puzzles people bring, not only the hardest ones.

The paper's Sudoku-Extreme set trains and tests on very hard puzzles. A model meant to be used
must also solve newspaper-style puzzles (22-35 clues) and minimal 17-clue ones. This module builds
such a set in two stages:

1. `select_bases` draws *base puzzles* (each with its unique solution) from the collections and
   assigns them to held-out sets and to training, disjoint up to the symmetry group (the same
   equivalence registry as `hrm_jax.data.sudoku.build_sudoku_dataset`): no base of a held-out set
   is a transform of a training base. The result is a small `.npz` (puzzles, solutions, ratings,
   sources, splits) that is quick to ship to a GPU host, where the expensive part (solving every
   puzzle exactly) need not be redone.
2. `build_mixed_dataset` expands the bases into a dataset in the reference's format. A training
   group is one base; its examples are `variants` versions of it, each with a random number of
   clues revealed from the solution (a superset of a unique puzzle's clues has the same unique
   solution) and a random symmetry transform. Held-out sets are not augmented:

   * ``test_17``: 17-clue bases as they are;
   * ``test_news``: other 17-clue bases with clues revealed to 22-35 (newspaper style);
   * ``test_hard``: forum-hardest bases (Sudoku Explainer rating 11+) as they are;
   * ``test``: the first halves of test_news and test_17, the split training monitors.

Each held-out example carries `all__clues` (its clue count) and `all__difficulty` (the solver's
dead ends before the first solution, of the puzzle as given) beside the usual arrays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time

import numpy as np

from hrm_jax.data.format import PuzzleDatasetMetadata, write_split
from hrm_jax.data.sudoku import SEQ_LEN, VOCAB_SIZE, SudokuDataError, load_collections, make_pool, select_puzzles
from hrm_jax.data.sudoku_solver import SudokuTransform, solve_many

log = logging.getLogger(__name__)

SEVENTEEN, HARDEST, MAGICTOUR = "17_clue", "forum_hardest_1905_11plus", "magictour_top1465"
NEWS_CLUES = (22, 35)  # inclusive range of the newspaper-style held-out set
TRAIN_MAX_CLUES = 36  # training variants reveal up to this many clues
BASE_SHARE = 0.25  # share of training variants that keep the base puzzle's own clues
HELD_OUT = ("test_17", "test_news", "test_hard")
SOURCES = (SEVENTEEN, HARDEST, MAGICTOUR)  # index of `source` in a bases file
PARTS = (*HELD_OUT, "train_17", "train_hard", "train_magictour")  # index of `part`; held-out parts first


@dataclasses.dataclass(frozen=True)
class BaseSizes:
    """How many base puzzles each part gets. None: every remaining usable puzzle."""

    test_17: int = 1000
    test_news: int = 1000
    test_hard: int = 1000
    train_17: int | None = None
    train_hard: int | None = 12000
    train_magictour: int | None = None


def select_bases(source_dir: str | os.PathLike, sizes: BaseSizes = BaseSizes(), *, seed: int = 0,
                 workers: int | None = None) -> dict[str, np.ndarray]:
    """Base puzzles for every part, solved and disjoint up to symmetry.

    Returns {"puzzles": int8[N, 81], "solutions": int8[N, 81], "rating": int32[N], "source":
    int8[N] (index into SOURCES), "part": int8[N] (index into PARTS)}. Held-out parts are drawn
    first, so that training takes what is left. Raises SudokuDataError when a collection is
    missing or too small.
    """
    collections_ = load_collections(source_dir, [SEVENTEEN, HARDEST, MAGICTOUR])
    rng = np.random.default_rng(seed)
    pool = make_pool(collections_, rng)
    workers = workers or os.cpu_count() or 1
    from_source = {name: pool.source == pool.names.index(name) for name in pool.names}
    plan = [("test_17", SEVENTEEN), ("test_news", SEVENTEEN), ("test_hard", HARDEST),
            ("train_17", SEVENTEEN), ("train_hard", HARDEST), ("train_magictour", MAGICTOUR)]
    parts: dict[str, list] = {}
    for part, source in plan:
        start = time.perf_counter()
        picked, skipped = select_puzzles(pool, part, from_source[source], getattr(sizes, part), workers)
        parts[part] = picked
        log.info("%s: %d bases from %s in %.1f s (skipped %s)", part, len(picked), source,
                 time.perf_counter() - start, dict(skipped))
    index = np.array([i for part, _ in plan for i, _, _ in parts[part]], np.int64)
    return {
        "puzzles": pool.grids[index].astype(np.int8),
        "solutions": np.stack([s for part, _ in plan for _, s, _ in parts[part]]).astype(np.int8),
        "rating": np.array([r for part, _ in plan for _, _, r in parts[part]], np.int32),
        "source": np.array([SOURCES.index(pool.names[s]) for s in pool.source[index]], np.int8),
        "part": np.concatenate([np.full(len(parts[p]), PARTS.index(p), np.int8) for p, _ in plan]),
    }


def save_bases(path: str | os.PathLike, bases: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **bases, sources=np.array(SOURCES), parts=np.array(PARTS))


def load_bases(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `save_bases` file; raises SudokuDataError naming what is wrong with it."""
    try:
        with np.load(path) as f:
            bases = {k: f[k] for k in ("puzzles", "solutions", "rating", "source", "part")}
            parts = tuple(str(p) for p in f["parts"])
    except (OSError, KeyError, ValueError) as error:
        raise SudokuDataError(f"{path}: not a base-puzzle file written by save_bases ({error}); "
                              "make one with `python -m experiments.sudoku build-mixed --bases-out FILE`") from None
    if parts != PARTS:
        raise SudokuDataError(f"{path}: parts {parts} differ from {PARTS}; rebuild it with this version")
    n = len(bases["puzzles"])
    if any(len(v) != n for v in bases.values()) or bases["puzzles"].shape[1:] != (81,):
        raise SudokuDataError(f"{path}: arrays of different lengths or grids that are not 81 cells")
    if not np.all((bases["solutions"] >= 1) & (bases["solutions"] <= 9)):
        raise SudokuDataError(f"{path}: a solution has a cell outside 1..9")
    given = bases["puzzles"] > 0
    if np.any(given & (bases["puzzles"] != bases["solutions"])):
        raise SudokuDataError(f"{path}: a puzzle's given differs from its solution")
    return bases


def reveal_to(puzzles: np.ndarray, solutions: np.ndarray, clues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reveal random cells of each puzzle from its solution until it has `clues[i]` givens (never
    fewer than it has). A superset of a unique puzzle's givens keeps the same unique solution."""
    out = np.asarray(puzzles, np.int8).copy()
    for grid, solution, want in zip(out, solutions, clues):
        blanks = np.flatnonzero(grid == 0)
        extra = int(want) - (81 - len(blanks))
        if extra > 0:
            fill = rng.choice(blanks, min(extra, len(blanks)), replace=False)
            grid[fill] = solution[fill]
    return out


def training_clue_counts(own: np.ndarray, variants: int, rng: np.random.Generator) -> np.ndarray:
    """int[G, variants] clue targets: BASE_SHARE of them the base's own count, the rest uniform
    between one more than that and TRAIN_MAX_CLUES."""
    own = np.asarray(own)[:, None]
    upper = np.maximum(own + 1, TRAIN_MAX_CLUES)
    spread = rng.integers(own + 1, upper + 1, size=(len(own), variants))
    return np.where(rng.random((len(own), variants)) < BASE_SHARE, own, spread)


def _encode(grids: np.ndarray) -> np.ndarray:
    return (np.asarray(grids, np.int16) + 1).astype(np.uint8)  # blank 1, digit d -> d + 1


def _write(out_dir: str, split: str, inputs: np.ndarray, labels: np.ndarray, per_group: int,
           extras: dict[str, np.ndarray], extra_meta: dict) -> None:
    n = len(inputs)
    arrays = {"inputs": _encode(inputs), "labels": _encode(labels),
              "puzzle_identifiers": np.zeros(n, np.int32),
              "puzzle_indices": np.arange(n + 1, dtype=np.int32),
              "group_indices": np.arange(0, n + 1, per_group, dtype=np.int32)}
    metadata = PuzzleDatasetMetadata(
        seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE, pad_id=0, ignore_label_id=0, blank_identifier_id=0,
        num_puzzle_identifiers=1, total_groups=n // per_group, mean_puzzle_examples=1, sets=("all",),
        extra=extra_meta)
    write_split(out_dir, split, metadata, {"all": arrays},
                extra_arrays={f"all__{k}": v for k, v in extras.items()})


def _augmented_training(bases: dict[str, np.ndarray], variants: int, rng: np.random.Generator):
    train = np.isin(bases["part"], [PARTS.index(p) for p in PARTS if p.startswith("train")])
    puzzles, solutions = bases["puzzles"][train], bases["solutions"][train]
    clues = training_clue_counts((puzzles > 0).sum(1), variants, rng)
    inputs = np.empty((len(puzzles), variants, 81), np.int8)
    labels = np.empty_like(inputs)
    for g in range(len(puzzles)):
        revealed = reveal_to(np.repeat(puzzles[g][None], variants, 0), np.repeat(solutions[g][None], variants, 0),
                             clues[g], rng)
        transform = SudokuTransform.random(rng, (variants,))
        inputs[g], labels[g] = transform.apply(revealed), transform.apply(solutions[g])
    return inputs.reshape(-1, 81), labels.reshape(-1, 81), np.repeat(bases["source"][train], variants)


def _held_out(bases: dict[str, np.ndarray], part: str, rng: np.random.Generator, workers: int):
    rows = bases["part"] == PARTS.index(part)
    puzzles, solutions = bases["puzzles"][rows], bases["solutions"][rows]
    if part == "test_news":
        puzzles = reveal_to(puzzles, solutions, rng.integers(NEWS_CLUES[0], NEWS_CLUES[1] + 1, len(puzzles)), rng)
        rating = solve_many(puzzles, workers)[3].astype(np.int32)  # the revealed puzzle's own rating
    else:
        rating = bases["rating"][rows]
    return puzzles, solutions, {"clues": (puzzles > 0).sum(1).astype(np.int32), "difficulty": rating,
                                "source": bases["source"][rows]}


def build_mixed_dataset(out_dir: str | os.PathLike, bases: dict[str, np.ndarray], *, variants: int = 32,
                        seed: int = 0, workers: int | None = None) -> dict:
    """Writes `<out_dir>/{train,test,test_17,test_news,test_hard}` and build_report.json; returns the report."""
    if variants < 1:
        raise SudokuDataError(f"variants must be >= 1, got {variants}")
    start = time.perf_counter()
    out_dir = os.fspath(out_dir)
    rng = np.random.default_rng(seed)
    workers = workers or os.cpu_count() or 1
    meta = {"task": "sudoku", "encoding": "0 pad, 1 blank, 2..10 digits 1..9", "sources": list(SOURCES),
            "source": "all__source.npy: int8 per example, index into sources", "seed": seed}
    inputs, labels, source = _augmented_training(bases, variants, rng)
    _write(out_dir, "train", inputs, labels, variants, {"source": source,
                                                        "clues": (inputs > 0).sum(1).astype(np.int32)},
           {**meta, "variants": variants, "train_max_clues": TRAIN_MAX_CLUES, "base_share": BASE_SHARE})
    report = {"seed": seed, "variants": variants, "train": {"groups": len(inputs) // variants, "examples": len(inputs),
                                                           "mean_clues": float((inputs > 0).sum(1).mean())}}
    held = {part: _held_out(bases, part, rng, workers) for part in HELD_OUT}
    for part, (puzzles, solutions, extras) in held.items():
        _write(out_dir, part, puzzles, solutions, 1, extras, {**meta, "part": part})
        report[part] = {"puzzles": len(puzzles), "clues": [int(extras["clues"].min()), int(extras["clues"].max())],
                        "mean_difficulty": float(extras["difficulty"].mean())}
    halves = [tuple(a[: len(a) // 2] for a in (p, s)) + ({k: v[: len(v) // 2] for k, v in e.items()},)
              for p, s, e in (held["test_news"], held["test_17"])]
    _write(out_dir, "test", np.concatenate([h[0] for h in halves]), np.concatenate([h[1] for h in halves]), 1,
           {k: np.concatenate([h[2][k] for h in halves]) for k in halves[0][2]}, {**meta, "part": "test"})
    report["seconds"] = round(time.perf_counter() - start, 1)
    pathlib.Path(out_dir, "build_report.json").write_text(json.dumps(report, indent=1))
    pathlib.Path(out_dir, "identifiers.json").write_text(json.dumps(["<blank>"]))
    return report
