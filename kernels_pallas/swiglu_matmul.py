"""SwiGLU's first half as one Hopper kernel: h = silu(x @ W_gate) * (x @ W_up).

Why: in a Sudoku train step on an H100 the separate `silu(gate) * up` pass cost 10.7 ms of 81
(BUILD_NOTES, GPU speed). It is pure memory traffic: the matmul writes gate and up (6 KB per
token at hidden 512), the pass reads them back and writes h (3 KB). Here the activation is applied
to the f32 accumulators in the matmul's epilogue, so only h reaches memory.

The kernel is Pallas *Mosaic GPU* (wgmma, TMA, warp specialisation), not Triton: the Triton
backend did not reach matmul speed on these shapes (BUILD_NOTES.md, GPU speed). One CTA has two
compute warpgroups, each owning `tile_m` rows and two f32 accumulators (gate and up,
`tile_m x tile_n`), and one memory warpgroup streaming x and both weight blocks through a
`stages`-deep TMA pipeline. CTAs are persistent and walk the (M, N) tiles with N fastest, so a
block of x rows is read from HBM once while the 3 MB of weights stay in L2. The structure follows
jax's documented Hopper matmul example (jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu).

Numerics follow the reference (torch: gate_up_proj(x).chunk(2) in bf16, then silu(gate) * up):
gate and up are rounded to the input dtype, the product is taken in f32 and rounded once.

Backward: the kernel is a forward pass only. Under `jax.grad` the custom_vjp's forward rule runs
the XLA path (two matmuls, saving gate and up), so differentiated layers cost what they did and the
backward is XLA's. HRM's training step runs 40 of its 48 MLPs without gradient (the no-grad H/L
steps and the target-Q forward; hrm_jax.model.inner_forward), and those take the fused kernel.
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

# Compute warpgroups per CTA; each owns tile_m rows of the CTA's block.
_COMPUTE_WARPGROUPS = 2
# Registers left to the memory warpgroup: it only issues TMA copies (jax's example uses 40 on H100).
_MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one CTA: (2 * tile_m) rows x tile_n columns of h, tile_k deep per pipeline step.

    The defaults were the fastest of 9 configs on an H100 at 62,976 x 512 -> 1536 (the Sudoku step's
    rows): 0.536 ms, against 0.567-0.630 ms for the others. A second sweep put stages=3,
    epilogue_n=64, delay_release=0 4% ahead of them, about the run-to-run spread
    (benchmarks/mosaic_kernels.py, BUILD_NOTES).
    """

    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3
    epilogue_n: int = 128  # columns per epilogue store (SMEM staging tile)
    # 1: keep one pipeline step's wgmma in flight while the next is issued (its SMEM is released a
    # step later); 0: wait for each step's wgmma before releasing its buffers.
    delay_release: int = 1

    @property
    def cta_rows(self) -> int:
        return _COMPUTE_WARPGROUPS * self.tile_m


# What `swiglu_matmul` uses when no tiles are given.
DEFAULT_TILES = TileConfig()


def _transforms(width_elems: int, dtype) -> tuple:
    """SMEM tiling + swizzle that TMA and wgmma need for a [*, width_elems] tile."""
    swizzle = plgpu.find_swizzle(width_elems * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _swiglu_epilogue(gate_f32: jax.Array, up_f32: jax.Array, dtype) -> jax.Array:
    """silu(gate) * up with gate and up rounded to `dtype` first (as the reference's bf16 matmul)."""
    gate = gate_f32.astype(dtype).astype(jnp.float32)
    up = up_f32.astype(dtype).astype(jnp.float32)
    return (gate * jax.nn.sigmoid(gate) * up).astype(dtype)


def _kernel(x_gmem, w_gmem, h_gmem, *, tiles: TileConfig):
    rows, hidden = x_gmem.shape
    inter = h_gmem.shape[1]
    dtype = x_gmem.dtype
    tm, tn, tk, en = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epilogue_n
    m_tiles, n_tiles = rows // tiles.cta_rows, inter // tn
    in_transforms = _transforms(tk, dtype)
    out_transforms = _transforms(en, dtype)
    w_gate, w_up = w_gmem.at[:, :inter], w_gmem.at[:, inter:]

    def pipeline(body, compute_context):
        x_spec = plgpu.BlockSpec((tiles.cta_rows, tk), lambda k: (0, k), transforms=in_transforms,
                                 delay_release=tiles.delay_release)
        w_spec = plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=in_transforms,
                                 delay_release=tiles.delay_release)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(hidden // tk,), memory_registers=_MEMORY_REGISTERS,
            in_specs=[x_spec, w_spec, w_spec], wg_axis="wg", num_compute_wgs=_COMPUTE_WARPGROUPS,
            max_concurrent_steps=tiles.stages, compute_context=compute_context)

    def no_op(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(no_op, no_op).get_allocations(x_gmem, w_gate, w_up),
        # Two staging slots per warpgroup, so one TMA store drains while the next tile is written.
        out_smem=plgpu.SMEM((_COMPUTE_WARPGROUPS, 2, tm, en), dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        my_rows = pl.ds(wg * tm, tm)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="cta")
        def _tile_loop(loop_info):
            (tile,) = loop_info.index
            m_idx, n_idx = tile // n_tiles, tile % n_tiles
            cta_rows = pl.ds(m_idx * tiles.cta_rows, tiles.cta_rows)
            cols = pl.ds(n_idx * tn, tn)

            def mma(_, x_smem, gate_smem, up_smem, accs):
                acc_gate, acc_up = accs
                plgpu.wgmma(acc_gate, x_smem.at[my_rows], gate_smem)
                plgpu.wgmma(acc_up, x_smem.at[my_rows], up_smem)
                plgpu.wgmma_wait(2 * tiles.delay_release)  # two wgmma groups (gate, up) per step
                return accs

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_gate=plgpu.ACC((tm, tn), jnp.float32),
                                   acc_up=plgpu.ACC((tm, tn), jnp.float32))
                def _accumulate(acc_gate, acc_up):
                    run_pipeline((acc_gate, acc_up))
                    plgpu.wgmma_wait(0)
                    h = _swiglu_epilogue(acc_gate[...], acc_up[...], dtype)
                    out = h_gmem.at[cta_rows, cols].at[my_rows]
                    # The previous tile's stores have read their slots (they drained during this
                    # tile's matmul; without this wait, a tile of one part would rewrite slot 0
                    # while its last store may still be reading it).
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for part in range(tn // en):
                        slot = part % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's last store has drained
                        out_smem[wg, slot] = h[:, part * en:(part + 1) * en]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out.at[:, pl.ds(part * en, en)])

            pipeline(mma, compute_context)(x_gmem.at[cta_rows, :], w_gate.at[:, cols], w_up.at[:, cols],
                                           allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _fused_call(x2d: jax.Array, w: jax.Array, tiles: TileConfig, interpret: bool) -> jax.Array:
    rows, inter = x2d.shape[0], w.shape[1] // 2
    call = plgpu.kernel(
        functools.partial(_kernel, tiles=tiles),
        out_type=jax.ShapeDtypeStruct((rows, inter), x2d.dtype),
        grid=(num_ctas(interpret),), grid_names=("cta",),
        num_threads=_COMPUTE_WARPGROUPS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret),
    )
    return call(x2d, w)


