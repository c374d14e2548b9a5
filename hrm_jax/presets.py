"""The named configurations: the paper's experiments and the CPU quick starts.

Two kinds of function live here. Architectures (`sudoku_extreme()`, `tiny()`, ...) return a model
config. Run presets (`run_sudoku_extreme()`, ...) return a whole RunConfig and are what the CLIs'
`--preset NAME` picks through `PRESETS`. A run preset's task sizes (seq_len, vocab_size,
num_puzzle_identifiers) are placeholders until `sized_for_data` sets them from the dataset.

Adding a preset is one function returning a RunConfig and one entry in PRESETS.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from hrm_jax.config import HRMConfig, LoopConfig, OptimConfig, RunConfig
from hrm_jax.data.format import load_metadata


# Architectures --------------------------------------------------------------------------------
def hrm_v1(**task: Any) -> HRMConfig:
    """The architecture of the reference's config/arch/hrm_v1.yaml: 512 hidden, 8 heads, 4+4 layers,
    2x2 cycles, 16 ACT steps, exploration 0.1, a puzzle embedding as wide as the hidden state."""
    arch = dict(H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, expansion=4.0,
                num_heads=8, pos_encodings="rope", halt_max_steps=16, halt_exploration_prob=0.1,
                puzzle_emb_ndim=512)
    arch.update(task)
    return HRMConfig(**arch)


def sudoku_extreme(**overrides: Any) -> HRMConfig:
    """Sudoku-Extreme: 81 cells, vocab 11 (pad, blank, digits 1-9), one puzzle identifier."""
    return hrm_v1(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, **overrides)


def maze_hard(**overrides: Any) -> HRMConfig:
    """Maze-Hard 30x30: 900 cells, vocab 6 (pad + '# SGo'), one puzzle identifier."""
    return hrm_v1(seq_len=900, vocab_size=6, num_puzzle_identifiers=1, **overrides)


def arc(num_puzzle_identifiers: int = 1, **overrides: Any) -> HRMConfig:
    """ARC: 30x30 grids (900 tokens), vocab 12 (pad, eos, colours 0-9).

    num_puzzle_identifiers comes from the built dataset (one per task x augmentation).
    """
    return hrm_v1(seq_len=900, vocab_size=12, num_puzzle_identifiers=num_puzzle_identifiers, **overrides)


def tiny(seq_len: int = 81, vocab_size: int = 11, num_puzzle_identifiers: int = 1, **overrides: Any) -> HRMConfig:
    """A CPU-sized config for tests (float32 compute)."""
    arch = dict(seq_len=seq_len, vocab_size=vocab_size, num_puzzle_identifiers=num_puzzle_identifiers,
                H_cycles=2, L_cycles=2, H_layers=2, L_layers=2, hidden_size=64, expansion=4.0,
                num_heads=4, pos_encodings="rope", halt_max_steps=4, halt_exploration_prob=0.1,
                puzzle_emb_ndim=0, forward_dtype="float32")
    arch.update(overrides)
    return HRMConfig(**arch)


def sudoku_edge(**overrides: Any) -> HRMConfig:
    """The shipped Sudoku model (hrm_jax/weights/sudoku): HRM ACT-v1 at 256 wide with 2+2 layers (3.4M
    parameters), 16 ACT steps, no puzzle embedding (Sudoku has one identifier); small enough to solve a
    puzzle in a fraction of a second on two CPU cores with early halting."""
    arch = dict(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, H_cycles=2, L_cycles=2, H_layers=2,
                L_layers=2, hidden_size=256, expansion=4.0, num_heads=4, pos_encodings="rope", halt_max_steps=16,
                halt_exploration_prob=0.1, puzzle_emb_ndim=0)
    arch.update(overrides)
    return HRMConfig(**arch)


def cpu_quickstart_model() -> HRMConfig:
    """The Sudoku and Maze quick-start architecture: small enough for 2 CPU cores, large enough to
    beat the baselines within minutes (128 wide, 2+2 layers, 2x2 cycles, 4 ACT steps)."""
    return tiny(hidden_size=128, num_heads=4, H_layers=2, L_layers=2, H_cycles=2, L_cycles=2,
                halt_max_steps=4, forward_dtype="float32")


# The quick start puts ARC tasks whose grids fit 10x10 on a 10x10 canvas (100 tokens): at 900 tokens a
# CPU step of even a tiny model takes many seconds (attention is quadratic in the length).
ARC_QUICKSTART_GRID = 10


def arc_quickstart_model() -> HRMConfig:
    """CPU-sized; unlike Sudoku and mazes, ARC needs the puzzle embedding (it names the task and augmentation)."""
    return tiny(seq_len=ARC_QUICKSTART_GRID ** 2, vocab_size=12, hidden_size=128, num_heads=4, H_layers=1,
                L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=4, puzzle_emb_ndim=128, forward_dtype="float32")


# Optimizer settings ---------------------------------------------------------------------------
# As the reference README runs them: 8 GPUs, global batch 768, lr 1e-4, weight decay 1.0 for both optimizers.
PAPER_PUZZLES_OPTIM = OptimConfig(epochs=20000, eval_interval=2000, lr=1e-4, puzzle_emb_lr=1e-4,
                                  weight_decay=1.0, puzzle_emb_weight_decay=1.0)
# cfg_pretrain.yaml defaults (the ARC runs): 100k epochs, weight decay 0.1, puzzle_emb_lr 1e-2.
PAPER_ARC_OPTIM = OptimConfig(epochs=100000, eval_interval=10000, lr=1e-4, puzzle_emb_lr=1e-2,
                              weight_decay=0.1, puzzle_emb_weight_decay=0.1)
# The shipped model's recipe: tens of thousands of distinct puzzles (hrm_jax.data.sudoku_mix) instead of 1,000,
# so weight decay 0.1 rather than 1.0, and a higher constant learning rate for the small model.
SUDOKU_EDGE_OPTIM = OptimConfig(global_batch_size=768, epochs=2000, eval_interval=None, lr=2e-4, lr_warmup_steps=1000,
                                weight_decay=0.1, puzzle_emb_lr=1e-4, puzzle_emb_weight_decay=0.1)
CPU_QUICKSTART_OPTIM = OptimConfig(global_batch_size=64, epochs=100000, eval_interval=None, lr=1e-3,
                                   lr_warmup_steps=50, weight_decay=0.1, puzzle_emb_lr=1e-2,
                                   puzzle_emb_weight_decay=0.1)


# Run presets ----------------------------------------------------------------------------------
def run_sudoku_extreme() -> RunConfig:
    """Sudoku-Extreme as the paper trains it (8 GPUs, global batch 768)."""
    return RunConfig(model=sudoku_extreme(), optim=PAPER_PUZZLES_OPTIM)


def run_sudoku_extreme_1gpu() -> RunConfig:
    """The reference README's single-GPU Sudoku demo: global batch 384, lr 7e-5."""
    return RunConfig(model=sudoku_extreme(), optim=PAPER_PUZZLES_OPTIM.replace(
        global_batch_size=384, lr=7e-5, puzzle_emb_lr=7e-5))


