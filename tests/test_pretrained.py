"""The shipped Sudoku model: it loads without torch, really solves held-out puzzles, and damaged files are
refused with one clear error."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest

from hrm_jax import pretrained
from hrm_jax.data.sudoku_solver import is_valid_solution
from hrm_jax.evaluate import rollout

# Held-out puzzles of each band the test solves (the first ones of the shipped sample file).
PER_BAND = 8
# The model card's exact accuracy on the full held-out sets, all 16 segments (hrm_jax/weights/sudoku/MODEL_CARD.md).
CARD_RATE = {"news": 0.988, "17clue": 0.745}


def binomial_floor(n: int, p: float, tail: float = 1e-4) -> int:
    """The largest k with P(X < k) <= tail for X ~ Binomial(n, p): a count below it means the rate is off."""
    cdf, k = 0.0, 0
    while k <= n:
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf > tail:
            return k
        k += 1
    return n


def test_the_shipped_model_solves_held_out_puzzles():
    params, config = pretrained.load_pretrained("sudoku")
    sample = pretrained.heldout_sample()
    grids = [(band, g, s) for band in CARD_RATE for g, s in sample[band][:PER_BAND]]
    inputs = np.stack([g for _, g, _ in grids]).astype(np.int32) + 1  # blank 1, digit d -> d + 1
    batch = {"inputs": inputs, "labels": np.stack([s for _, _, s in grids]).astype(np.int32) + 1,
             "puzzle_identifiers": np.zeros(len(grids), np.int32)}
    out = jax.jit(rollout, static_argnames=("config", "loss_type"))(params, config.replace(forward_dtype="float32"),
                                                                    batch)
    answers = np.asarray(out["predictions"]) - 1
    for band in CARD_RATE:
        solved = sum(is_valid_solution(g, a.astype(np.int8)) and np.array_equal(a, s)
                     for (b, g, s), a in zip(grids, answers) if b == band)
        assert solved >= binomial_floor(PER_BAND, CARD_RATE[band]), (band, solved)


def test_a_damaged_weights_file_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(pretrained.model_dir("sudoku"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(pretrained.PretrainedError, match="unreadable weights"):
        pretrained.load_folder(folder)


def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(pretrained.model_dir("sudoku"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(pretrained.PretrainedError, match="does not match"):
        pretrained.load_folder(folder)


def test_unknown_model_names_list_what_is_shipped():
    with pytest.raises(pretrained.PretrainedError, match="shipped: .*sudoku"):
        pretrained.model_dir("chess")


def test_the_held_out_sample_has_its_bands_and_true_solutions():
    sample = pretrained.heldout_sample()
    assert {band: len(items) for band, items in sample.items()} == {"news": 100, "17clue": 100, "hardest": 50}
    for band, items in sample.items():
        for puzzle, solution in items:
            assert is_valid_solution(puzzle, solution), band
            clues = int((puzzle > 0).sum())
            assert (22 <= clues <= 35) if band == "news" else (clues == 17 if band == "17clue" else clues >= 17)


def test_save_and_load_round_trip(tmp_path):
    params, config = pretrained.load_pretrained("sudoku")
    pretrained.save_pretrained(tmp_path, params, config, dtype="float32")
    again, config_again = pretrained.load_folder(tmp_path)
    assert config_again == config
    flat, flat_again = pretrained.flatten_params(params), pretrained.flatten_params(again)
    assert flat.keys() == flat_again.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], flat_again[key])


def test_solve_a_file_with_the_shipped_model_prints_json_and_skips_bad_lines(tmp_path, capsys):
    from experiments import sudoku

    sample = pretrained.heldout_sample()["news"][:2]
    lines = ["# two held-out puzzles and a bad line", sample[0][0], "12345", sample[1][0]]
    path = tmp_path / "puzzles.txt"
    path.write_text("\n".join(line if isinstance(line, str) else "".join(map(str, line)) for line in lines) + "\n")
    assert sudoku.main(["solve", "--model", "pretrained", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "puzzles.txt:3: skipped: a Sudoku has 81 cells, got 5 characters" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in rows] == [2, 4]
    for row, (puzzle, solution) in zip(rows, sample):
        assert row["valid"] and row["solution"] == "".join(map(str, solution)) and 1 <= row["steps"] <= 16
        assert row["puzzle"] == "".join("." if v == 0 else str(v) for v in puzzle)


def test_a_file_without_any_puzzle_is_one_line(tmp_path, capsys):
    from experiments import sudoku

    path = tmp_path / "empty.txt"
    path.write_text("# nothing\nnot a puzzle\n")
    assert sudoku.main(["solve", str(path)]) == 2
    assert "no puzzle to solve (1 bad lines)" in capsys.readouterr().err


def test_export_torch_writes_the_shipped_model_under_the_reference_names(tmp_path):
    import export.__main__ as export_cli
    from export.convert import load_state_dict

    out = tmp_path / "sudoku.safetensors"
    assert export_cli.main(["torch", "--model", "pretrained", "--out", str(out)]) == 0
    state_dict = load_state_dict(out)
    assert "H_init" in "".join(state_dict) and len(state_dict) == 22
