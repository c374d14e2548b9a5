"""ARC scoring by voting over augmentations, as the reference's arc_eval.ipynb.

Every augmented version of a test input is run (hrm_jax.evaluate, all halt_max_steps segments);
each prediction is cropped at the markers, mapped back (inverse dihedral transform, inverse colour
permutation, read from the puzzle name) and votes for its grid. Candidates rank by (number of
votes, mean sigmoid(q_halt)) and pass@k asks whether the answer is among the first k.

Two task scores: `pass@k` is the reference notebook's (arc_eval.ipynb) (a task counts only if all of its
test inputs are right) and `prize_pass@k` is the ARC Prize scorer's (a task scores the fraction of
its test inputs that are right). The baseline `copy` predicts each test input unchanged.

Test inputs are matched to their answers by the content of the un-augmented input, as the notebook
does, so datasets built by the reference's builder score the same way.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from hrm_jax.data.arc import canvas_size, crop_sizes, parse_puzzle_name
from hrm_jax.data.format import PuzzleSplit

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 2, 10, 100, 1000)  # the notebook's
GridKey = tuple  # (shape, bytes): hashable identity of a grid


class ARCEvalError(ValueError):
    """Predictions, identifiers and dataset do not fit together; the message says which and why."""


def grid_key(grid: np.ndarray) -> GridKey:
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    return grid.shape, grid.tobytes()


def key_grid(key: GridKey) -> np.ndarray:
    shape, data = key
    return np.frombuffer(data, np.uint8).reshape(shape)


def load_identifiers(data_dir: str | os.PathLike, num_puzzle_identifiers: int | None = None) -> list[str]:
    """identifiers.json of a built dataset: the puzzle name of each identifier ('<blank>' at 0)."""
    path = pathlib.Path(data_dir) / "identifiers.json"
    if not path.is_file():
        raise ARCEvalError(f"{path}: not found; ARC scoring needs the identifiers.json the builder writes")
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ARCEvalError(f"{path}: not valid JSON ({err}); rebuild the dataset") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ARCEvalError(f"{path}: must be a JSON list of puzzle names")
    if num_puzzle_identifiers is not None and len(names) != num_puzzle_identifiers:
        raise ARCEvalError(f"{path}: names {len(names)} identifiers but the dataset has {num_puzzle_identifiers}; "
                           "identifiers.json belongs to another build")
    return names


def rank_candidates(votes: Sequence[tuple[GridKey, float]]) -> list[tuple[GridKey, int, float]]:
    """(grid, q) votes -> [(grid, count, mean q)] best first: by count, then mean q (notebook order;
    full ties keep first-vote order, as Python's stable sort in the notebook)."""
    stats: dict[GridKey, list[float]] = {}
    for key, q in votes:
        entry = stats.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += q
    ranked = [(key, int(n), total / n) for key, (n, total) in stats.items()]
    return sorted(ranked, key=lambda item: (item[1], item[2]), reverse=True)


def _cropped(tokens: np.ndarray) -> list[np.ndarray]:
    """tokens [N, size**2] -> the N top-left grids (colours 0..9; 0x0 where none)."""
    tokens = np.asarray(tokens)
    sizes = crop_sizes(tokens)
    side = canvas_size(tokens.shape[-1])
    grids = tokens.reshape(-1, side, side)
    return [(grids[i, :r, :c] - 2).astype(np.uint8) for i, (r, c) in enumerate(sizes)]


def collect_votes(predictions: dict[str, np.ndarray], identifiers: Sequence[str], drop_invalid: bool = True
                  ) -> tuple[dict[str, dict[GridKey, GridKey]], dict[str, dict[GridKey, list]]]:
    """Groups per-example predictions by (task, original test input).

    predictions: evaluate(..., return_predictions=True)'s arrays: inputs/labels/predictions
      [N, 900], puzzle_identifiers [N], q_halt_logits [N].
    Returns (answers[task][input] = label, votes[task][input] = [(grid, sigmoid(q_halt))]), grids
    as GridKeys. drop_invalid drops predictions without a grid at the top-left (the notebook keeps
    them as an empty grid, which can fill a pass@k slot but never be right).
    """
    ids = np.asarray(predictions["puzzle_identifiers"])
    if ids.size and (ids.min() < 0 or ids.max() >= len(identifiers)):
        raise ARCEvalError(f"puzzle identifiers reach {int(ids.max())} but identifiers.json names {len(identifiers)}")
    names = [parse_puzzle_name(identifiers[i]) for i in ids]
    inputs, labels = _cropped(predictions["inputs"]), _cropped(predictions["labels"])
    preds = _cropped(predictions["predictions"])
    q = 1.0 / (1.0 + np.exp(-np.asarray(predictions["q_halt_logits"], np.float64)))
    answers: dict[str, dict[GridKey, GridKey]] = {}
    for (task, aug), inp, label in zip(names, inputs, labels):
        if aug.is_identity:
            answers.setdefault(task, {})[grid_key(inp)] = grid_key(label)
    votes: dict[str, dict[GridKey, list]] = {}
    for row, ((task, aug), inp, pred) in enumerate(zip(names, inputs, preds)):
        original = grid_key(aug.invert(inp))
        if original not in answers.get(task, {}):
            raise ARCEvalError(f"example {row} ({identifiers[ids[row]]}): its input mapped back by the name's "
                               "augmentation matches no test input of the un-augmented task; the identifiers or "
                               "the split do not belong to this build")
        slot = votes.setdefault(task, {}).setdefault(original, [])
        if pred.size == 0 and drop_invalid:
            continue
        slot.append((grid_key(aug.invert(pred)), float(q[row])))
    return answers, votes


def score_votes(answers, votes, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """pass@k (all test inputs of a task right), prize_pass@k (fraction right) and the copy baseline.

    Returns {"tasks", "test_inputs", "pass@k", "prize_pass@k" for each k, "copy_pass", "copy_prize_pass",
    "per_task": {task: {"pass@k": bool, "right@k": [bool per test input]}}}.
    """
    per_task, totals = {}, {f"{name}@{k}": 0.0 for k in ks for name in ("pass", "prize_pass")}
    copy_all = copy_frac = 0.0
    for task, tests in answers.items():
        ranked = {inp: [key for key, _, _ in rank_candidates(votes.get(task, {}).get(inp, []))] for inp in tests}
        entry = {}
        for k in ks:
            right = [label in ranked[inp][:k] for inp, label in tests.items()]
            entry[f"right@{k}"] = right
            totals[f"pass@{k}"] += all(right)
            totals[f"prize_pass@{k}"] += sum(right) / len(right)
        copied = [inp == label for inp, label in tests.items()]
        copy_all += all(copied)
        copy_frac += sum(copied) / len(copied)
        per_task[task] = entry
    n = max(len(answers), 1)
    scores = {key: value / n for key, value in totals.items()}
    scores.update({"tasks": len(answers), "test_inputs": sum(len(t) for t in answers.values()),
                   "copy_pass": copy_all / n, "copy_prize_pass": copy_frac / n, "per_task": per_task})
    return scores


def attempts(answers, votes, num_attempts: int = 2) -> dict[str, list[dict[str, list]]]:
    """The ARC Prize submission form: {task: [{"attempt_1": grid, "attempt_2": grid} per test input]},
    test inputs in dataset order; a missing candidate repeats the input (an honest placeholder)."""
    out = {}
    for task, tests in answers.items():
        rows = []
        for inp in tests:
            ranked = [key for key, _, _ in rank_candidates(votes.get(task, {}).get(inp, []))]
            ranked += [inp] * (num_attempts - len(ranked))
            rows.append({f"attempt_{i + 1}": key_grid(ranked[i]).tolist() for i in range(num_attempts)})
        out[task] = rows
    return out


def score_predictions(predictions: dict[str, np.ndarray], identifiers: Sequence[str],
                      ks: Sequence[int] = DEFAULT_KS, drop_invalid: bool = True) -> dict[str, Any]:
    """collect_votes + score_votes; adds "attempts" (the top-2 grids, ARC Prize form)."""
    answers, votes = collect_votes(predictions, identifiers, drop_invalid)
    if not answers:
        raise ARCEvalError("no un-augmented puzzle among the predictions: the test split holds no original "
                           "task to take answers from (was it built with the ARC builder?)")
    scores = score_votes(answers, votes, ks)
    scores["attempts"] = attempts(answers, votes)
    return scores


def evaluate_arc(params, config, split: PuzzleSplit, identifiers: Sequence[str], batch_size: int, *,
                 ks: Sequence[int] = DEFAULT_KS, drop_invalid: bool = True) -> tuple[dict, dict]:
    """Runs every example of the (test) split and scores by voting: (evaluate's metrics, ARC scores).

    Holds all predictions in memory: the full ARC-AGI-1 test split (385,816 examples at num_aug
    1000) takes ~5.6 GB of int32 arrays (inputs, labels, predictions, early predictions).
    """
    from hrm_jax.evaluate import evaluate  # noqa: PLC0415  (keeps scoring importable without jax)

    if len(identifiers) != config.num_puzzle_identifiers:
        raise ARCEvalError(f"identifiers.json names {len(identifiers)} puzzles but the model has "
                           f"{config.num_puzzle_identifiers} identifiers; use the dataset the model was trained on")
    metrics, predictions = evaluate(params, config, split, batch_size, early_halt_stats=False,
                                    return_predictions=True)
    scores = score_predictions(predictions, identifiers, ks, drop_invalid)
    logger.info("ARC: pass@2 %.4f (prize %.4f) over %d tasks", scores.get("pass@2", float("nan")),
                scores.get("prize_pass@2", float("nan")), scores["tasks"])
    return metrics, scores
