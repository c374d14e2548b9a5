"""Fused SwiGLU MLP + residual add + RMSNorm: the second half of an HRM post-norm block.

    y = rms_norm(h + down(silu(h @ W_gate) * (h @ W_up)))          W_gate | W_up = gate_up_proj

With separate XLA ops the [rows, 2 x inter] gate|up activations are written by one matmul, read
and rewritten as silu(gate) * up by an elementwise fusion, and read again by the down projection;
the residual add and norm are one more pass. In a Sudoku train step that traffic is ~12 of 85 ms
(BUILD_NOTES, GPU speed). Here one program owns `block_rows` rows of h and walks the intermediate
width in chunks of `block_inter`: the gate and up chunks come out of two matmuls, silu(gate) * up is
formed in registers and goes straight into the [block_rows, hidden] down-projection accumulator,
and the add + norm run on the finished rows. Only h and the weights are read, only y is written.

Rounding follows the XLA path (hrm_jax.layers.SwiGLU + add_rms_norm): gate and up are rounded to
the input dtype, silu(gate) * up is computed in float32 and rounded once, the down projection's
output is rounded before the residual add (in the input dtype), and the norm runs in float32.

The backward is jax.vjp of the plain-jnp reference (it recomputes the forward in XLA): the kernel
exists for the gradient-free forwards, which are 40 of the 48 block forwards of a training step
and all of an evaluation rollout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.common import compiler_params, default_interpret, dot, load, store


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per program, intermediate columns per step, and launch parameters."""

    block_rows: int = 64
    block_inter: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def validate(self, hidden: int, inter: int) -> None:
        for name in ("block_rows", "block_inter"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"mlp BlockSizes.{name}={value} must be a power of two >= 16 (Triton tiles)")
        if hidden < 16 or hidden & (hidden - 1):
            raise ValueError(f"fused mlp: hidden size {hidden} must be a power of two >= 16 (the kernel keeps "
                             "whole rows in one Triton tile); use mlp_impl='xla' for this model")
        if inter % self.block_inter:
            raise ValueError(f"fused mlp: intermediate size {inter} is not a multiple of block_inter="
                             f"{self.block_inter}; pass BlockSizes(block_inter=...) dividing it, or use mlp_impl='xla'")


def _silu_times(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """silu(gate) * up from float32 accumulators rounded to `dtype` first, as XLA's separate ops see them."""
    gate = gate.astype(dtype).astype(jnp.float32)
    up = up.astype(dtype).astype(jnp.float32)
    return (gate / (1.0 + jnp.exp(-gate)) * up).astype(dtype)


def _fwd_kernel(h_ref, w_gate_up_ref, w_down_ref, y_ref, *, rows: int, inter: int, block_inter: int,
                eps: float):
    block_rows, hidden = h_ref.shape
    row_ok = (pl.program_id(0) * block_rows + jnp.arange(block_rows) < rows)[:, None]
    h = load(h_ref, mask=row_ok, other=0.0)

    def step(c, acc):
        gate_cols = pl.ds(c * block_inter, block_inter)
        up_cols = pl.ds(inter + c * block_inter, block_inter)
        gate = dot(h, load(w_gate_up_ref.at[:, gate_cols]))
        up = dot(h, load(w_gate_up_ref.at[:, up_cols]))
        return acc + dot(_silu_times(gate, up, h.dtype), load(w_down_ref.at[gate_cols, :]))

    acc = lax.fori_loop(0, inter // block_inter, step, jnp.zeros((block_rows, hidden), jnp.float32))
    x = (h + acc.astype(h.dtype)).astype(jnp.float32)
    variance = jnp.sum(x * x, axis=1, keepdims=True) / hidden
    store(y_ref, (x * lax.rsqrt(variance + eps)).astype(y_ref.dtype), mask=row_ok)


def _forward(h, w_gate_up, w_down, eps: float, blocks: BlockSizes, interpret: bool):
    rows, hidden = h.shape
    inter = w_down.shape[0]
    kernel = functools.partial(_fwd_kernel, rows=rows, inter=inter, block_inter=blocks.block_inter, eps=eps)
    rows_spec = pl.BlockSpec((blocks.block_rows, hidden), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows, blocks.block_rows),),
        in_specs=[rows_spec, pl.BlockSpec((hidden, 2 * inter), lambda i: (0, 0)),
                  pl.BlockSpec((inter, hidden), lambda i: (0, 0))],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct((rows, hidden), h.dtype),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="hrm_swiglu_add_rms_norm_fwd",
    )(h, w_gate_up, w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(h, w_gate_up, w_down, eps, blocks, interpret):
    return _forward(h, w_gate_up, w_down, eps, blocks, interpret)


def _fused_fwd(h, w_gate_up, w_down, eps, blocks, interpret):
    return _forward(h, w_gate_up, w_down, eps, blocks, interpret), (h, w_gate_up, w_down)


def _fused_bwd(eps, blocks, interpret, residuals, g):
    _, vjp = jax.vjp(functools.partial(swiglu_add_rms_norm_reference, eps=eps), *residuals)
    return vjp(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def swiglu_add_rms_norm(h: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, eps: float, *,
                        block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """rms_norm(h + down(silu(h @ W_gate) * (h @ W_up))) over the last axis.

    h [..., hidden]; w_gate_up [hidden, 2 * inter] (gate columns first, as gate_up_proj);
    w_down [inter, hidden]; one dtype throughout. interpret=None runs the Triton kernel on GPU and
    Pallas interpret mode elsewhere (with a warning).
    """
    hidden = h.shape[-1]
    if w_gate_up.ndim != 2 or w_down.ndim != 2 or w_gate_up.shape[0] != hidden or \
            w_gate_up.shape[1] != 2 * w_down.shape[0] or w_down.shape[1] != hidden:
        raise ValueError(f"swiglu_add_rms_norm: expected h [..., H], w_gate_up [H, 2I], w_down [I, H]; got "
                         f"{h.shape}, {w_gate_up.shape}, {w_down.shape}")
    if not h.dtype == w_gate_up.dtype == w_down.dtype:
        raise ValueError(f"swiglu_add_rms_norm: h and the weights must share a dtype, got "
                         f"{h.dtype}, {w_gate_up.dtype}, {w_down.dtype}")
    blocks = block_sizes or BlockSizes()
    blocks.validate(hidden, w_down.shape[0])
    interpret = default_interpret() if interpret is None else interpret
    y = _fused(h.reshape(-1, hidden), w_gate_up, w_down, float(eps), blocks, interpret)
    return y.reshape(h.shape)


def swiglu_add_rms_norm_reference(h: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, eps: float) -> jax.Array:
    """Plain jnp, as hrm_jax.layers computes add_rms_norm(h, SwiGLU(h))."""
    gate, up = jnp.split(jnp.dot(h, w_gate_up), 2, axis=-1)
    x = (h + jnp.dot(jax.nn.silu(gate) * up, w_down)).astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return (x * lax.rsqrt(variance + eps)).astype(h.dtype)
