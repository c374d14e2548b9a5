"""Model families: the one place that maps a model config's type to the code that runs it.

The loop (train.py), evaluation, checkpoints and the CLIs take any model config; they ask
`family_of(config)` for its functions instead of testing types themselves. A family provides the ACT
interface of hrm_jax/model.py: params from a key, a fresh carry, the carry refresh with a new batch,
the puzzle-embedding rows, one training segment and one evaluation step. Adding a family (e.g. TRM)
is one `Family(...)` entry in FAMILIES.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hrm_jax import model as hrm_model
from hrm_jax.config import ConfigError, HRMConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's name (as checkpoints store it), config class and ACT functions (see model.py)."""

    name: str
    config_class: type
    init_params: Callable[..., Any]  # (config, key) -> params
    initial_carry: Callable[..., Any]  # (config, batch) -> carry, every row halted
    refresh_carry: Callable[..., Any]  # (params, config, carry, batch) -> carry with halted rows replaced
    gather_puzzle_rows: Callable[..., Any]  # (params, config, puzzle_identifiers) -> rows
    act_segment: Callable[..., Any]  # (params, config, carry, rows, key, *, train, axis_name) -> (carry, outputs)
    act_step: Callable[..., Any]  # (params, config, carry, batch, key, *, train) -> (carry, outputs)


HRM = Family(name="hrm", config_class=HRMConfig, init_params=hrm_model.init_params,
             initial_carry=hrm_model.initial_carry, refresh_carry=hrm_model.refresh_carry,
             gather_puzzle_rows=hrm_model.gather_puzzle_rows, act_segment=hrm_model.act_segment,
             act_step=hrm_model.act_step)

FAMILIES: dict[str, Family] = {HRM.name: HRM}


def family_of(model_config: Any) -> Family:
    """The family whose config class `model_config` is an instance of."""
    for family in FAMILIES.values():
        if type(model_config) is family.config_class:
            return family
    raise ConfigError(f"model: no model family takes a {type(model_config).__name__}; "
                      f"known: {', '.join(f.config_class.__name__ for f in FAMILIES.values())}")


def family_named(name: str) -> Family:
    """The family a checkpoint names (checkpoints written before families existed hold HRM)."""
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r} is unknown to this version; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
