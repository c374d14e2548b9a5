"""hrm_jax.optim against NumPy / plain-Python transcriptions of the reference formulas.

References: imoneoi/adam-atan2 csrc/adam_atan2.cu (AdamATan2), sapientinc/HRM pretrain.py
(cosine_schedule_with_warmup_lr_lambda, compute_lr after `step += 1`) and
models/sparse_embedding.py (_sparse_emb_signsgd_dist).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hrm_jax.config import TrainConfig
from hrm_jax.optim import (
    AdamATan2State,
    OptimConfigError,
    adam_atan2,
    lr_schedule,
    make_dense_optimizer,
    make_puzzle_emb_schedule,
    sparse_signsgd_update,
)

# float32 compute against a float64 reference, over up to 10 updates of size ~lr.
RTOL, ATOL = 1e-6, 1e-7


# Reference transcriptions -----------------------------------------------------------------
def reference_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """pretrain.py's cosine_schedule_with_warmup_lr_lambda (num_cycles 0.5), step 1-based."""
    if step < warmup:
        return base_lr * float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))))


def reference_adam_atan2(params, grads_seq, lrs, b1, b2, wd):
    """NumPy float64 AdamATan2: params dict of arrays, grads_seq list of such dicts, lrs per step."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        for k in p:
            g = grads[k].astype(np.float64)
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            denom = np.sqrt(v[k]) / math.sqrt(1 - b2**t)
            p[k] = p[k] - lr / (1 - b1**t) * np.arctan2(m[k], denom)
    return p, m, v


def reference_signsgd(table, ids, row_grads, lr, wd):
    """NumPy loop over the batch's unique ids, as _sparse_emb_signsgd_dist."""
    out = table.copy()
    for i in np.unique(ids):
        g = row_grads[ids == i].sum(axis=0)
        out[i] = table[i] * np.float32(1 - lr * wd) - np.float32(lr) * np.sign(g)
    return out


# Helpers ----------------------------------------------------------------------------------
def random_tree(rng, scale=1.0):
    return {"a": (scale * rng.standard_normal((5, 7))).astype(np.float32),
            "b": {"c": (scale * rng.standard_normal((13,))).astype(np.float32)}}


def flat(tree):
    return {"a": np.asarray(tree["a"]), "c": np.asarray(tree["b"]["c"])}


def run_optax(opt, params, grads_seq):
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_seq:
        params, state = step(params, state, grads)
    return params, state


# Schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("base_lr,warmup,total,min_ratio", [
    (1e-4, 2000, 26041, 1.0),   # Sudoku-Extreme paper run: constant after warm-up
    (7e-5, 2000, 26041, 0.1),   # cosine down to 10 %
    (1e-2, 0, 500, 0.0),        # no warm-up, full cosine
    (3e-4, 50, 40, 0.5),        # total < warm-up: max(1, total - warmup) guard
])
def test_lr_schedule_matches_reference(base_lr, warmup, total, min_ratio):
    schedule = jax.jit(lr_schedule(base_lr, warmup, total, min_ratio))
    counts = np.unique(np.concatenate([np.arange(0, 60), np.linspace(0, total + 10, 400).astype(int),
                                       [warmup - 2, warmup - 1, warmup, total - 1, total]]))
    counts = counts[counts >= 0]
    got = np.asarray(schedule(jnp.asarray(counts, jnp.int32)))
    # optax count c is the reference's step c + 1.
    want = np.array([reference_lr(int(c) + 1, base_lr, warmup, total, min_ratio) for c in counts])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_lr_schedule_first_update_is_step_one():
    schedule = lr_schedule(1e-4, 2000, 26041, 1.0)
    np.testing.assert_allclose(float(schedule(0)), 1e-4 / 2000, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1999)), 1e-4, rtol=1e-6)  # step 2000: end of warm-up
    np.testing.assert_allclose(float(schedule(20000)), 1e-4, rtol=1e-6)


@pytest.mark.parametrize("kwargs,name", [
    (dict(base_lr=-1.0, warmup_steps=0, total_steps=10, min_ratio=1.0), "base_lr"),
    (dict(base_lr=1.0, warmup_steps=-1, total_steps=10, min_ratio=1.0), "warmup_steps"),
    (dict(base_lr=1.0, warmup_steps=0, total_steps=0, min_ratio=1.0), "total_steps"),
    (dict(base_lr=1.0, warmup_steps=0, total_steps=10, min_ratio=1.5), "min_ratio"),
])
def test_lr_schedule_rejects_bad_arguments(kwargs, name):
    with pytest.raises(OptimConfigError, match=name):
        lr_schedule(**kwargs)


