"""benchmarks/sleep_curve.py runs one cycle of every arm on a tiny model and writes its JSON and plot."""

import json
import os

import pytest

from benchmarks.sleep_curve import ARMS, main

COLLECTION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                          "sudoku", "17_clue.txt")


@pytest.mark.slow  # ~30 s of CPU: three arms, a tiny model trained from scratch, two compiles
def test_one_cycle_on_a_tiny_model(tmp_path):
    if not os.path.exists(COLLECTION):
        pytest.skip(f"no Sudoku collection at {COLLECTION}")
    out = tmp_path / "curve"
    argv = ["--tiny", "--cycles", "1", "--per-cycle", "16", "--stream-eval", "16", "--steps", "10",
            "--tiny-pretrain-steps", "10", "--tiny-train", "32", "--experiences", "16", "--augmentations", "2",
            "--batch-size", "16", "--stream-blanks", "10", "--lr", "1e-3", "--metric", "accuracy", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "sleep_curve.json").read_text())
    assert set(record["arms"]) == set(ARMS)
    for arm, cycles in record["arms"].items():
        assert [c["cycle"] for c in cycles] == [0, 1]
        assert 0 <= cycles[1]["stream"]["accuracy"] <= 1 and 0 <= cycles[1]["heldout"]["accuracy"] <= 1
        assert ("sleep" in cycles[1]) == (arm != "no_sleep")
    no_sleep = record["arms"]["no_sleep"]
    assert no_sleep[0]["stream"] == no_sleep[1]["stream"]  # the baseline's weights never change
    assert record["arms"]["sleep"][1]["sleep"]["train_examples"] == 3 * record["arms"]["no_augmentation"][1]["sleep"][
        "train_examples"]
    assert (out / "sleep_curve.png").stat().st_size > 10_000
    assert main(argv) == 2  # an out dir that already holds runs is refused
