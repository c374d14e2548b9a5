"""Transformer building blocks of HRM, numerically as the reference's models/layers.py.

Parameters are float32; every layer casts them to the dtype of its input, so the compute dtype is
chosen once, where the embeddings are cast (config.forward_dtype).
"""

from __future__ import annotations

import logging
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hrm_jax.config import IMPLEMENTATION_FIELDS, HRMConfig
from kernels_pallas.attention import attention as pallas_attention
from kernels_pallas.mosaic import has_wgmma
from kernels_pallas.rms_norm import add_rms_norm as fused_add_rms_norm
from kernels_pallas.swiglu_matmul import swiglu_matmul, swiglu_matmul_reference

logger = logging.getLogger(__name__)

# std of a standard normal truncated to [-2, 2]; dividing by it makes the truncated draw have the
# requested std. The reference's trunc_normal_init_ applies the same correction (models/common.py).
_TRUNC_NORMAL_STD = 0.87962566103423978


def trunc_normal_init(std: float) -> nn.initializers.Initializer:
    """Normal truncated at +-2 std whose *actual* std is `std` (std 0 gives zeros)."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        if std == 0:
            return jnp.zeros(shape, dtype)
        unit = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
        return (unit * (std / _TRUNC_NORMAL_STD)).astype(dtype)

    return init


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without a learnable scale; float32 math, result in the input dtype."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


def add_rms_norm(h: jax.Array, delta: jax.Array, eps: float, impl: str = "xla") -> jax.Array:
    """rms_norm(h + delta): the residual add and norm of a post-norm block ("pallas": one fused kernel)."""
    if impl == "pallas":
        return fused_add_rms_norm(h, delta, eps)
    return rms_norm(h + delta, eps)


def rotary_cos_sin(num_positions: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables f32[num_positions, head_dim] in the rotate-half layout (freqs repeated twice)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.outer(jnp.arange(num_positions, dtype=jnp.float32), inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x: [batch, seq, heads, head_dim] by cos/sin [seq, head_dim]; f32 math as the reference."""
    x32 = x.astype(cos.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


class CastedLinear(nn.Module):
    """y = x @ W (+ b) with f32 parameters cast to x's dtype; truncated LeCun-normal init."""

    features: int
    use_bias: bool = False
    kernel_init: nn.initializers.Initializer | None = None
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        init = self.kernel_init or trunc_normal_init(1.0 / math.sqrt(fan_in))
        kernel = self.param("kernel", init, (fan_in, self.features), jnp.float32)
        y = jnp.dot(x, kernel.astype(x.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(x.dtype)
        return y


# Token vocabularies up to this size are embedded by a one-hot matmul (see CastedEmbedding).
ONE_HOT_MAX_ROWS = 1024


class CastedEmbedding(nn.Module):
    """Lookup in an f32 table [num_embeddings, features], result cast to `dtype`."""

    num_embeddings: int
    features: int
    init_std: float
    dtype: jnp.dtype

    def setup(self) -> None:
        self.embedding = self.param("embedding", trunc_normal_init(self.init_std),
                                    (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.num_embeddings <= ONE_HOT_MAX_ROWS:
            # A one-hot matmul, not a gather: a gather's backward is a scatter-add, and with the
            # ~60k tokens of a batch landing on ~10 rows it serialises on GPU atomics (bf16 ones are
            # compare-and-swap loops): 248 of 380 ms of a Sudoku train step on an H100. One nonzero
            # term per row keeps the forward exact (HIGHEST: no TF32 rounding of f32 tables), and the
            # backward becomes a deterministic matmul. It accumulates in f32, as torch's embedding
            # backward does; XLA:CPU in jax 0.12 compiled this gradient's bf16 dot with a bf16 sum (1% off).
            one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=self.dtype)
            rows = jnp.dot(one_hot, self.embedding.astype(self.dtype), precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
            return rows.astype(self.dtype)
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def table(self) -> jax.Array:
        return self.embedding.astype(self.dtype)


class LinearKernel(nn.Module):
    """The weight of a bias-free CastedLinear by itself (same name, shape and init), cast to `dtype`:
    for layers that split one stored projection into several matmuls (split_projection)."""

    fan_in: int
    features: int

    @nn.compact
    def __call__(self, dtype: jnp.dtype) -> jax.Array:
        init = trunc_normal_init(1.0 / math.sqrt(self.fan_in))
        return self.param("kernel", init, (self.fan_in, self.features), jnp.float32).astype(dtype)


def split_projection(x: jax.Array, kernel: jax.Array, parts: int) -> list[jax.Array]:
    """x @ kernel split into `parts` equal column blocks, as one matmul per block.

    The same numbers as splitting the output of one matmul, but faster on GPU: the blocks come out
    as separate arrays, so the forward has no strided slice copies and the backward no
    concatenation of the blocks' gradients (the input gradient is a sum of matmuls instead). On an
    H100 this made the Sudoku train step 5% faster (BUILD_NOTES, GPU speed).
    """
    return [jnp.dot(x, block) for block in jnp.split(kernel, parts, axis=1)]


class Attention(nn.Module):
    """Non-causal multi-head self-attention, one stored qkv_proj weight (columns q|k|v), rotary positions."""

    config: HRMConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos_sin: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        cfg = self.config
        qkv_kernel = LinearKernel(cfg.hidden_size, 3 * cfg.hidden_size, name="qkv_proj")(x.dtype)
        query, key, value = (einops.rearrange(y, "b s (h d) -> b s h d", h=cfg.num_heads)
                             for y in split_projection(x, qkv_kernel, 3))
        if cos_sin is not None:
            query, key = apply_rotary(query, *cos_sin), apply_rotary(key, *cos_sin)
        # Softmax scale 1/sqrt(head_dim), logits in f32: the same as flash-attn in the reference.
        if cfg.attention_impl == "pallas":
            out = pallas_attention(query, key, value)
        else:
            out = jax.nn.dot_product_attention(query, key, value, is_causal=False,
                                               implementation=cfg.attention_impl)
        out = einops.rearrange(out, "b s h d -> b s (h d)")
        return CastedLinear(cfg.hidden_size, name="o_proj")(out)


class SwiGLU(nn.Module):
    """down(silu(gate) * up), one stored gate_up_proj weight (columns gate|up)."""

    config: HRMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, inter = self.config.hidden_size, self.config.intermediate_size
        gate_up = LinearKernel(hidden, 2 * inter, name="gate_up_proj")(x.dtype)
        if self.config.mlp_impl == "pallas":
            h = swiglu_matmul(x, gate_up)
        else:
            h = swiglu_matmul_reference(x, gate_up)
        return CastedLinear(self.config.hidden_size, name="down_proj")(h)


class Block(nn.Module):
    """Post-norm transformer block: h = norm(h + attn(h)); h = norm(h + mlp(h))."""

    config: HRMConfig

    @nn.compact
    def __call__(self, h: jax.Array, cos_sin: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        eps, impl = self.config.rms_norm_eps, self.config.norm_impl
        h = add_rms_norm(h, Attention(self.config, name="self_attn")(h, cos_sin), eps, impl)
        return add_rms_norm(h, SwiGLU(self.config, name="mlp")(h), eps, impl)


def runnable_here(config: HRMConfig) -> HRMConfig:
    """`config` with its kernel choices (IMPLEMENTATION_FIELDS) set to "xla" where this machine cannot
    run them: every GPU kernel off GPU, the Hopper-only SwiGLU kernel on older GPUs. They change how,
    not what, is computed, so a run trained with cuDNN attention on an H100 evaluates on a CPU."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        changes = {field: "xla" for field in IMPLEMENTATION_FIELDS if getattr(config, field) != "xla"}
    elif config.mlp_impl == "pallas" and not has_wgmma(device):
        changes = {"mlp_impl": "xla"}
    else:
        changes = {}
    if changes:
        logger.info("running with %s on %s (the checkpoint's choices need another GPU)",
                    ", ".join(f"{k}='xla'" for k in changes), device.device_kind)
    return config.replace(**changes)
