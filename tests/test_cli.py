"""Flags generated from the config dataclasses change exactly what was given; every preset builds."""

import pytest

from experiments import common, sudoku
from hrm_jax import presets
from hrm_jax.config import LoopConfig, RunConfig
from tests.test_train import SEQ, VOCAB, make_dataset


def test_flags_override_only_what_is_given(tmp_path):
    data = make_dataset(tmp_path / "data")
    args = sudoku.build_parser().parse_args([
        "train", "--data", str(data), "--preset", "sudoku_extreme_1gpu", "--lr", "3e-4", "--devices", "all",
        "--no-progress", "--resume", "--mlp-impl", "pallas", "--out", str(tmp_path / "run")])
    run = common.run_config_from_args(args, "sudoku", data)
    base = presets.run_sudoku_extreme_1gpu()
    assert run.optim == base.optim.replace(lr=3e-4)  # seed and the rest: the preset's
    assert run.loop == LoopConfig(out_dir=str(tmp_path / "run"), devices=None, progress=False, resume=True)
    assert run.model == base.model.replace(seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=65,
                                           mlp_impl="pallas")


def test_quickstart_alias_and_task_presets():
    names = presets.presets_for("sudoku")
    assert names == ["sudoku_extreme", "sudoku_extreme_1gpu", "sudoku_edge", "sudoku_quickstart", "trm_sudoku_mlp",
                     "trm_sudoku_att"]
    assert presets.presets_for("maze") == ["maze_hard", "maze_quickstart", "trm_maze"]
    for name, entry in presets.PRESETS.items():
        run = presets.preset(name)
        assert isinstance(run, RunConfig) and entry.task in name.replace("arc1", "arc").replace("arc2", "arc")
    with pytest.raises(presets.PresetError, match="known: arc1"):
        presets.preset("nope")
