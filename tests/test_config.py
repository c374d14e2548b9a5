"""Config validation names the bad field; presets hold the reference's values."""

import pytest

from hrm_jax import TRAIN_PRESETS, ConfigError, HRMConfig, TrainConfig, arc, maze_hard, sudoku_extreme, tiny


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=100, num_heads=8), "hidden_size"),
    (dict(pos_encodings="sinusoidal"), "pos_encodings"),
    (dict(halt_exploration_prob=1.5), "halt_exploration_prob"),
    (dict(forward_dtype="fp8"), "forward_dtype"),
    (dict(H_cycles=0), "H_cycles"),
    (dict(puzzle_emb_ndim=-1), "puzzle_emb_ndim"),
])
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        tiny(**changes)


def test_bad_train_config_names_the_field():
    with pytest.raises(ConfigError, match="^global_batch_size:"):
        TrainConfig(global_batch_size=0)
    with pytest.raises(ConfigError, match="^lr_min_ratio:"):
        TrainConfig(lr_min_ratio=2.0)


def test_presets_follow_the_reference():
    cfg = sudoku_extreme()
    sizes = (cfg.hidden_size, cfg.num_heads, cfg.H_layers, cfg.L_layers, cfg.H_cycles, cfg.L_cycles)
    assert sizes == (512, 8, 4, 4, 2, 2)
    assert (cfg.halt_max_steps, cfg.halt_exploration_prob, cfg.puzzle_emb_ndim, cfg.puzzle_emb_len) == (16, 0.1, 512, 1)
    assert (cfg.seq_len, cfg.vocab_size, cfg.total_seq_len, cfg.forward_dtype) == (81, 11, 82, "bfloat16")
    assert maze_hard().seq_len == 900 and arc(num_puzzle_identifiers=7).num_puzzle_identifiers == 7
    train = TRAIN_PRESETS["sudoku_extreme"]
    assert (train.global_batch_size, train.lr, train.weight_decay, train.lr_warmup_steps) == (768, 1e-4, 1.0, 2000)
    # total_steps as pretrain.py: 20,000 epochs x 1,000 groups x 1,000 examples / 768.
    assert train.total_steps(total_groups=1000, mean_puzzle_examples=1000) == 26_041_666
    assert train.total_steps(total_groups=1000, mean_puzzle_examples=1.0) == 26_041
    assert TRAIN_PRESETS["sudoku_extreme_1gpu"].global_batch_size == 384


def test_config_is_hashable_for_jit():
    assert hash(tiny()) == hash(tiny()) and tiny() == tiny()
    assert isinstance(tiny().replace(hidden_size=128), HRMConfig)
