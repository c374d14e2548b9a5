"""hrm-jax: the Hierarchical Reasoning Model (HRM ACT-v1) and the Tiny Recursive Model (TRM) in JAX/Flax.

Public API: configuration (`HRMConfig`, `TrainConfig`, presets), the model as pure functions
(`init_params`, `initial_carry`, `act_step`, `refresh_carry`, `act_segment`, `inner_forward`) and the
loss (`act_loss`). `TRMConfig` selects the TRM family (hrm_jax.trm, the same functions); the
train step and evaluation accept either config. See README.md for a tour.
"""

from hrm_jax.config import (
                            MODEL_PRESETS,
                            TRAIN_PRESETS,
                            ConfigError,
                            HRMConfig,
                            TrainConfig,
                            arc,
                            maze_hard,
                            sudoku_extreme,
                            tiny,
)
from hrm_jax.losses import (
                            IGNORE_LABEL_ID,
                            act_loss,
                            reduce_metrics,
                            stablemax_cross_entropy,
)
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
from hrm_jax.trm_config import TRM_MODEL_PRESETS, TRM_TRAIN_PRESETS, TRMConfig

__version__ = "0.1.0"

__all__ = [
                            "IGNORE_LABEL_ID",
                            "MODEL_PRESETS",
                            "TRAIN_PRESETS",
                            "TRM_MODEL_PRESETS",
                            "TRM_TRAIN_PRESETS",
                            "ACTCarry",
                            "ConfigError",
                            "HRMConfig",
                            "TRMConfig",
                            "TrainConfig",
                            "act_loss",
                            "act_segment",
                            "act_step",
                            "arc",
                            "count_params",
                            "gather_puzzle_rows",
                            "init_params",
                            "initial_carry",
                            "inner_forward",
                            "maze_hard",
                            "reduce_metrics",
                            "refresh_carry",
                            "stablemax_cross_entropy",
                            "sudoku_extreme",
                            "tiny",
]