def run_sudoku_edge() -> RunConfig:
    """The shipped Sudoku model's run: mixed-difficulty data (build-mixed), one GPU (experiments/recipes)."""
    return RunConfig(model=sudoku_edge(), optim=SUDOKU_EDGE_OPTIM)


def run_sudoku_quickstart() -> RunConfig:
    """A few minutes on 2 CPU cores (`python -m experiments.sudoku`)."""
    return RunConfig(model=cpu_quickstart_model(), optim=CPU_QUICKSTART_OPTIM)


def run_maze_hard() -> RunConfig:
    """Maze-Hard 30x30 as the paper trains it."""
    return RunConfig(model=maze_hard(), optim=PAPER_PUZZLES_OPTIM)


def run_maze_quickstart() -> RunConfig:
    """Small mazes on 2 CPU cores (`python -m experiments.maze`)."""
    return RunConfig(model=cpu_quickstart_model(), optim=CPU_QUICKSTART_OPTIM)


def run_arc() -> RunConfig:
    """ARC-AGI-1 or -2 with the paper's model and the reference's ARC training settings."""
    return RunConfig(model=arc(), optim=PAPER_ARC_OPTIM)


def run_arc_quickstart() -> RunConfig:
    """A handful of small ARC tasks on 2 CPU cores (`python -m experiments.arc`)."""
    return RunConfig(model=arc_quickstart_model(), optim=CPU_QUICKSTART_OPTIM.replace(
        global_batch_size=32, lr_warmup_steps=20))


class Preset(NamedTuple):
    task: str  # the CLI that offers it: python -m experiments.<task>
    make: Callable[[], RunConfig]


# name -> preset; each task CLI offers its task's names (and `quickstart` for `<task>_quickstart`).
PRESETS: dict[str, Preset] = {
    "sudoku_extreme": Preset("sudoku", run_sudoku_extreme),
    "sudoku_extreme_1gpu": Preset("sudoku", run_sudoku_extreme_1gpu),
    "sudoku_edge": Preset("sudoku", run_sudoku_edge),
    "sudoku_quickstart": Preset("sudoku", run_sudoku_quickstart),
    "maze_hard": Preset("maze", run_maze_hard),
    "maze_quickstart": Preset("maze", run_maze_quickstart),
    "arc1": Preset("arc", run_arc),
    "arc2": Preset("arc", run_arc),
    "arc_quickstart": Preset("arc", run_arc_quickstart),
}

# The paper's architectures by name (export's from-torch and the benchmarks pick one).
MODEL_PRESETS: dict[str, Callable[..., HRMConfig]] = {"sudoku_extreme": sudoku_extreme, "maze_hard": maze_hard,
                                                      "arc": arc, "sudoku_edge": sudoku_edge}
# The paper's optimizer settings by name (the benchmarks pick one).
TRAIN_PRESETS: dict[str, OptimConfig] = {
    "sudoku_extreme": PAPER_PUZZLES_OPTIM,
    "sudoku_extreme_1gpu": run_sudoku_extreme_1gpu().optim,
    "maze_hard": PAPER_PUZZLES_OPTIM,
    "arc": PAPER_ARC_OPTIM,
}


class PresetError(ValueError):
    """An unknown preset name; the message lists the known ones."""


def preset(name: str, loop: LoopConfig | None = None) -> RunConfig:
    """The RunConfig of PRESETS[name], with `loop` if given."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    run = PRESETS[name].make()
    return run if loop is None else run.replace(loop=loop)


def presets_for(task: str) -> list[str]:
    """Names of the presets a task's CLI offers, in registry order."""
    return [name for name, entry in PRESETS.items() if entry.task == task]


def sized_for_data(run: RunConfig, data_dir: str | os.PathLike, split: str = "train") -> RunConfig:
    """`run` with the task sizes of its model (seq_len, vocab_size, num_puzzle_identifiers) read
    from the dataset's metadata, so that a preset's architecture fits the data it trains on."""
    meta = load_metadata(data_dir, split)
    model = run.model.replace(seq_len=meta.seq_len, vocab_size=meta.vocab_size,
                              num_puzzle_identifiers=meta.num_puzzle_identifiers)
    return run.replace(model=model)
