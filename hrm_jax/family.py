"""The one place that picks a model family's functions from the type of its config.

Both families expose the same pure functions (init_params, initial_carry, refresh_carry,
gather_puzzle_rows, act_segment, act_step, halt_signal), so the train step and evaluation call
`functions(config).act_segment(...)` and stay family-agnostic.
"""

from __future__ import annotations

import types

from hrm_jax import model, trm
from hrm_jax.config import HRMConfig
from hrm_jax.trm_config import TRMConfig

ModelConfig = HRMConfig | TRMConfig

_FAMILIES: dict[type, types.ModuleType] = {HRMConfig: model, TRMConfig: trm}
# The name saved in checkpoints ("model_family") for each config class.
FAMILY_NAMES: dict[type, str] = {HRMConfig: "hrm", TRMConfig: "trm"}
CONFIG_CLASSES: dict[str, type] = {name: cls for cls, name in FAMILY_NAMES.items()}


def functions(config: ModelConfig) -> types.ModuleType:
    """hrm_jax.model for an HRMConfig, hrm_jax.trm for a TRMConfig."""
    try:
        return _FAMILIES[type(config)]
    except KeyError:
        raise TypeError(f"no model family for a {type(config).__name__}; pass an HRMConfig or a TRMConfig") from None


def family_name(config: ModelConfig) -> str:
    return FAMILY_NAMES[type(config)]