# AdamATan2 --------------------------------------------------------------------------------
@pytest.mark.parametrize("lr,b1,b2,wd", [(1e-2, 0.9, 0.95, 0.0), (3e-3, 0.9, 0.95, 1.0), (5e-2, 0.8, 0.99, 0.1)])
def test_adam_atan2_matches_numpy(lr, b1, b2, wd):
    rng = np.random.default_rng(0)
    params = random_tree(rng)
    grads_seq = [random_tree(rng, scale=0.3) for _ in range(8)]
    got, state = run_optax(adam_atan2(lr, b1=b1, b2=b2, weight_decay=wd), params, grads_seq)
    want_p, want_m, want_v = reference_adam_atan2(flat(params), [flat(g) for g in grads_seq], [lr] * 8, b1, b2, wd)
    for k in want_p:
        np.testing.assert_allclose(flat(got)[k], want_p[k], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(flat(state.mu)[k], want_m[k], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(flat(state.nu)[k], want_v[k], rtol=RTOL, atol=1e-9)
    assert isinstance(state, AdamATan2State) and int(state.count) == 8


def test_adam_atan2_schedule_gets_zero_based_count():
    rng = np.random.default_rng(1)
    params = random_tree(rng)
    grads_seq = [random_tree(rng) for _ in range(6)]
    got, _ = run_optax(adam_atan2(lambda count: 1e-2 * (count + 1.0), weight_decay=0.5), params, grads_seq)
    lrs = [1e-2 * t for t in range(1, 7)]
    want, _, _ = reference_adam_atan2(flat(params), [flat(g) for g in grads_seq], lrs, 0.9, 0.95, 0.5)
    for k in want:
        np.testing.assert_allclose(flat(got)[k], want[k], rtol=RTOL, atol=ATOL)


def test_adam_atan2_has_no_epsilon():
    """atan2 is scale-invariant: gradients 1e-12 as large give the same step (an eps would shrink it)."""
    rng = np.random.default_rng(2)
    params = random_tree(rng)
    grads_seq = [random_tree(rng) for _ in range(3)]
    tiny_seq = [jax.tree.map(lambda g: g * np.float32(1e-12), g) for g in grads_seq]
    opt = adam_atan2(1e-2)
    big, _ = run_optax(opt, params, grads_seq)
    tiny, _ = run_optax(opt, params, tiny_seq)
    for k in flat(big):
        np.testing.assert_allclose(flat(tiny)[k], flat(big)[k], rtol=1e-6, atol=1e-7)
    # First step: m = 0.1 g, sqrt(v / (1 - b2)) = |g|, so every weight moves by
    # lr / (1 - b1) * atan(1 - b1), whatever g: the bias correction of m sits outside atan2
    # (lucidrains' variant would give lr * atan2(1.27 g, |g|) = lr * atan(1.27)).
    first, _ = run_optax(opt, params, grads_seq[:1])
    moved = np.abs(flat(first)["a"] - flat(params)["a"])
    np.testing.assert_allclose(moved, 1e-2 / 0.1 * np.arctan(0.1), rtol=1e-5)


def test_adam_atan2_weight_decay_needs_params():
    opt = adam_atan2(1e-3, weight_decay=0.1)
    params = {"w": jnp.ones((3,))}
    with pytest.raises(OptimConfigError, match="params"):
        opt.update(params, opt.init(params))
    with pytest.raises(OptimConfigError, match="b2"):
        adam_atan2(1e-3, b2=1.0)


def test_make_dense_optimizer_uses_train_config():
    tc = TrainConfig(lr=1e-2, lr_warmup_steps=3, lr_min_ratio=0.1, beta1=0.8, beta2=0.9, weight_decay=0.5,
                     puzzle_emb_lr=3e-2)
    total = 10
    rng = np.random.default_rng(3)
    params = random_tree(rng)
    grads_seq = [random_tree(rng) for _ in range(total)]
    got, _ = run_optax(make_dense_optimizer(tc, total), params, grads_seq)
    lrs = [reference_lr(t, 1e-2, 3, total, 0.1) for t in range(1, total + 1)]
    want, _, _ = reference_adam_atan2(flat(params), [flat(g) for g in grads_seq], lrs, 0.8, 0.9, 0.5)
    for k in want:
        np.testing.assert_allclose(flat(got)[k], want[k], rtol=RTOL, atol=ATOL)
    emb = make_puzzle_emb_schedule(tc, total)
    for count in range(total):
        np.testing.assert_allclose(float(emb(count)), reference_lr(count + 1, 3e-2, 3, total, 0.1), rtol=1e-6)


# Sparse sign-SGD --------------------------------------------------------------------------
def sparse_case(seed, num_ids=50, ndim=6, batch=16):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_ids, ndim)).astype(np.float32)
    ids = rng.integers(0, num_ids // 4, size=batch).astype(np.int32)  # small range: duplicates certain
    row_grads = rng.standard_normal((batch, ndim)).astype(np.float32)
    return table, ids, row_grads


@pytest.mark.parametrize("seed,lr,wd", [(0, 1e-2, 0.1), (1, 1e-4, 1.0), (2, 0.3, 0.0)])
def test_sparse_signsgd_matches_numpy_loop(seed, lr, wd):
    table, ids, row_grads = sparse_case(seed)
    assert len(np.unique(ids)) < len(ids)
    got = np.asarray(sparse_signsgd_update(jnp.array(table), ids, row_grads, lr, wd))
    want = reference_signsgd(table, ids, row_grads, lr, wd)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    untouched = np.setdiff1d(np.arange(table.shape[0]), ids)
    np.testing.assert_array_equal(got[untouched], table[untouched])  # bit-identical, no decay


def test_sparse_signsgd_zero_gradient_rows_still_decay():
    table, ids, row_grads = sparse_case(3, batch=8)
    ids[:] = [7, 7, 9, 2, 2, 2, 11, 11]
    row_grads[1] = -row_grads[0]   # id 7: duplicates cancel exactly -> summed gradient 0
    row_grads[2] = 0.0             # id 9: zero gradient
    row_grads[6, :3] = 0.0         # id 11: some zero components, the rest summed
    row_grads[7, :3] = 0.0
    lr, wd = 0.05, 0.5
    got = np.asarray(sparse_signsgd_update(jnp.array(table), ids, row_grads, lr, wd))
    np.testing.assert_allclose(got[7], table[7] * np.float32(1 - lr * wd), rtol=1e-6)
    np.testing.assert_allclose(got[9], table[9] * np.float32(1 - lr * wd), rtol=1e-6)
    np.testing.assert_allclose(got, reference_signsgd(table, ids, row_grads, lr, wd), rtol=1e-6, atol=1e-7)


def test_sparse_signsgd_inside_jit_with_traced_lr():
    table, ids, row_grads = sparse_case(4)
    schedule = lr_schedule(1e-2, 5, 100, 0.2)

    @jax.jit
    def outer(table, ids, row_grads, count):
        return sparse_signsgd_update(table, ids, row_grads, schedule(count), 0.1)

    got = np.asarray(outer(jnp.array(table), ids, row_grads, jnp.int32(2)))
    lr = reference_lr(3, 1e-2, 5, 100, 0.2)
    np.testing.assert_allclose(got, reference_signsgd(table, ids, row_grads, lr, 0.1), rtol=1e-6, atol=1e-7)


def test_sparse_signsgd_is_sparse_and_donates_table():
    """No op other than the final scatter produces a [num_ids, ndim] array; the table is donated."""
    table, ids, row_grads = sparse_case(5, num_ids=997, ndim=5, batch=16)
    args = (jnp.array(table), ids, row_grads, 1e-2, 0.1)
    jaxpr = jax.make_jaxpr(sparse_signsgd_update)(*args).jaxpr.eqns[0].params["jaxpr"].jaxpr
    table_sized = [eqn.primitive.name for eqn in jaxpr.eqns
                   if any(getattr(v.aval, "shape", None) == table.shape for v in eqn.outvars)]
    assert table_sized == ["scatter"], table_sized
    lowered = sparse_signsgd_update.lower(*args).as_text()
    assert "tf.aliasing_output" in lowered or "jax.buffer_donor" in lowered