def swiglu_matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """Plain jnp: silu(x @ W_gate) * (x @ W_up), w [hidden, 2 * inter] with columns gate|up.

    It is also the XLA path of hrm_jax.layers.SwiGLU, and differentiated calls of the kernel run
    exactly this (the custom_vjp forward rule below). One matmul per column block, as
    hrm_jax.layers.split_projection does: the same numbers as slicing one matmul's output, without
    the slice copies.
    """
    w_gate, w_up = jnp.split(w, 2, axis=1)
    return jax.nn.silu(jnp.dot(x, w_gate)) * jnp.dot(x, w_up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _swiglu(x2d, w, tiles, interpret):
    return _fused_call(x2d, w, tiles, interpret)


def _swiglu_fwd(x2d, w, tiles, interpret):
    # Differentiated calls take the XLA path and keep its backward (see the module docstring).
    h, pullback = jax.vjp(swiglu_matmul_reference, x2d, w)
    return h, pullback


def _swiglu_bwd(tiles, interpret, pullback, dh):
    return pullback(dh)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def check_supported(hidden: int, inter: int, dtype, tiles: TileConfig | None = None) -> None:
    """Raises ValueError naming the problem if the kernel cannot run these sizes or this dtype."""
    tiles = tiles or DEFAULT_TILES
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"swiglu_matmul needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}; "
                         "use mlp_impl='xla' for float32")
    if hidden % tiles.tile_k:
        raise ValueError(f"swiglu_matmul needs hidden size {hidden} to be a multiple of tile_k={tiles.tile_k}")
    if inter % tiles.tile_n or tiles.tile_n % tiles.epilogue_n:
        raise ValueError(f"swiglu_matmul needs intermediate size {inter} to be a multiple of "
                         f"tile_n={tiles.tile_n} (and tile_n of epilogue_n={tiles.epilogue_n})")


def swiglu_matmul(x: jax.Array, w: jax.Array, *, tiles: TileConfig | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """silu(x @ w[:, :inter]) * (x @ w[:, inter:]); x [..., hidden], w [hidden, 2 * inter] -> [..., inter].

    x and w share a dtype (bfloat16 or float16). Rows are padded to a multiple of the CTA's rows.
    interpret=None runs on a Hopper GPU, and in GPU interpret mode (slow) off GPU with a warning.
    """
    tiles = tiles or DEFAULT_TILES
    hidden, inter = x.shape[-1], w.shape[1] // 2
    if w.shape != (hidden, 2 * inter) or w.dtype != x.dtype:
        raise ValueError(f"swiglu_matmul: w must be [{hidden}, 2 * inter] of x's dtype {x.dtype}, "
                         f"got {w.shape} {w.dtype}")
    check_supported(hidden, inter, x.dtype, tiles)
    if hidden // tiles.tile_k <= tiles.delay_release:
        # A pipeline with no more steps than the release delay never releases its buffers (GPU
        # interpret mode reports the barrier phase mismatch): wait for every step instead.
        tiles = dataclasses.replace(tiles, delay_release=0)
    interpret = default_interpret() if interpret is None else interpret
    check_device(interpret)
    x2d = x.reshape(-1, hidden)
    rows = x2d.shape[0]
    padded = -(-rows // tiles.cta_rows) * tiles.cta_rows
    if padded != rows:
        x2d = jnp.pad(x2d, ((0, padded - rows), (0, 0)))
    h = _swiglu(x2d, w, tiles, interpret)
    return h[:rows].reshape(*x.shape[:-1], inter)
