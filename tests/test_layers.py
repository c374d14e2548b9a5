"""Layers against NumPy float64 transcriptions of the reference formulas, on random inputs."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrm_jax import tiny
from hrm_jax.layers import (
    Attention,
    Block,
    CastedEmbedding,
    CastedLinear,
    SwiGLU,
    apply_rotary,
    rms_norm,
    rotary_cos_sin,
    split_projection,
    trunc_normal_init,
)
from tests import numpy_reference as ref

RTOL = 2e-5  # float32 compute vs float64 reference


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_rms_norm_matches_formula_and_keeps_dtype():
    x = _rand(0, 3, 5, 64) * 3 + 1
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), 1e-5), ref.rms_norm(x.astype(np.float64), 1e-5),
                               rtol=RTOL, atol=1e-6)
    assert rms_norm(jnp.asarray(x, jnp.bfloat16), 1e-5).dtype == jnp.bfloat16


def test_rotary_is_rotate_half_with_theta():
    x = _rand(1, 2, 10, 4, 16)
    cos, sin = rotary_cos_sin(10, 16, 10000.0)
    expected = ref.apply_rope(x.astype(np.float64), *ref.rope_tables(10, 16, 10000.0))
    np.testing.assert_allclose(apply_rotary(jnp.asarray(x), cos, sin), expected, rtol=RTOL, atol=2e-6)
    # Position 0 is the identity; the rotation preserves norms.
    np.testing.assert_allclose(np.asarray(apply_rotary(jnp.asarray(x), cos, sin))[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(apply_rotary(jnp.asarray(x), cos, sin)), axis=-1),
                               np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("use_rope", [True, False])
def test_attention_swiglu_block_match_numpy(use_rope):
    cfg = tiny(hidden_size=32, num_heads=4, seq_len=12)
    x = jnp.asarray(_rand(2, 2, 12, 32))
    cos_sin = rotary_cos_sin(12, cfg.head_dim, cfg.rope_theta) if use_rope else None
    rope64 = ref.rope_tables(12, cfg.head_dim, cfg.rope_theta) if use_rope else None
    x64 = np.asarray(x, np.float64)
    for module, fn in [(Attention(cfg), lambda p: ref.attention(x64, {"self_attn": p}, 4, rope64)),
                       (SwiGLU(cfg), lambda p: ref.swiglu(x64, {"mlp": p})),
                       (Block(cfg), lambda p: ref.block(x64, p, 4, cfg.rms_norm_eps, rope64))]:
        args = (x, cos_sin) if not isinstance(module, SwiGLU) else (x,)
        params = module.init(jax.random.key(3), *args)["params"]
        got = module.apply({"params": params}, *args)
        np.testing.assert_allclose(got, fn(ref.to_f64(params)), rtol=1e-4, atol=2e-5)


def test_swiglu_width_and_fused_layout():
    cfg = tiny(hidden_size=512, num_heads=8, expansion=4.0)
    assert cfg.intermediate_size == 1536  # round(4 * 512 * 2/3) = 1365 -> next multiple of 256
    params = jax.eval_shape(lambda: SwiGLU(cfg).init(jax.random.key(0), jnp.zeros((1, 2, 512))))["params"]
    assert params["gate_up_proj"]["kernel"].shape == (512, 2 * 1536)
    assert params["down_proj"]["kernel"].shape == (1536, 512)


def test_split_projection_is_one_matmul_split():
    x, w = jnp.asarray(_rand(0, 3, 5, 16)), jnp.asarray(_rand(1, 16, 48))
    parts = split_projection(x, w, 3)
    assert [p.shape for p in parts] == [(3, 5, 16)] * 3
    np.testing.assert_allclose(jnp.concatenate(parts, axis=-1), jnp.dot(x, w), rtol=1e-6, atol=1e-6)


def test_block_gradient_concatenates_no_activations():
    """The speed property of split_projection: neither pass builds a [batch, seq, k*hidden] array by
    concatenation (only the small weight gradients are joined). A fused qkv/gate_up matmul puts a
    concatenation of the blocks' gradients into the backward: 4 ms of an 85 ms H100 step."""
    cfg = tiny(hidden_size=32, num_heads=4, seq_len=12)
    x = jnp.ones((2, 12, 32), jnp.float32)
    cos_sin = rotary_cos_sin(12, cfg.head_dim, cfg.rope_theta)
    params = Block(cfg).init(jax.random.key(0), x, cos_sin)["params"]

    def loss(params, x):
        return jnp.sum(Block(cfg).apply({"params": params}, x, cos_sin))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    # [2, 12, width] results only: rope's per-head rotate_half concatenates [2, 12, heads, head_dim].
    joined = re.findall(r"= \w+\[2,12,(\d+)\]\{[^}]*\} concatenate\(", hlo)
    assert "concatenate(" in hlo and not joined, f"activations of width {joined} concatenated"


