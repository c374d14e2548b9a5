"""hrm-jax: the Hierarchical Reasoning Model (HRM ACT-v1) in JAX/Flax.

Public API: the run configuration (`RunConfig` of `HRMConfig`, `OptimConfig`, `LoopConfig`) and its
presets, the model as pure functions (`init_params`, `initial_carry`, `act_step`, `refresh_carry`,
`act_segment`, `inner_forward`) and the loss (`act_loss`). See README.md for a tour.
"""

from hrm_jax.config import ConfigError, HRMConfig, LoopConfig, OptimConfig, RunConfig, TrainConfig
from hrm_jax.losses import IGNORE_LABEL_ID, act_loss, reduce_metrics, stablemax_cross_entropy
from hrm_jax.model import (
                           ACTCarry,
                           act_segment,
                           act_step,
                           count_params,
                           gather_puzzle_rows,
                           init_params,
                           initial_carry,
                           inner_forward,
                           refresh_carry,
)
from hrm_jax.presets import MODEL_PRESETS, PRESETS, TRAIN_PRESETS, arc, maze_hard, preset, sudoku_extreme, tiny

__version__ = "0.1.0"

__all__ = [
    "ACTCarry", "ConfigError", "HRMConfig", "IGNORE_LABEL_ID", "LoopConfig", "MODEL_PRESETS", "OptimConfig",
    "PRESETS", "RunConfig", "TRAIN_PRESETS", "TrainConfig", "act_loss", "act_segment", "act_step", "arc",
    "count_params", "gather_puzzle_rows", "init_params", "initial_carry", "inner_forward", "maze_hard",
    "preset", "reduce_metrics", "refresh_carry", "stablemax_cross_entropy", "sudoku_extreme", "tiny",
]
