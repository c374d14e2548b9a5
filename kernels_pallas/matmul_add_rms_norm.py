"""A block's output projection, residual add and RMSNorm as one Hopper kernel: rms_norm(h + x @ W).

Why: HRM's post-norm blocks end both sublayers with `h = rms_norm(h + x @ W)` (o_proj after
attention, down_proj after the MLP). Done by XLA, the matmul writes x @ W (1 KB per token at hidden
512) and a second pass reads it back with h and writes the result. Here the add and the norm run on
the matmul's f32 accumulators in its epilogue, so x @ W never reaches memory.

Pallas Mosaic GPU, as kernels_pallas/swiglu_matmul.py. RMSNorm needs whole rows, so one CTA owns
`tile_m` rows and every output column: its two compute warpgroups take half of the columns each
(wgmma N <= 256, so hidden <= 512) and add their partial sums of squares through shared memory
behind a barrier of the two. The memory warpgroup streams x and W through a TMA pipeline while h
is fetched into the buffer that then stages the output.

Numerics follow hrm_jax.layers: x @ W is rounded to the input dtype, the residual add happens in
that dtype, the norm in f32 (eps inside the rsqrt), one final rounding.

Backward: forward only, like swiglu_matmul. Under `jax.grad` the custom_vjp's forward rule runs the
XLA path (its residuals and backward); the no-gradient layers of a train step take the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.common import default_interpret
from kernels_pallas.mosaic import check_device, interpret_params, num_ctas

_COMPUTE_WARPGROUPS = 2  # each owns half of the columns
_MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """tile_m rows (all columns) per CTA, tile_k deep per pipeline step, `stages` steps in flight."""

    tile_m: int = 64
    tile_k: int = 64  # a multiple of 64: at 32 Mosaic GPU finds no layout for the 64-byte swizzle
    stages: int = 2
    delay_release: int = 1


DEFAULT_TILES = TileConfig()


def _transforms(width_elems: int, dtype) -> tuple:
    swizzle = plgpu.find_swizzle(width_elems * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(h_gmem, x_gmem, w_gmem, out_gmem, *, tiles: TileConfig, eps: float):
    rows, k_dim = x_gmem.shape
    hidden = w_gmem.shape[1]
    dtype = x_gmem.dtype
    tm, tk = tiles.tile_m, tiles.tile_k
    half = hidden // _COMPUTE_WARPGROUPS
    in_transforms = _transforms(tk, dtype)
    w_transforms = _transforms(half, dtype)
    h_transforms = _transforms(half, dtype)

    def pipeline(body, compute_context):
        x_spec = plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=in_transforms,
                                 delay_release=tiles.delay_release)
        w_spec = plgpu.BlockSpec((tk, hidden), lambda k: (k, 0), transforms=w_transforms,
                                 delay_release=tiles.delay_release)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_dim // tk,), memory_registers=_MEMORY_REGISTERS, in_specs=[x_spec, w_spec],
            wg_axis="wg", num_compute_wgs=_COMPUTE_WARPGROUPS, max_concurrent_steps=tiles.stages,
            compute_context=compute_context)

    def no_op(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(no_op, no_op).get_allocations(x_gmem, w_gmem),
        # Per warpgroup: its half of the h tile, then of the output (the TMA store reads it back).
        h_smem=plgpu.SMEM((_COMPUTE_WARPGROUPS, tm, half), dtype, transforms=h_transforms),
        # Partial sums of squares [tile parity, warpgroup, row]: two tiles' worth, so a warpgroup that
        # runs ahead into the next tile never overwrites a sum the other has yet to read.
        sums_smem=plgpu.SMEM((2, _COMPUTE_WARPGROUPS, tm), jnp.float32),
        h_barrier=plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),
        sums_barrier=plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS),
        collective_axes="wg",
    )
    def _scope(allocations, h_smem, sums_smem, h_barrier, sums_barrier):
        wg = lax.axis_index("wg")
        my_cols = pl.ds(wg * half, half)

        @plgpu.nd_loop((rows // tm,), collective_axes="cta")
        def _tile_loop(loop_info):
            (m_idx,) = loop_info.index
            tile_rows = pl.ds(m_idx * tm, tm)
            parity = loop_info.local_index % 2

            def mma(_, x_smem, w_smem, acc):
                plgpu.wgmma(acc, x_smem, w_smem.at[:, my_cols])
                plgpu.wgmma_wait(tiles.delay_release)
                return acc

            def compute_context(run_pipeline):
                # The previous tile's output store must have read h_smem before h is fetched into it.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.copy_gmem_to_smem(h_gmem.at[tile_rows, my_cols], h_smem.at[wg], h_barrier.at[wg])

                @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, half), jnp.float32))
                def _accumulate(acc):
                    run_pipeline(acc)
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_wait(h_barrier.at[wg])
                    # As the XLA path: x @ W rounded, the residual add in the input dtype, norm in f32.
                    summed = (h_smem[wg] + acc[...].astype(dtype)).astype(jnp.float32)
                    partial = jnp.sum(summed * summed, axis=1)
                    sums_smem[parity, wg] = partial
                    plgpu.barrier_arrive(sums_barrier)
                    plgpu.barrier_wait(sums_barrier)
                    other = sums_smem[parity, 1 - wg]
                    scale = lax.rsqrt((partial + other) / hidden + eps)
                    h_smem[wg] = (summed * lax.broadcast_in_dim(scale, (tm, half), [0])).astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(h_smem.at[wg], out_gmem.at[tile_rows, my_cols])

            pipeline(mma, compute_context)(x_gmem.at[tile_rows, :], w_gmem, allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _fused_call(h2d, x2d, w, eps: float, tiles: TileConfig, interpret: bool) -> jax.Array:
    call = plgpu.kernel(
        functools.partial(_kernel, tiles=tiles, eps=eps),
        out_type=jax.ShapeDtypeStruct(h2d.shape, h2d.dtype),
        grid=(num_ctas(interpret),), grid_names=("cta",),
        num_threads=_COMPUTE_WARPGROUPS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret),
    )
    return call(h2d, x2d, w)


def matmul_add_rms_norm_reference(h: jax.Array, x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Plain jnp, as hrm_jax.layers: rms_norm(h + x @ w) with float32 norm math."""
    summed = (h + jnp.dot(x, w)).astype(jnp.float32)
    variance = jnp.mean(jnp.square(summed), axis=-1, keepdims=True)
    return (summed * lax.rsqrt(variance + eps)).astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(h2d, x2d, w, eps, tiles, interpret):
    return _fused_call(h2d, x2d, w, eps, tiles, interpret)


