"""SwiGLU activation fused over the gate|up projection: swiglu(gate_up) = silu(gate) * up.

hrm_jax.layers.SwiGLU projects to gate_up [..., 2 * inter] and splits it in halves (gate first).
Here the input is viewed as [rows, 2, inter] (a free reshape), so one program reads the matching
gate and up tiles without a split copy. Math in float32, result in the input dtype.

Backward, with s = sigmoid(gate):
    d_gate = g * up * s * (1 + gate * (1 - s)),   d_up = g * gate * s,
written into one [rows, 2, inter] gradient, i.e. d_gate_up.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas.common import compiler_params, default_interpret, load, next_power_of_2, store

# Indices of the halves in the [rows, 2, inter] view. Arrays, not Python ints: jax 0.10's interpret
# mode cannot discharge a load indexed by a Python int.
_GATE, _UP = np.int32(0), np.int32(1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile [block_rows, block_cols] of each half; `for_shape` picks the defaults."""

    block_rows: int
    block_cols: int
    num_warps: int = 4
    num_stages: int = 1

    @classmethod
    def for_shape(cls, inter: int) -> BlockSizes:
        cols = min(256, next_power_of_2(inter))
        return cls(block_rows=max(1, 4096 // cols), block_cols=cols)


def _tiles(x_ref, rows: int, inter: int):
    """-> (gate f32, up f32, mask) of this program's [block_rows, block_cols] tile."""
    _, _, block_cols = x_ref.shape
    block_rows = x_ref.shape[0]
    i, j = pl.program_id(0), pl.program_id(1)
    mask = ((i * block_rows + jnp.arange(block_rows) < rows)[:, None]
            & (j * block_cols + jnp.arange(block_cols) < inter)[None, :])
    gate = load(x_ref.at[:, _GATE, :], mask=mask, other=0.0).astype(jnp.float32)
    up = load(x_ref.at[:, _UP, :], mask=mask, other=0.0).astype(jnp.float32)
    return gate, up, mask


def _fwd_kernel(x_ref, y_ref, *, rows: int, inter: int):
    gate, up, mask = _tiles(x_ref, rows, inter)
    store(y_ref, (gate * jax.nn.sigmoid(gate) * up).astype(y_ref.dtype), mask=mask)


def _bwd_kernel(x_ref, g_ref, dx_ref, *, rows: int, inter: int):
    gate, up, mask = _tiles(x_ref, rows, inter)
    g = load(g_ref, mask=mask, other=0.0).astype(jnp.float32)
    s = jax.nn.sigmoid(gate)
    store(dx_ref.at[:, _GATE, :], (g * up * s * (1.0 + gate * (1.0 - s))).astype(dx_ref.dtype), mask=mask)
    store(dx_ref.at[:, _UP, :], (g * gate * s).astype(dx_ref.dtype), mask=mask)


def _specs(blocks: BlockSizes):
    pair = pl.BlockSpec((blocks.block_rows, 2, blocks.block_cols), lambda i, j: (i, 0, j))
    half = pl.BlockSpec((blocks.block_rows, blocks.block_cols), lambda i, j: (i, j))
    return pair, half


def _grid(rows: int, inter: int, blocks: BlockSizes):
    return pl.cdiv(rows, blocks.block_rows), pl.cdiv(inter, blocks.block_cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _swiglu(x, blocks, interpret):
    rows, _, inter = x.shape
    pair, half = _specs(blocks)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, rows=rows, inter=inter), grid=_grid(rows, inter, blocks),
        in_specs=[pair], out_specs=half, out_shape=jax.ShapeDtypeStruct((rows, inter), x.dtype),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages), interpret=interpret,
        name="hrm_swiglu_fwd")(x)


def _swiglu_fwd(x, blocks, interpret):
    return _swiglu(x, blocks, interpret), x


def _swiglu_bwd(blocks, interpret, x, g):
    rows, _, inter = x.shape
    pair, half = _specs(blocks)
    dx = pl.pallas_call(
        functools.partial(_bwd_kernel, rows=rows, inter=inter), grid=_grid(rows, inter, blocks),
        in_specs=[pair, half], out_specs=pair, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages), interpret=interpret,
        name="hrm_swiglu_bwd")(x, g)
    return (dx,)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate_up: jax.Array, *, block_sizes: BlockSizes | None = None,
           interpret: bool | None = None) -> jax.Array:
    """silu(gate) * up for gate_up: [..., 2 * inter] (gate first) -> [..., inter] in its dtype.

    interpret=None runs the Triton kernel on GPU and Pallas interpret mode elsewhere (with a warning).
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: the last axis holds gate|up and must be even, got {gate_up.shape}")
    inter = gate_up.shape[-1] // 2
    blocks = block_sizes or BlockSizes.for_shape(inter)
    interpret = default_interpret() if interpret is None else interpret
    y = _swiglu(gate_up.reshape(-1, 2, inter), blocks, interpret)
    return y.reshape(*gate_up.shape[:-1], inter)


def swiglu_reference(gate_up: jax.Array) -> jax.Array:
    """Plain jnp, as hrm_jax.layers.SwiGLU applies it between its projections."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up
