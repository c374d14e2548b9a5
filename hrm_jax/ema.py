"""Exponential moving average of the dense parameters (TRM's models/ema.py `EMAHelper`).

The reference averages `named_parameters()` only, after every optimizer step:
shadow <- (1 - rate) * param + rate * shadow, starting from the initial parameters. Buffers (the
puzzle-embedding table, H_init, L_init) are not parameters there and are not averaged here: the
average covers params["dense"] exactly. Evaluation, the best checkpoint and exports use the
average in place of the trained dense parameters (`eval_params`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def init_ema(dense: Params) -> Params:
    """The average starts at the parameters themselves (a copy: the train step donates both)."""
    return jax.tree_util.tree_map(jnp.copy, dense)


def update_ema(ema: Params, dense: Params, rate: float) -> Params:
    """(1 - rate) * dense + rate * ema, leaf by leaf, in float32 as the reference."""
    return jax.tree_util.tree_map(lambda e, p: (1.0 - rate) * p + rate * e, ema, dense)


def eval_params(params: Params, ema: Params | None) -> Params:
    """params with the dense part replaced by its average (params unchanged without an average)."""
    return params if ema is None else {**params, "dense": ema}
