"""Fused residual add + RMSNorm without scale: add_rms_norm(h, delta) = rms_norm(h + delta).

HRM's post-norm blocks run `h = rms_norm(h + sublayer(h))` twice per block (hrm_jax.layers.Block).
The add happens in the input dtype and the norm in float32, result in the input dtype, exactly as
hrm_jax.layers.rms_norm(h + delta, eps). One program normalises `block_rows` whole rows; the
hidden size is padded to a power of two with masked loads (512 needs none).

Backward (y = x r, r = rsqrt(mean(x^2) + eps), x = h + delta):
    dx = r * (g - y * mean(g * y))      and dh = ddelta = dx.
Only h and delta are saved; the backward recomputes x and r, which costs one row reduction and
saves writing r or x in the forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.common import compiler_params, default_interpret, load, next_power_of_2, store


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per program and launch parameters; `for_shape` picks the defaults."""

    block_rows: int
    num_warps: int = 4
    num_stages: int = 1

    @classmethod
    def for_shape(cls, hidden: int) -> BlockSizes:
        # ~4096 elements per program: 32 f32 values per thread at 4 warps.
        width = next_power_of_2(hidden)
        return cls(block_rows=max(1, min(64, 4096 // width)), num_warps=4 if width <= 1024 else 8)


def _normalize(h_ref, d_ref, rows: int, hidden: int, eps: float):
    """-> (x f32, r f32[block, 1], mask) for this program's block of rows."""
    block_rows, width = h_ref.shape
    row_ok = pl.program_id(0) * block_rows + jnp.arange(block_rows) < rows
    mask = row_ok[:, None]
    if width != hidden:
        mask = mask & (jnp.arange(width) < hidden)[None, :]
    # The add in the input dtype, as rms_norm(h + delta) does it.
    x = (load(h_ref, mask=mask, other=0.0) + load(d_ref, mask=mask, other=0.0)).astype(jnp.float32)
    variance = jnp.sum(x * x, axis=1, keepdims=True) / hidden
    return x, jax.lax.rsqrt(variance + eps), mask


def _fwd_kernel(h_ref, d_ref, y_ref, *, rows: int, hidden: int, eps: float):
    x, r, mask = _normalize(h_ref, d_ref, rows, hidden, eps)
    store(y_ref, (x * r).astype(y_ref.dtype), mask=mask)


def _bwd_kernel(h_ref, d_ref, g_ref, dx_ref, *, rows: int, hidden: int, eps: float):
    x, r, mask = _normalize(h_ref, d_ref, rows, hidden, eps)
    y = x * r
    g = load(g_ref, mask=mask, other=0.0).astype(jnp.float32)
    mean_gy = jnp.sum(g * y, axis=1, keepdims=True) / hidden
    store(dx_ref, (r * (g - y * mean_gy)).astype(dx_ref.dtype), mask=mask)


def _rowwise_call(kernel, inputs, eps: float, blocks: BlockSizes, interpret: bool, name: str):
    """Runs kernel(*input_refs, out_ref) over rows of [rows, hidden] views; -> [rows, hidden]."""
    rows, hidden = inputs[0].shape
    spec = pl.BlockSpec((blocks.block_rows, next_power_of_2(hidden)), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(kernel, rows=rows, hidden=hidden, eps=eps),
        grid=(pl.cdiv(rows, blocks.block_rows),),
        in_specs=[spec] * len(inputs),
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((rows, hidden), inputs[0].dtype),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _add_rms_norm(h, delta, eps, blocks, interpret):
    return _rowwise_call(_fwd_kernel, (h, delta), eps, blocks, interpret, "hrm_add_rms_norm_fwd")


def _add_rms_norm_fwd(h, delta, eps, blocks, interpret):
    return _add_rms_norm(h, delta, eps, blocks, interpret), (h, delta)


def _add_rms_norm_bwd(eps, blocks, interpret, residuals, g):
    h, delta = residuals
    dx = _rowwise_call(_bwd_kernel, (h, delta, g), eps, blocks, interpret, "hrm_add_rms_norm_bwd")
    return dx, dx


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def add_rms_norm(h: jax.Array, delta: jax.Array, eps: float, *, block_sizes: BlockSizes | None = None,
                 interpret: bool | None = None) -> jax.Array:
    """rms_norm(h + delta) over the last axis; h, delta: [..., hidden] of one dtype -> same shape and dtype.

    interpret=None runs the Triton kernel on GPU and Pallas interpret mode elsewhere (with a warning).
    """
    if h.shape != delta.shape or h.dtype != delta.dtype:
        raise ValueError(f"add_rms_norm: h and delta must share shape and dtype, got "
                         f"{h.shape} {h.dtype} and {delta.shape} {delta.dtype}")
    hidden = h.shape[-1]
    blocks = block_sizes or BlockSizes.for_shape(hidden)
    interpret = default_interpret() if interpret is None else interpret
    y = _add_rms_norm(h.reshape(-1, hidden), delta.reshape(-1, hidden), float(eps), blocks, interpret)
    return y.reshape(h.shape)


def add_rms_norm_reference(h: jax.Array, delta: jax.Array, eps: float) -> jax.Array:
    """Plain jnp: hrm_jax.layers.rms_norm(h + delta, eps)."""
    x = (h + delta).astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(variance + eps)).astype(h.dtype)
