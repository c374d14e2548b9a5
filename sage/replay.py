"""What a sleep replays: labels for stored experiences, the task's own symmetries as augmentation
("the augmentations are the dreams"), and puzzle splits built from them.

Where labels come from on a device. A Sudoku answer verifies itself: an answer that is a complete
grid obeying every constraint and keeping the givens is a solution, no label needed
(provenance "verified"). A puzzle the model failed is handed to the project's exact solver
(hrm_jax.data.sudoku_solver.solve), which stands in for a slow, reliable "cognition" source
("solver-labelled"). A puzzle with no solution stays "unlabelled" and is not trained on.

Payloads (sage.experience stores named arrays):
    Sudoku:      {"puzzle": int8[81] digits (0 blank), "answer": int8[81] the model's digits, optional
                  "label": int8[81] a known solution}
    other tasks: {"inputs": int[seq_len] tokens, "labels": int[seq_len] tokens (omit if unknown)}
Tokens follow the datasets: Sudoku 0 pad, 1 blank, 2..10 digits (digit + 1, as sapientinc/HRM
dataset/build_sudoku_dataset.py); maze and ARC grids are square, seq_len = side^2.
"""

from __future__ import annotations

import math
import os

import numpy as np

from hrm_jax.data.dihedral import NUM_DIHEDRAL, dihedral_transform
from hrm_jax.data.format import PuzzleDatasetMetadata, PuzzleSet, PuzzleSplit, write_split
from hrm_jax.data.sudoku_solver import SudokuTransform, is_valid_solution, solve
from sage.experience import Experience

TASKS = ("sudoku", "maze", "arc")


class ReplayError(ValueError):
    """An experience payload that does not fit its task."""


def sudoku_payload(puzzle: np.ndarray, answer: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The payload of one served Sudoku (digits, 0 blank); answer: the model's digits, if any."""
    payload = {"puzzle": np.asarray(puzzle, dtype=np.int8).reshape(81)}
    if answer is not None:
        payload["answer"] = np.asarray(answer, dtype=np.int8).reshape(81)
    return payload


def label_sudoku(puzzle: np.ndarray, answer: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    """(solution digits int8[81] or None, provenance) for a puzzle and the model's answer."""
    if answer is not None and is_valid_solution(puzzle, answer):
        return np.asarray(answer, dtype=np.int8).reshape(81), "verified"
    result = solve(puzzle, limit=1)
    if result.solution is None:
        return None, "unlabelled"
    return result.solution, "solver-labelled"


def training_pair(task: str, experience: Experience) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(input tokens, label tokens, provenance) of an experience, labelling a Sudoku on the way;
    None when no label can be had."""
    payload = experience.payload
    if task == "sudoku":
        if "puzzle" not in payload:
            raise ReplayError(f"experience {experience.id}: a Sudoku payload needs 'puzzle' (got {sorted(payload)})")
        puzzle = payload["puzzle"].astype(np.int8).reshape(81)
        if "label" in payload and experience.provenance != "unlabelled":
            label, provenance = payload["label"].astype(np.int8).reshape(81), experience.provenance
        else:
            label, provenance = label_sudoku(puzzle, payload.get("answer"))
        if label is None:
            return None
        return puzzle + 1, label + 1, provenance
    if "inputs" not in payload:
        raise ReplayError(f"experience {experience.id}: a {task} payload needs 'inputs' (got {sorted(payload)})")
    if "labels" not in payload or experience.provenance == "unlabelled":
        return None
    return payload["inputs"].reshape(-1), payload["labels"].reshape(-1), experience.provenance


def augment(task: str, inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator, copies: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Originals [n, seq_len] followed by `copies` random symmetric variants of each (tokens in, tokens
    out): Sudoku's group (digits, transpose, bands/stacks, rows/columns) or the 8 dihedral maps of a
    square grid (maze, ARC); input and label always share the transform."""
    if task not in TASKS:
        raise ReplayError(f"task must be one of {TASKS}, got {task!r}")
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if copies < 1 or len(inputs) == 0:
        return inputs, labels
    if task == "sudoku":
        transform = SudokuTransform.random(rng, (len(inputs), copies))
        # Tokens are digits + 1 (0 is pad, never present in a Sudoku row).
        new_inputs = transform.apply((inputs - 1)[:, None, :]).astype(inputs.dtype) + 1
        new_labels = transform.apply((labels - 1)[:, None, :]).astype(labels.dtype) + 1
    else:
        side = math.isqrt(inputs.shape[-1])
        if side * side != inputs.shape[-1]:
            raise ReplayError(f"{task}: seq_len {inputs.shape[-1]} is not a square grid")
        ids = rng.integers(0, NUM_DIHEDRAL, (len(inputs), copies))
        new_inputs = np.stack([[dihedral_transform(x.reshape(side, side), t).reshape(-1) for t in row]
                               for x, row in zip(inputs, ids)])
        new_labels = np.stack([[dihedral_transform(y.reshape(side, side), t).reshape(-1) for t in row]
                               for y, row in zip(labels, ids)])
    return (np.concatenate([inputs, new_inputs.reshape(-1, inputs.shape[-1])]),
            np.concatenate([labels, new_labels.reshape(-1, labels.shape[-1])]))


def _sudoku_metadata(n: int) -> PuzzleDatasetMetadata:
    return PuzzleDatasetMetadata(seq_len=81, vocab_size=11, pad_id=0, ignore_label_id=0, blank_identifier_id=0,
                                 num_puzzle_identifiers=1, total_groups=n, mean_puzzle_examples=1.0, sets=("all",))


def _sudoku_arrays(puzzles: np.ndarray, solutions: np.ndarray) -> dict[str, np.ndarray]:
    puzzles, solutions = np.asarray(puzzles).reshape(-1, 81), np.asarray(solutions).reshape(-1, 81)
    n = len(puzzles)
    return {"inputs": (puzzles + 1).astype(np.uint8), "labels": (solutions + 1).astype(np.uint8),
            "puzzle_identifiers": np.zeros(n, np.int32), "puzzle_indices": np.arange(n + 1, dtype=np.int32),
            "group_indices": np.arange(n + 1, dtype=np.int32)}


def sudoku_split(puzzles: np.ndarray, solutions: np.ndarray, path: str = "<memory>") -> PuzzleSplit:
    """An in-memory test split of Sudoku puzzles and solutions (digits, 0 blank), as the builder encodes them."""
    arrays = _sudoku_arrays(puzzles, solutions)
    return PuzzleSplit(_sudoku_metadata(len(arrays["inputs"])), {"all": PuzzleSet(name="all", **arrays)}, path)


def write_sudoku_split(root: str | os.PathLike, split: str, puzzles: np.ndarray, solutions: np.ndarray) -> str:
    """Writes the same split to `<root>/<split>` (hrm_jax.data.format); returns its directory."""
    arrays = _sudoku_arrays(puzzles, solutions)
    return write_split(root, split, _sudoku_metadata(len(arrays["inputs"])), {"all": arrays})
