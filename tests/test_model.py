"""The model against a float64 NumPy transcription of the reference, plus the 1-step gradient and
ACT semantics (reset, halting in train vs eval, exploration, target Q)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hrm_jax as H
from hrm_jax.model import segment_forward
from tests import numpy_reference as ref
from tests.model_helpers import exploration_halting_steps, random_batch, randomized_params, set_q_bias

STEP = jax.jit(H.act_step, static_argnames=("config", "train"))


def test_sudoku_extreme_parameter_count_and_layout():
    cfg = H.sudoku_extreme()
    params = jax.eval_shape(lambda k: H.init_params(cfg, k), jax.random.key(0))
    assert H.count_params(params["dense"]) == 27_275_266  # the reference's trainable parameters
    assert params["puzzle_emb"].shape == (1, 512)
    assert sorted(params["dense"]) == ["H_level", "L_level", "embed_tokens", "lm_head", "q_head"]
    assert sorted(params["dense"]["H_level"]) == [f"layers_{i}" for i in range(4)]
    assert params["dense"]["H_level"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"].shape == (512, 1536)


def test_init_special_values():
    cfg = H.tiny(puzzle_emb_ndim=70, forward_dtype="bfloat16", num_puzzle_identifiers=5)
    params = H.init_params(cfg, jax.random.key(0))
    np.testing.assert_array_equal(params["dense"]["q_head"]["kernel"], 0)
    np.testing.assert_array_equal(params["dense"]["q_head"]["bias"], -5)
    np.testing.assert_array_equal(params["puzzle_emb"], np.zeros((5, 70)))
    h_init = np.asarray(params["buffers"]["H_init"])
    assert h_init.dtype == np.float32 and 0.8 < h_init.std() < 1.2
    # Stored in f32 but exactly representable in bf16, as the reference's bf16 buffers.
    np.testing.assert_array_equal(h_init, np.asarray(jnp.asarray(h_init, jnp.bfloat16), np.float32))
    assert not np.array_equal(h_init, params["buffers"]["L_init"])


@pytest.mark.parametrize("pos, puzzle_ndim", [("rope", 0), ("rope", 100), ("learned", 0), ("learned", 64)])
def test_segment_matches_numpy_reference(pos, puzzle_ndim):
    cfg = H.tiny(pos_encodings=pos, puzzle_emb_ndim=puzzle_ndim, num_puzzle_identifiers=3,
                 hidden_size=32, num_heads=2, seq_len=10, H_cycles=2, L_cycles=3)
    params = randomized_params(cfg, seed=1)
    batch = random_batch(cfg, 3, seed=2)
    carry = H.refresh_carry(params, cfg, H.initial_carry(cfg, batch), batch)
    rows = H.gather_puzzle_rows(params, cfg, batch["puzzle_identifiers"])
    z_H, z_L, logits, q = jax.jit(segment_forward, static_argnums=1)(params, cfg, carry, rows)
    e_H, e_L, e_logits, e_q = ref.inner_forward(cfg, params, carry.z_H, carry.z_L, batch["inputs"], rows)
    for got, want in [(z_H, e_H), (z_L, e_L), (logits, e_logits), (q, e_q)]:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5)


def _inner(cfg, params, z_H, z_L, x):
    return H.inner_forward(params, cfg, z_H, z_L, x)


def test_one_step_gradient_flows_only_through_last_steps():
    cfg = H.tiny(hidden_size=16, num_heads=2, seq_len=6, H_cycles=3, L_cycles=2, H_layers=1, L_layers=1)
    dense = H.init_params(cfg, jax.random.key(0))["dense"]
    rng = np.random.default_rng(0)
    z_H, z_L, x, probe_H, probe_L = (jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32) for _ in range(5))

    # A random linear probe: (sum z**2 would be ~constant after RMSNorm, with a ~0 gradient).
    def objective(out_H, out_L):
        return jnp.sum(out_H * probe_H) + jnp.sum(jnp.sin(out_L) * probe_L)

    def loss(dense, z_H, z_L, x):
        return objective(*_inner(cfg, dense, z_H, z_L, x))

    g_dense, g_zH, g_zL, g_x = jax.grad(loss, argnums=(0, 1, 2, 3))(dense, z_H, z_L, x)
    # The incoming carry only feeds no-gradient steps.
    assert not np.any(np.asarray(g_zH)) and not np.any(np.asarray(g_zL))

    # Same gradient as: prefix computed without gradient, then the last L and H update by hand.
    from hrm_jax.model import HRMInner, _cos_sin
    module, cs = HRMInner(cfg), _cos_sin(cfg)
    p_H, p_L = z_H, z_L
    for h in range(cfg.H_cycles):
        for low in range(cfg.L_cycles):
            if (h, low) != (cfg.H_cycles - 1, cfg.L_cycles - 1):
                p_L = module.apply({"params": dense}, p_L, p_H + x, cs, method=HRMInner.l_level)
        if h != cfg.H_cycles - 1:
            p_H = module.apply({"params": dense}, p_H, p_L, cs, method=HRMInner.h_level)

    def last_two(dense, x):
        zl = module.apply({"params": dense}, p_L, p_H + x, cs, method=HRMInner.l_level)
        zh = module.apply({"params": dense}, p_H, zl, cs, method=HRMInner.h_level)
        return objective(zh, zl)

    # Tolerance: the loop and the Python prefix differ by float32 rounding (~4e-6 in the states).
    def close(a, b):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.abs(b).max()) + 1e-7)

    e_dense, e_x = jax.grad(last_two, argnums=(0, 1))(dense, x)
    jax.tree_util.tree_map(close, g_dense, e_dense)
    close(g_x, e_x)

    # Full backpropagation through time would give a different gradient: the cut is real.
    def bptt(dense):
        zh, zl = z_H, z_L
        for _ in range(cfg.H_cycles):
            for _ in range(cfg.L_cycles):
                zl = module.apply({"params": dense}, zl, zh + x, cs, method=HRMInner.l_level)
            zh = module.apply({"params": dense}, zh, zl, cs, method=HRMInner.h_level)
        return objective(zh, zl)

    full = jax.grad(bptt)(dense)
    leaf = lambda t: np.asarray(t["L_level"]["layers_0"]["mlp"]["down_proj"]["kernel"])
    assert np.abs(leaf(full) - leaf(g_dense)).max() > 0.05 * np.abs(leaf(g_dense)).max()


def test_recurrence_is_a_loop_not_unrolled():
    cfg = H.tiny(H_cycles=4, L_cycles=4)
    dense = jax.eval_shape(lambda k: H.init_params(cfg, k), jax.random.key(0))["dense"]
    z = jax.ShapeDtypeStruct((1, cfg.total_seq_len, cfg.hidden_size), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda d, a, b, c: _inner(cfg, d, a, b, c))(dense, z, z, z))
    # 16 L-updates and 4 H-updates would need 20 level applications unrolled; with loops the level
    # bodies appear a constant number of times (scan over H cycles, loops over L cycles).
    assert "scan" in jaxpr or "while" in jaxpr
    assert jaxpr.count("dot_general") < 20 * 4 * 2


def _act_cfg(**kw):
    base = dict(hidden_size=16, num_heads=2, seq_len=5, H_cycles=1, L_cycles=1, H_layers=1, L_layers=1,
                halt_max_steps=4, puzzle_emb_ndim=16, num_puzzle_identifiers=4)
    base.update(kw)
    return H.tiny(**base)


def test_reset_takes_new_rows_only_where_halted():
    cfg = _act_cfg()
    params = randomized_params(cfg)
    first, second = random_batch(cfg, 4, seed=1), random_batch(cfg, 4, seed=2)
    carry, _ = STEP(params, cfg, H.initial_carry(cfg, first), first, None, train=False)
    carry = carry.replace(halted=jnp.array([True, False, True, False]))
    refreshed = H.refresh_carry(params, cfg, carry, second)
    for key in ("inputs", "labels", "puzzle_identifiers"):
        np.testing.assert_array_equal(refreshed.current_data[key][0::2], second[key][0::2])
        np.testing.assert_array_equal(refreshed.current_data[key][1::2], first[key][1::2])  # incoming dropped
    np.testing.assert_array_equal(refreshed.steps, [0, 1, 0, 1])
    shape = refreshed.z_H[0].shape
    np.testing.assert_array_equal(refreshed.z_H[0], np.broadcast_to(params["buffers"]["H_init"], shape))
    np.testing.assert_array_equal(refreshed.z_L[2], np.broadcast_to(params["buffers"]["L_init"], shape))
    np.testing.assert_array_equal(refreshed.z_H[1], carry.z_H[1])


def test_eval_always_runs_halt_max_steps():
    cfg = _act_cfg()
    params = set_q_bias(H.init_params(cfg, jax.random.key(0)), 5.0, -5.0)  # Q says "halt now"
    batch = random_batch(cfg, 3)
    carry = H.initial_carry(cfg, batch)
    for step in range(1, cfg.halt_max_steps + 1):
        carry, out = STEP(params, cfg, carry, batch, None, train=False)
        np.testing.assert_array_equal(carry.steps, step)
        assert bool(carry.halted.all()) == (step == cfg.halt_max_steps)
        assert "target_q_continue" not in out


def test_train_halts_on_q_and_at_the_limit():
    cfg = _act_cfg(halt_exploration_prob=0.0)
    batch = random_batch(cfg, 3)
    halting = set_q_bias(H.init_params(cfg, jax.random.key(0)), 5.0, -5.0)
    carry, _ = STEP(halting, cfg, H.initial_carry(cfg, batch), batch, jax.random.key(0), train=True)
    assert bool(carry.halted.all())
    going = set_q_bias(halting, -5.0, 5.0)
    carry = H.initial_carry(cfg, batch)
    for step in range(1, cfg.halt_max_steps + 1):
        carry, _ = STEP(going, cfg, carry, batch, jax.random.key(step), train=True)
        assert bool(carry.halted.all()) == (step == cfg.halt_max_steps)


def test_exploration_minimum_steps_cover_two_to_max():
    cfg = _act_cfg(halt_exploration_prob=1.0, halt_max_steps=5)
    assert exploration_halting_steps(cfg, STEP) == {2, 3, 4, 5}  # U{2..halt_max_steps}; never 1, never beyond


def test_exploration_rate_matches_probability():
    cfg = _act_cfg(halt_exploration_prob=0.3)
    params = set_q_bias(H.init_params(cfg, jax.random.key(0)), 5.0, -5.0)
    batch = random_batch(cfg, 4000)
    carry, _ = STEP(params, cfg, H.initial_carry(cfg, batch), batch, jax.random.key(3), train=True)
    # A row survives step 1 only if it explored (its minimum is >= 2).
    assert abs(float(1 - carry.halted.mean()) - 0.3) < 0.03


def test_target_q_is_bootstrapped_from_a_second_forward():
    cfg = _act_cfg(halt_max_steps=2)
    params = randomized_params(cfg, seed=3)
    batch = random_batch(cfg, 4)
    carry = H.initial_carry(cfg, batch)
    for step in (1, 2):
        refreshed = H.refresh_carry(params, cfg, carry, batch)
        carry, out = STEP(params, cfg, carry, batch, jax.random.key(step), train=True)
        rows = H.gather_puzzle_rows(params, cfg, carry.current_data["puzzle_identifiers"])
        *_, next_q = segment_forward(params, cfg, carry, rows)
        is_last = np.asarray(carry.steps) >= cfg.halt_max_steps
        expected = jax.nn.sigmoid(np.where(is_last, next_q[:, 0], np.maximum(next_q[:, 0], next_q[:, 1])))
        np.testing.assert_allclose(out["target_q_continue"], expected, rtol=1e-5, atol=1e-6)
        assert refreshed.steps.shape == carry.steps.shape
        carry = carry.replace(halted=jnp.zeros_like(carry.halted))
    assert np.all(np.asarray(carry.steps) == 2)


def test_jit_matches_eager_and_is_deterministic():
    cfg = _act_cfg()
    params = randomized_params(cfg)
    batch = random_batch(cfg, 3)
    carry = H.initial_carry(cfg, batch)
    key = jax.random.key(7)
    eager_carry, eager_out = H.act_step(params, cfg, carry, batch, key, train=True)
    jit_carry, jit_out = STEP(params, cfg, carry, batch, key, train=True)
    again_carry, again_out = STEP(params, cfg, carry, batch, key, train=True)
    for a, b in [(eager_out, jit_out), (eager_carry, jit_carry)]:
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (jit_carry, jit_out), (again_carry, again_out))


def test_bfloat16_forward_close_to_float32():
    cfg32 = _act_cfg(forward_dtype="float32")
    cfg16 = cfg32.replace(forward_dtype="bfloat16")
    params = randomized_params(cfg32)
    batch = random_batch(cfg32, 2)
    _, out32 = STEP(params, cfg32, H.initial_carry(cfg32, batch), batch, None, train=False)
    _, out16 = STEP(params, cfg16, H.initial_carry(cfg16, batch), batch, None, train=False)
    assert out16["logits"].dtype == jnp.bfloat16 and out16["q_halt_logits"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16["logits"], np.float32), out32["logits"], atol=0.15)
