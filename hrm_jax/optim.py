"""Optimizers of the reference: AdamATan2 for dense weights, sign-SGD for the puzzle embedding.

- `adam_atan2`: the imoneoi/adam-atan2 package that the reference's pretrain.py imports
  (csrc/adam_atan2.cu), not lucidrains' variant: no epsilon, no atan2 scale constants,
  decoupled weight decay applied before the step.
- `lr_schedule`: pretrain.py's `cosine_schedule_with_warmup_lr_lambda` as `compute_lr` calls it.
- `sparse_signsgd_update`: models/sparse_embedding.py's `_sparse_emb_signsgd_dist` (world size 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from hrm_jax.config import TrainConfig


class OptimConfigError(ValueError):
    """An optimizer or schedule argument is invalid; the message names it and the fix."""


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise OptimConfigError(f"{name}: {message}")


# Schedule ---------------------------------------------------------------------------------
def lr_schedule(base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> optax.Schedule:
    """Linear warm-up then cosine decay to `min_ratio * base_lr` (pretrain.py, num_cycles 0.5).

    The returned schedule takes optax's 0-based update count and returns the reference's lr for
    step `count + 1`: pretrain.py's `train_batch` increments `train_state.step` *before*
    `compute_lr`, so its first update already uses step 1 (lr = base_lr / warmup_steps, not 0).
    With min_ratio 1.0 the lr is constant after warm-up. Like the reference, steps past
    `total_steps` are not clamped (the reference stops training there).

    Args:
      base_lr: peak learning rate (>= 0).
      warmup_steps: linear warm-up length (>= 0; pretrain.py rounds lr_warmup_steps).
      total_steps: total optimizer steps of the run (>= 1).
      min_ratio: final lr as a fraction of base_lr, in [0, 1].
    Returns:
      count: int[] -> f32[] learning rate.
    """
    _check(base_lr >= 0, "base_lr", f"must be >= 0, got {base_lr!r}")
    _check(warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {warmup_steps!r}")
    _check(total_steps >= 1, "total_steps", f"must be >= 1, got {total_steps!r}; "
           "compute it with TrainConfig.total_steps(total_groups, mean_puzzle_examples)")
    _check(0.0 <= min_ratio <= 1.0, "min_ratio", f"must be in [0, 1], got {min_ratio!r}")
    warmup = int(round(warmup_steps))
    decay_len = float(max(1, total_steps - warmup))

    def schedule(count: jax.Array | int) -> jax.Array:
        step = jnp.asarray(count, jnp.float32) + 1.0  # the reference's step (see docstring)
        warm = base_lr * step / float(max(1, warmup))
        # The reference's max(0, (1 - min_ratio) * 0.5 * (1 + cos(pi * 2 * num_cycles * progress)))
        # with num_cycles = 0.5 and progress = (step - warmup) / decay_len, written as
        # sin^2(pi/2 * (1 - progress)): the same value, never negative, and with 1 - progress
        # formed from exact integers it keeps float32 relative accuracy near the end of the decay.
        remaining = (decay_len + warmup - step) / decay_len
        cosine = (1.0 - min_ratio) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining))
        return jnp.where(step < warmup, warm, base_lr * (min_ratio + cosine))

    return schedule


# AdamATan2 --------------------------------------------------------------------------------
class AdamATan2State(NamedTuple):
    """count: int32[] updates taken; mu, nu: first/second moment EMAs, float32 like the params."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def adam_atan2(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.95,
               weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamATan2 as imoneoi/adam-atan2 (csrc/adam_atan2.cu), as an optax transformation.

    For update t = count + 1 (t starts at 1), per element:
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        p <- p (1 - lr wd) - lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t))
    atan2 bounds the step and needs no epsilon. Weight decay hits every parameter passed in
    (the reference decays all of model.parameters()). The returned updates are the difference
    new_p - p, so `optax.apply_updates` gives the reference's parameters. A schedule receives the
    0-based count (see `lr_schedule`).

    Raises:
      OptimConfigError: for betas outside [0, 1) or a negative weight decay; at `update` time
        when weight_decay != 0 and no params are given.
    """
    _check(0.0 <= b1 < 1.0, "b1", f"must be in [0, 1), got {b1!r}")
    _check(0.0 <= b2 < 1.0, "b2", f"must be in [0, 1), got {b2!r}")
    _check(weight_decay >= 0, "weight_decay", f"must be >= 0, got {weight_decay!r}")

    def init_fn(params: optax.Params) -> AdamATan2State:
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p), jnp.float32)  # moments in float32, as the CUDA opmath

        return AdamATan2State(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                              nu=jax.tree.map(zeros, params))

    def update_fn(grads: optax.Updates, state: AdamATan2State,
                  params: optax.Params | None = None) -> tuple[optax.Updates, AdamATan2State]:
        if params is None:
            _check(weight_decay == 0, "params", "adam_atan2 with weight_decay needs the params: "
                   "call optimizer.update(grads, state, params)")
            params = jax.tree.map(jnp.zeros_like, grads)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step_size = lr / (1.0 - jnp.power(jnp.float32(b1), t))
        bias_correction2_sqrt = jnp.sqrt(1.0 - jnp.power(jnp.float32(b2), t))

        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, grads)

        def delta(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
            p32 = p.astype(jnp.float32)
            new_p = p32 * (1.0 - lr * weight_decay) - step_size * jnp.arctan2(m, jnp.sqrt(v) / bias_correction2_sqrt)
            return (new_p - p32).astype(p.dtype)

        updates = jax.tree.map(delta, params, mu, nu)
        return updates, AdamATan2State(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


# Sparse puzzle-embedding sign-SGD ---------------------------------------------------------
@functools.partial(jax.jit, donate_argnames=("table",))
def sparse_signsgd_update(table: jax.Array, ids: jax.Array, row_grads: jax.Array, lr: jax.Array | float,
                          weight_decay: jax.Array | float) -> jax.Array:
    """Sign-SGD with decoupled decay on the batch's unique rows of the puzzle-embedding table.

    As `_sparse_emb_signsgd_dist` (models/sparse_embedding.py, world size 1): gradients of
    duplicate ids are summed, then each unique id's row gets p <- p (1 - lr wd) - lr sign(g).
    A unique id whose summed gradient is 0 still decays (sign(0) = 0); rows not in the batch are
    untouched. Only [batch, ndim] work is done: no dense [num_ids, ndim] gradient exists.

    `table` is donated: do not use the array passed in after the call. Inside another jit this
    inlines (the outer function's donation applies).

    Args:
      table: f32[num_ids, ndim] puzzle embeddings.
      ids: int[batch] puzzle identifiers the rows were gathered with (valid ids < num_ids).
      row_grads: [batch, ndim] gradients w.r.t. the gathered rows `table[ids]`.
      lr, weight_decay: scalars (lr may be traced, e.g. a schedule's value).
    Returns:
      f32[num_ids, ndim], the updated table.
    """
    num_ids = table.shape[0]
    batch = ids.shape[0]
    # Fixed-size unique: padding slots get id num_ids (out of range) and are dropped on write.
    unique_ids, inverse = jnp.unique(ids, size=batch, fill_value=num_ids, return_inverse=True)
    grad = jax.ops.segment_sum(row_grads.astype(table.dtype), inverse.reshape(-1), num_segments=batch)
    rows = table.at[unique_ids].get(mode="fill", fill_value=0)
    lr = jnp.asarray(lr, table.dtype)
    rows = rows * (1.0 - lr * weight_decay) - lr * jnp.sign(grad)
    return table.at[unique_ids].set(rows, mode="drop")


# From a TrainConfig -----------------------------------------------------------------------
def make_dense_optimizer(train_config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamATan2 with the warm-up/cosine schedule of train_config (lr, lr_warmup_steps,
    lr_min_ratio, beta1, beta2, weight_decay), for params["dense"] (pretrain.py create_model)."""
    schedule = lr_schedule(train_config.lr, train_config.lr_warmup_steps, total_steps, train_config.lr_min_ratio)
    return adam_atan2(schedule, b1=train_config.beta1, b2=train_config.beta2,
                      weight_decay=train_config.weight_decay)


def make_puzzle_emb_schedule(train_config: TrainConfig, total_steps: int) -> optax.Schedule:
    """The same schedule with base lr `puzzle_emb_lr`: pretrain.py's `compute_lr` uses one warm-up
    and min_ratio for both optimizers. Call it with the 0-based optax count."""
    return lr_schedule(train_config.puzzle_emb_lr, train_config.lr_warmup_steps, total_steps,
                       train_config.lr_min_ratio)
