"""Losses and metrics of the reference's ACTLossHead (models/losses.py).

The reference evaluates stablemax in float64. Turning on x64 globally would slow everything down, so
the log-probabilities are computed in float32 in a form that keeps float32's relative precision:
log s(x) as log1p(x) or -log1p(-x), and the normaliser as a log of a sum of positive terms.
tests/test_losses.py measures the gap to a float64 NumPy transcription.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_LABEL_ID = -100


def log_stablemax(logits: jax.Array) -> jax.Array:
    """log(s(x) / sum s(x)) over the last axis, s(x) = x + 1 for x >= 0, 1 / (1 - x) otherwise."""
    x = logits.astype(jnp.float32)
    # Each branch sees only its own half of the line: `where` differentiates both branches, and
    # 1 / (1 - x) at x = 1 (common with bf16 logits) would turn a zero cotangent into NaN.
    # (Selected with `where`, not min/max, whose gradient splits 50/50 at exactly 0.)
    is_negative = x < 0
    negative, positive = jnp.where(is_negative, x, 0.0), jnp.where(is_negative, 0.0, x)
    s = jnp.where(is_negative, 1.0 / (1.0 - negative), positive + 1.0)
    log_s = jnp.where(is_negative, -jnp.log1p(-negative), jnp.log1p(positive))
    return log_s - jnp.log(jnp.sum(s, axis=-1, keepdims=True))


def stablemax_cross_entropy(logits: jax.Array, labels: jax.Array,
                            ignore_index: int = IGNORE_LABEL_ID) -> jax.Array:
    """Per-token loss f32[...]; 0 where labels == ignore_index."""
    valid = labels != ignore_index
    logprobs = log_stablemax(logits)
    picked = jnp.take_along_axis(logprobs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.where(valid, picked, 0.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          ignore_index: int = IGNORE_LABEL_ID) -> jax.Array:
    """Per-token softmax cross-entropy in float32 (the reference's alternative loss_type)."""
    valid = labels != ignore_index
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.where(valid, picked, 0.0)


LOSS_FUNCTIONS = {"stablemax_cross_entropy": stablemax_cross_entropy,
                  "softmax_cross_entropy": softmax_cross_entropy}


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise, numerically stable: max(x, 0) - x*z + log(1 + exp(-|x|))."""
    x = logits.astype(jnp.float32)
    z = targets.astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))


def act_loss(outputs: dict[str, jax.Array], carry, loss_type: str = "stablemax_cross_entropy"
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss summed over the batch, and metrics summed over halted rows with labels.

    `carry` is the carry act_step returned (its current_data holds the labels scored). Returns
    `lm_loss + 0.5 * (q_halt_loss + q_continue_loss)`; the trainer divides it by the global batch
    size, as the reference's backward does. Metric sums: count, accuracy (per-row token accuracy),
    exact_accuracy, q_halt_accuracy, steps; and each loss. Divide the losses by the batch size and
    the rest by count to get means (see `reduce_metrics`).
    """
    labels = carry.current_data["labels"]
    logits = outputs["logits"]
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    divisor = jnp.maximum(counts, 1)[:, None].astype(jnp.float32)

    is_correct = mask & (jnp.argmax(logits, axis=-1) == labels)
    seq_correct = is_correct.sum(-1) == counts
    valid = carry.halted & (counts > 0)

    lm_loss = jnp.sum(LOSS_FUNCTIONS[loss_type](logits, labels) / divisor)
    q_halt_loss = jnp.sum(binary_cross_entropy_with_logits(outputs["q_halt_logits"], seq_correct))
    metrics = {
        "count": valid.sum(),
        "accuracy": jnp.where(valid, (is_correct / divisor).sum(-1), 0.0).sum(),
        "exact_accuracy": (valid & seq_correct).sum(),
        "q_halt_accuracy": (valid & ((outputs["q_halt_logits"] >= 0) == seq_correct)).sum(),
        "steps": jnp.where(valid, carry.steps, 0).sum(),
        "lm_loss": lm_loss,
        "q_halt_loss": q_halt_loss,
    }
    total = lm_loss + 0.5 * q_halt_loss
    if "target_q_continue" in outputs:
        q_continue_loss = jnp.sum(binary_cross_entropy_with_logits(
            outputs["q_continue_logits"], outputs["target_q_continue"]))
        metrics["q_continue_loss"] = q_continue_loss
        total = total + 0.5 * q_continue_loss
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return total, metrics


def reduce_metrics(metric_sums: dict[str, jax.Array], batch_size: int) -> dict[str, jax.Array]:
    """Means as the reference logs them: losses per batch row, the rest per counted (halted) row.

    Traceable (the train step calls it under jit) and usable on host arrays; f32 results.
    """
    count = jnp.maximum(metric_sums["count"], 1).astype(jnp.float32)
    out = {k: jnp.asarray(v).astype(jnp.float32) / (batch_size if k.endswith("loss") else count)
           for k, v in metric_sums.items() if k != "count"}
    out["count"] = jnp.asarray(metric_sums["count"]).astype(jnp.float32)
    return out
