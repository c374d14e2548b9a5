"""hrm-jax: the Hierarchical Reasoning Model (HRM ACT-v1) and the Tiny Recursive Model (TRM) in JAX/Flax.

Public API: the run configuration (`RunConfig` of `HRMConfig`, `OptimConfig`, `LoopConfig`) and its
presets, the model as pure functions (`init_params`, `initial_carry`, `act_step`, `refresh_carry`,
`act_segment`, `inner_forward`) and the loss (`act_loss`). A `TRMConfig` as the run's model selects
the TRM family (hrm_jax/trm.py, the same functions; presets `trm_*`). See README.md for a tour.
"""

import importlib
from typing import Any

# Public names and the submodule defining each. They are imported on first use (PEP 562), so that
# `import hrm_jax.config` (jax-free) does not import jax: the edge runtime reads configs without it.
_EXPORTS = {
    "hrm_jax.config": ("ConfigError", "HRMConfig", "LoopConfig", "OptimConfig", "RunConfig", "TrainConfig"),
    "hrm_jax.losses": ("IGNORE_LABEL_ID", "act_loss", "reduce_metrics", "stablemax_cross_entropy"),
    "hrm_jax.model": ("ACTCarry", "act_segment", "act_step", "count_params", "gather_puzzle_rows", "init_params",
                      "initial_carry", "inner_forward", "refresh_carry"),
    "hrm_jax.presets": ("MODEL_PRESETS", "PRESETS", "TRAIN_PRESETS", "arc", "maze_hard", "preset", "sudoku_extreme",
                        "tiny"),
    "hrm_jax.trm_config": ("TRMConfig",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hrm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


__version__ = "0.1.0"

__all__ = [
    "ACTCarry", "ConfigError", "HRMConfig", "IGNORE_LABEL_ID", "LoopConfig", "MODEL_PRESETS", "OptimConfig",
    "PRESETS", "RunConfig", "TRAIN_PRESETS", "TRMConfig", "TrainConfig", "act_loss", "act_segment", "act_step", "arc",
    "count_params", "gather_puzzle_rows", "init_params", "initial_carry", "inner_forward", "maze_hard",
    "preset", "reduce_metrics", "refresh_carry", "stablemax_cross_entropy", "sudoku_extreme", "tiny",
]
