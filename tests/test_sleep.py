"""Sleep end to end on a tiny HRM on CPU: labels and provenance, symmetric augmentation, the
fine-tune, validation, publishing a new version, and rejecting an injected regression."""

import json
import os

import jax
import numpy as np
import pytest

import hrm_jax as H
from hrm_jax.checkpoint import load_params_for_eval, save_params
from hrm_jax.data.format import load_split
from hrm_jax.data.sudoku import reveal_givens
from hrm_jax.data.sudoku_solver import find_conflict, is_valid_solution, read_collection, solve_many
from hrm_jax.train import init_train_state
from sage import replay, weights
from sage.__main__ import main as sage_main
from sage.experience import CONSOLIDATED, ExperienceStore, StoreConfig
from sage.sleep import SleepConfig, fine_tune, gate, publish, sleep_cycle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTION = os.path.join(REPO, "..", "shared", "data", "sudoku", "17_clue.txt")
CFG = H.tiny(hidden_size=32, num_heads=2, H_layers=1, L_layers=1, H_cycles=1, L_cycles=1, halt_max_steps=2,
             expansion=2.0)
STEPS = 30
SLEEP = SleepConfig(experiences=24, augmentations=4, steps=STEPS, batch_size=16, lr=1e-3, metric="accuracy",
                    tolerance=0.01, eval_batch_size=32)


def easy_sudokus():
    """(puzzles, solutions) digits, easy (at most 6 blanks): 96 puzzles of the 17-clue collection."""
    if not os.path.exists(COLLECTION):
        pytest.skip(f"no Sudoku collection at {COLLECTION}")
    grids = read_collection(COLLECTION).grids[:96]
    counts, solutions, _, _ = solve_many(grids)
    assert np.all(counts == 1)
    return reveal_givens(grids, solutions, 6, np.random.default_rng(0)), solutions


@pytest.fixture(scope="module")
def sudokus():
    return easy_sudokus()


def test_labels_and_provenance(sudokus):
    puzzles, solutions = sudokus
    assert replay.label_sudoku(puzzles[0], solutions[0])[1] == "verified"
    wrong = solutions[1].copy()
    wrong[[0, 1]] = wrong[[1, 0]]
    label, provenance = replay.label_sudoku(puzzles[1], wrong)
    assert provenance == "solver-labelled" and np.array_equal(label, solutions[1])
    # A 17-clue puzzle plus a given that breaks no rule yet but is not its (unique) solution's digit.
    original = read_collection(COLLECTION).grids[0]
    solution = solve_many(original[None])[1][0]
    blank = np.flatnonzero(original == 0)[0]
    for digit in range(1, 10):
        impossible = original.copy()
        impossible[blank] = digit
        if digit != solution[blank] and find_conflict(impossible) is None:
            break
    assert replay.label_sudoku(impossible, None) == (None, "unlabelled")


def test_augmentations_are_symmetries(sudokus):
    puzzles, solutions = sudokus
    inputs, labels = replay.augment("sudoku", puzzles[:5] + 1, solutions[:5] + 1, np.random.default_rng(1), 3)
    assert inputs.shape == (20, 81)
    for x, y in zip(inputs - 1, labels - 1):
        assert is_valid_solution(x, y)  # each variant's label solves its puzzle
    assert len({x.tobytes() for x in inputs}) == 20
    grid = np.arange(16).reshape(1, 16)
    maze_in, maze_out = replay.augment("maze", grid, grid + 100, np.random.default_rng(2), 4)
    assert maze_in.shape == (5, 16) and np.array_equal(maze_out - 100, maze_in)
    assert all(sorted(row) == list(range(16)) for row in maze_in)