def test_casted_linear_init_statistics_and_dtype():
    fan_in, fan_out = 512, 2048
    layer = CastedLinear(fan_out)
    params = layer.init(jax.random.key(0), jnp.zeros((1, fan_in)))["params"]
    w = np.asarray(params["kernel"])
    std = 1 / math.sqrt(fan_in)
    assert w.dtype == np.float32
    assert abs(w.std() / std - 1) < 0.01  # the variance correction makes the std exact
    assert np.abs(w).max() <= 2 * std / 0.87962566103423978 + 1e-7  # truncated at +-2 (corrected) std
    y = layer.apply({"params": params}, jnp.ones((1, fan_in), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16


def test_trunc_normal_init_std_and_zero():
    w = np.asarray(trunc_normal_init(0.3)(jax.random.key(1), (400, 500)))
    assert abs(w.std() / 0.3 - 1) < 0.01 and abs(w.mean()) < 0.003
    assert not np.any(np.asarray(trunc_normal_init(0.0)(jax.random.key(1), (3, 4))))


def test_embedding_init_and_cast():
    emb = CastedEmbedding(11, 512, 1 / math.sqrt(512), jnp.bfloat16)
    params = emb.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    table = np.asarray(params["embedding"])
    assert abs(table.std() * math.sqrt(512) - 1) < 0.03
    out = emb.apply({"params": params}, jnp.array([[3, 0]]))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0], table[3], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_rows", [11, 2000])  # one-hot path and gather path (> ONE_HOT_MAX_ROWS)
def test_embedding_equals_gather_and_its_gradient_has_no_scatter(dtype, num_rows):
    emb = CastedEmbedding(num_rows, 48, 1.0, dtype)
    ids = jax.random.randint(jax.random.key(1), (6, 81), 0, num_rows)
    params = emb.init(jax.random.key(0), ids)
    table = params["params"]["embedding"]
    got = emb.apply(params, ids)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table.astype(dtype)[ids], np.float32))
    cotangent = jax.random.normal(jax.random.key(2), got.shape, jnp.float32).astype(dtype)

    def loss(p):
        return jnp.sum(emb.apply(p, ids).astype(jnp.float32) * cotangent.astype(jnp.float32))

    grad = jax.grad(loss)(params)["params"]["embedding"]
    want = np.zeros(table.shape, np.float64)
    np.add.at(want, np.asarray(ids).reshape(-1), np.asarray(cotangent, np.float64).reshape(-1, 48))
    # bf16: the sums are accumulated in f32 and rounded once to bf16 (half an ulp, 2**-9 of the
    # largest); summing in bf16, as XLA:CPU in jax 0.12 did here unless told otherwise, is 1e-2 off.
    tol = 1e-5 if dtype == jnp.float32 else 2**-8
    assert np.max(np.abs(np.asarray(grad) - want)) <= tol * np.max(np.abs(want))
    # Small tables: the backward is a matmul, never a scatter-add (GPU atomics serialise on few rows).
    has_scatter = "scatter-add" in str(jax.make_jaxpr(jax.grad(loss))(params))
    assert has_scatter == (num_rows > 1024)