def _fused_fwd(h2d, x2d, w, eps, tiles, interpret):
    # Differentiated calls take the XLA path and keep its backward (see the module docstring).
    return jax.vjp(functools.partial(matmul_add_rms_norm_reference, eps=eps), h2d, x2d, w)


def _fused_bwd(eps, tiles, interpret, pullback, dy):
    return pullback(dy)


_fused.defvjp(_fused_fwd, _fused_bwd)


def check_supported(k_dim: int, hidden: int, dtype, tiles: TileConfig | None = None) -> None:
    """Raises ValueError naming the problem if the kernel cannot run these sizes or this dtype."""
    tiles = tiles or DEFAULT_TILES
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"matmul_add_rms_norm needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}; "
                         "use norm_impl='xla' for float32")
    if tiles.tile_k % 64:
        raise ValueError(f"matmul_add_rms_norm needs tile_k to be a multiple of 64, got {tiles.tile_k}")
    if k_dim % tiles.tile_k:
        raise ValueError(f"matmul_add_rms_norm needs the input width {k_dim} to be a multiple of "
                         f"tile_k={tiles.tile_k}")
    if hidden % (64 * _COMPUTE_WARPGROUPS) or hidden > 256 * _COMPUTE_WARPGROUPS:
        raise ValueError(f"matmul_add_rms_norm needs a hidden size that is a multiple of 128 and at most 512, "
                         f"got {hidden}; use norm_impl='xla'")


def matmul_add_rms_norm(h: jax.Array, x: jax.Array, w: jax.Array, eps: float, *, tiles: TileConfig | None = None,
                        interpret: bool | None = None) -> jax.Array:
    """rms_norm(h + x @ w) over the last axis: h [..., hidden], x [..., k], w [k, hidden], one dtype.

    Rows are padded to a multiple of tile_m. interpret=None runs on a Hopper GPU, and in GPU interpret
    mode (slow) off GPU with a warning.
    """
    tiles = tiles or DEFAULT_TILES
    k_dim, hidden = x.shape[-1], h.shape[-1]
    if w.shape != (k_dim, hidden) or h.shape[:-1] != x.shape[:-1] or not h.dtype == x.dtype == w.dtype:
        raise ValueError(f"matmul_add_rms_norm: expected h [..., hidden], x [..., k], w [k, hidden] of one dtype, "
                         f"got h {h.shape} {h.dtype}, x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    check_supported(k_dim, hidden, x.dtype, tiles)
    if k_dim // tiles.tile_k <= tiles.delay_release:  # see swiglu_matmul: no step would release
        tiles = dataclasses.replace(tiles, delay_release=0)
    interpret = default_interpret() if interpret is None else interpret
    check_device(interpret)
    h2d, x2d = h.reshape(-1, hidden), x.reshape(-1, k_dim)
    rows = h2d.shape[0]
    padded = -(-rows // tiles.tile_m) * tiles.tile_m
    if padded != rows:
        h2d, x2d = (jnp.pad(a, ((0, padded - rows), (0, 0))) for a in (h2d, x2d))
    y = _fused(h2d, x2d, w, float(eps), tiles, interpret)
    return y[:rows].reshape(h.shape)