def test_gate():
    assert gate({"accuracy": 0.5}, {"accuracy": 0.495}, "accuracy", 0.01)[0]
    accepted, reason = gate({"accuracy": 0.5}, {"accuracy": 0.48}, "accuracy", 0.01)
    assert not accepted and "fell from 0.5000 to 0.4800" in reason
    assert not gate({"accuracy": 0.5}, {"accuracy": float("nan")}, "accuracy", 0.01)[0]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_sleep_cycle_end_to_end(sudokus, tmp_path):
    puzzles, solutions = sudokus
    # A "served" model: a fresh tiny HRM trained a few steps on part of the data (the same step as sleep).
    # Its fresh params go through a checkpoint first: restored arrays differ from fresh ones in how jit
    # caches them, and this way the sleeps below reuse the compiled step.
    save_params(tmp_path / "init", init_train_state(CFG, SLEEP.train_config(), STEPS).params, CFG)
    params, _ = fine_tune(load_params_for_eval(tmp_path / "init")[0], CFG, puzzles[:48] + 1, solutions[:48] + 1,
                          SLEEP, np.random.default_rng(3))
    serving = os.path.join(tmp_path, "serving")
    publish(serving, params, CFG, {"source": "test"}, version=0)
    replay.write_sudoku_split(tmp_path / "data", "test", puzzles[72:], solutions[72:])
    heldout = load_split(tmp_path / "data", "test")

    store = ExperienceStore(tmp_path / "store.db", StoreConfig(recent_capacity=100))
    rng = np.random.default_rng(4)
    for i in range(48, 72):  # what the server saw: half answered right, half wrong
        answer = solutions[i] if i % 2 else rng.integers(1, 10, 81)
        store.add("sudoku", replay.sudoku_payload(puzzles[i], answer), float(rng.random()))

    report = sleep_cycle(serving, store, heldout, SLEEP)
    assert report.accepted, report.reason
    assert report.provenance == {"verified": 12, "solver-labelled": 12}
    assert report.train_examples == 24 * 5
    assert report.before["count"] == report.after["count"] == 24.0
    assert all(np.isfinite(list(report.after.values())))
    current = weights.read_current(serving)
    assert current["version"] == report.published_version == 1 and current["parent"] == 0
    new_params, config = load_params_for_eval(current["path"])
    assert config == CFG
    changed = [not np.array_equal(a, b) for a, b in zip(leaves(params), leaves(new_params))]
    assert sum(changed) >= len(changed) // 2
    stored = store.all()
    assert {e.provenance for e in stored} == {"verified", "solver-labelled"}
    assert all(e.tier == CONSOLIDATED for e in stored)
    for e in stored:
        assert is_valid_solution(e.payload["puzzle"], e.payload["label"])

    # An injected regression, a bad teacher (every label's digits shifted by one), is rejected; version 1 stays.
    poisoned = ExperienceStore(tmp_path / "poisoned.db", StoreConfig(recent_capacity=100))
    for i in range(48, 72):
        payload = {**replay.sudoku_payload(puzzles[i], None), "label": solutions[i] % 9 + 1}
        poisoned.add("sudoku", payload, 0.5, provenance="solver-labelled")
    wrecked = sleep_cycle(serving, poisoned, heldout, SLEEP)
    assert not wrecked.accepted and "fell from" in wrecked.reason
    assert wrecked.after["accuracy"] < wrecked.before["accuracy"] - 0.01
    assert weights.read_current(serving)["version"] == 1 and wrecked.published_version is None


def test_cli_sleep_imports_and_reports(sudokus, tmp_path, capsys):
    puzzles, solutions = sudokus
    run = tmp_path / "run"
    save_params(run, init_train_state(CFG, SLEEP.train_config(), STEPS).params, CFG)
    replay.write_sudoku_split(tmp_path / "data", "test", puzzles[72:], solutions[72:])
    with ExperienceStore(tmp_path / "store.db") as store:
        for i in range(8):
            store.add("sudoku", replay.sudoku_payload(puzzles[i], None), 0.5)
    args = ["sleep", "--weights", str(tmp_path / "w"), "--init-from", str(run), "--store", str(tmp_path / "store.db"),
            "--heldout", str(tmp_path / "data"), "--steps", str(STEPS), "--batch-size", "16", "--lr", "1e-3",
            "--metric", "accuracy", "--experiences", "8", "--augmentations", "2", "--eval-batch-size", "32"]
    assert sage_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["serving_version"] == 0 and report["provenance"] == {"solver-labelled": 8}
    assert sage_main(["sleep", "--weights", str(tmp_path / "none"), "--store", str(tmp_path / "store.db"),
                      "--heldout", str(tmp_path / "data")]) == 2
    assert "no published weights" in capsys.readouterr().err
