"""The mixed-difficulty Sudoku builder (hrm_jax/data/sudoku_mix.py) on the real collections: disjoint up to
symmetry, clue counts as promised, solutions right, bad base files refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hrm_jax.data import sudoku_mix
from hrm_jax.data.format import load_split
from hrm_jax.data.sudoku import SudokuDataError, equivalence_classes
from hrm_jax.data.sudoku_solver import is_valid_solution

SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sudoku")
needs_data = pytest.mark.skipif(not os.path.isdir(SOURCE), reason="needs the puzzle collections in ../shared/data")
SIZES = sudoku_mix.BaseSizes(test_17=12, test_news=12, test_hard=3, train_17=40, train_hard=4, train_magictour=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    bases = sudoku_mix.select_bases(SOURCE, SIZES, seed=3, workers=1)
    out = tmp_path_factory.mktemp("mixed")
    report = sudoku_mix.build_mixed_dataset(out, bases, variants=4, seed=3, workers=1)
    return bases, out, report


@needs_data
def test_bases_are_solved_and_held_out_classes_are_disjoint_from_training(built):
    bases, _, _ = built
    counts = {part: int((bases["part"] == i).sum()) for i, part in enumerate(sudoku_mix.PARTS)}
    assert counts == {"test_17": 12, "test_news": 12, "test_hard": 3, "train_17": 40, "train_hard": 4,
                      "train_magictour": 4}
    for puzzle, solution in zip(bases["puzzles"], bases["solutions"]):
        assert is_valid_solution(puzzle, solution)
    classes = equivalence_classes(bases["puzzles"])
    held = bases["part"] < sudoku_mix.PARTS.index("train_17")
    assert not set(classes[held]) & set(classes[~held])


@needs_data
def test_splits_have_the_promised_clue_counts_and_true_labels(built):
    _, out, report = built
    news = load_split(out, "test_news").sets["all"]
    clues = (np.asarray(news.inputs) > 1).sum(1)
    assert clues.min() >= sudoku_mix.NEWS_CLUES[0] and clues.max() <= sudoku_mix.NEWS_CLUES[1]
    assert ((np.asarray(load_split(out, "test_17").sets["all"].inputs) > 1).sum(1) == 17).all()
    train = load_split(out, "train").sets["all"]
    inputs, labels = np.asarray(train.inputs).astype(int) - 1, np.asarray(train.labels).astype(int) - 1
    assert len(inputs) == 4 * (40 + 4 + 4) and report["train"]["groups"] == 48
    train_clues = (inputs > 0).sum(1)
    assert train_clues.min() >= 17 and train_clues.max() <= max(sudoku_mix.TRAIN_MAX_CLUES, 26)
    for x, y in zip(inputs, labels):
        assert is_valid_solution(x.clip(0).astype(np.int8), y.astype(np.int8))
    monitor = load_split(out, "test").sets["all"]
    assert len(monitor.inputs) == 12  # the first halves of test_news and test_17


def test_a_damaged_bases_file_is_one_clear_error(tmp_path):
    path = tmp_path / "bases.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(SudokuDataError, match="not a base-puzzle file written by save_bases"):
        sudoku_mix.load_bases(path)


def test_bases_whose_givens_contradict_their_solution_are_refused(tmp_path):
    solution = np.array([(3 * (r % 3) + r // 3 + c) % 9 + 1 for r in range(9) for c in range(9)], np.int8)
    puzzle = solution.copy()
    puzzle[40:] = 0
    puzzle[0] = solution[0] % 9 + 1  # a given that is not the solution's digit
    bases = {"puzzles": puzzle[None], "solutions": solution[None], "rating": np.zeros(1, np.int32),
             "source": np.zeros(1, np.int8), "part": np.zeros(1, np.int8)}
    sudoku_mix.save_bases(tmp_path / "bases.npz", bases)
    with pytest.raises(SudokuDataError, match="a puzzle's given differs from its solution"):
        sudoku_mix.load_bases(tmp_path / "bases.npz")


def test_reveal_keeps_given_cells_and_reaches_the_count():
    rng = np.random.default_rng(0)
    solution = np.array([(3 * (r % 3) + r // 3 + c) % 9 + 1 for r in range(9) for c in range(9)], np.int8)
    puzzle = np.where(rng.random(81) < 0.25, solution, 0).astype(np.int8)
    out = sudoku_mix.reveal_to(puzzle[None], solution[None], np.array([40]), rng)[0]
    assert (out > 0).sum() == max(40, (puzzle > 0).sum())
    assert np.array_equal(out[puzzle > 0], puzzle[puzzle > 0]) and np.array_equal(out[out > 0], solution[out > 0])
