"""Stablemax and the ACT loss against float64 NumPy and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from hrm_jax import ACTCarry, act_loss, reduce_metrics
from hrm_jax.losses import binary_cross_entropy_with_logits, log_stablemax, stablemax_cross_entropy
from tests import numpy_reference as ref


def test_log_stablemax_float32_vs_float64_reference():
    # Logits in the range a trained model produces, including large magnitudes and bf16 values.
    x = np.random.default_rng(0).normal(scale=8.0, size=(64, 81, 11))
    x = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    got = np.asarray(log_stablemax(jnp.asarray(x, jnp.float32)), np.float64)
    expected = ref.log_stablemax(x)
    # Measured gap: ~2e-7 relative on 57k values; float32's epsilon is 1.2e-7.
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)


def test_stablemax_values_by_hand_and_ignore_label():
    logits = jnp.array([[[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]])
    labels = jnp.array([[1, -100]])
    # s = [1, 2, 0.5]: -log(2 / 3.5)
    np.testing.assert_allclose(stablemax_cross_entropy(logits, labels), [[-np.log(2 / 3.5), 0.0]], rtol=1e-6)


def test_bce_with_logits_matches_formula():
    x = np.linspace(-30, 30, 41)
    z = np.random.default_rng(1).uniform(size=41)
    expected = np.logaddexp(0.0, x) - x * z  # softplus(x) - x z, in float64
    np.testing.assert_allclose(binary_cross_entropy_with_logits(jnp.asarray(x), jnp.asarray(z)),
                               expected, rtol=1e-5, atol=1e-6)


def _carry(labels, halted, steps):
    labels = jnp.asarray(labels, jnp.int32)
    return ACTCarry(z_H=jnp.zeros((len(labels), 1, 1)), z_L=jnp.zeros((len(labels), 1, 1)),
                    steps=jnp.asarray(steps, jnp.int32), halted=jnp.asarray(halted),
                    current_data={"inputs": labels, "labels": labels,
                                  "puzzle_identifiers": jnp.zeros(len(labels), jnp.int32)})


def test_act_loss_by_hand():
    # Row 0: both tokens right, halted. Row 1: one of two valid right, halted. Row 2: not halted.
    # Row 3: no valid labels (never counted).
    logits = np.full((4, 2, 3), -1.0, np.float32)
    logits[0, 0, 1] = logits[0, 1, 2] = 3.0
    logits[1, 0, 1] = logits[1, 1, 0] = 3.0
    logits[2, :, 0] = 3.0
    labels = [[1, 2], [1, 2], [0, -100], [-100, -100]]
    q_halt = np.array([2.0, 1.0, -1.0, 0.5], np.float32)
    q_cont = np.array([0.0, 0.5, 1.0, -2.0], np.float32)
    target = np.array([0.2, 0.9, 0.5, 0.1], np.float32)
    outputs = {"logits": jnp.asarray(logits), "q_halt_logits": jnp.asarray(q_halt),
               "q_continue_logits": jnp.asarray(q_cont), "target_q_continue": jnp.asarray(target)}
    carry = _carry(labels, [True, True, False, True], [3, 5, 2, 1])
    total, m = act_loss(outputs, carry)

    s_big, s_small = 4.0, 0.5  # s(3) and s(-1)
    right = -np.log(s_big / (s_big + 2 * s_small))
    wrong = -np.log(s_small / (s_big + 2 * s_small))
    lm = (2 * right) / 2 + (right + wrong) / 2 + right / 1 + 0.0
    seq_correct = np.array([1, 0, 1, 1], np.float64)  # row 3: 0 valid of 0 counts as correct
    bce = lambda x, z: np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    q_halt_loss = bce(q_halt, seq_correct).sum()
    q_cont_loss = bce(q_cont, target).sum()
    np.testing.assert_allclose(m["lm_loss"], lm, rtol=1e-6)
    np.testing.assert_allclose(m["q_halt_loss"], q_halt_loss, rtol=1e-6)
    np.testing.assert_allclose(m["q_continue_loss"], q_cont_loss, rtol=1e-6)
    np.testing.assert_allclose(total, lm + 0.5 * (q_halt_loss + q_cont_loss), rtol=1e-6)
    assert int(m["count"]) == 2  # halted rows with at least one label
    np.testing.assert_allclose(m["accuracy"], 1.0 + 0.5)
    assert int(m["exact_accuracy"]) == 1
    assert int(m["q_halt_accuracy"]) == 1  # row 0: q>=0 and correct; row 1: q>=0 but wrong
    assert int(m["steps"]) == 8
    means = reduce_metrics(jax.device_get(m), batch_size=4)
    np.testing.assert_allclose(means["accuracy"], 0.75)
    np.testing.assert_allclose(means["lm_loss"], lm / 4, rtol=1e-6)


def test_act_loss_gradient_is_finite_for_extreme_logits():
    logits = jnp.asarray(np.random.default_rng(0).normal(scale=1e4, size=(2, 3, 5)), jnp.float32)
    carry = _carry([[1, 2, 3], [0, 4, -100]], [True, True], [1, 1])

    def f(lg):
        return act_loss({"logits": lg, "q_halt_logits": jnp.zeros(2), "q_continue_logits": jnp.zeros(2)}, carry)[0]

    assert np.all(np.isfinite(np.asarray(jax.grad(f)(logits))))


def test_stablemax_gradient_is_finite_at_exactly_one_in_bfloat16():
    # Regression: bf16 logits are often exactly 1.0, where the unused branch 1/(1-x) is infinite;
    # a naive `where` turned its zero cotangent into NaN and the first update into NaN parameters.
    logits = jnp.asarray([[[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, -3.0, 0.5]]], jnp.bfloat16)
    labels = jnp.asarray([[0, 3]])
    grad = jax.grad(lambda lg: stablemax_cross_entropy(lg, labels).sum())(logits)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    # And equal to the float64 derivative of the formula, by central differences.
    x = np.asarray(logits, np.float64)
    eps, numeric = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        f = lambda v: -sum(ref.log_stablemax(v)[0, i, int(labels[0, i])] for i in range(2))  # noqa: E731
        numeric[idx] = (f(up) - f(down)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad, np.float32), numeric, rtol=2e-2, atol=2e-3)
