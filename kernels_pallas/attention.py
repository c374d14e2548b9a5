"""Non-causal multi-head attention for HRM's short sequences: Pallas (Triton) kernels with a
flash-attention-2 backward, and the plain-jnp reference beside them.

    out = softmax(q k^T * scale) v        q, k, v, out: [batch, seq, heads, head_dim]

Layout and numerics as jax.nn.dot_product_attention(implementation="xla"): logits and softmax in
float32, probabilities cast to the value dtype for the weighted sum, scale 1/sqrt(head_dim) (the
reference's flash-attn does the same). Triton blocks must be powers of two, so the sequence (81/82
for Sudoku, 900 for Maze/ARC) is covered by blocks that run past its end: loads there are masked to
zero, padded keys get logit -inf before the softmax, and stores past the end are dropped. No padded
copy of q/k/v is made.

Up to 128 positions one block holds every key: the forward is one softmax per query block, and the
backward is a single pass per (batch, head) that writes dq chunk by chunk (with all keys in the
block, a query chunk's dq is complete when the chunk is done) while accumulating dk and dv. Longer
sequences use the online softmax over key blocks, and the two-scan backward of jax's Pallas GPU op
(jax/experimental/pallas/ops/gpu/attention.py): scan 1 accumulates dk, dv of one key block over all
query blocks, scan 2 the dq of one query block over all key blocks.

The log-sum-exp saved for the backward is in base 2, because exp2 is the native instruction.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.common import compiler_params, default_interpret, dot, load, padded_width, store

LOG2E = math.log2(math.e)
SINGLE_BLOCK_MAX = 128  # sequences up to this (padded) length keep all keys in one block


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) and launch parameters; `for_shape` picks the defaults."""

    block_q: int  # forward: query rows per program
    block_k: int  # forward: keys per online-softmax step
    block_q_bwd: int  # backward: query rows per step
    block_k_bwd: int  # backward: keys per program; >= padded seq means the single-pass backward
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 2

    @classmethod
    def for_shape(cls, seq_len: int) -> BlockSizes:
        """Defaults from Triton's register counts for sm_90 (ptxas, no spills), not from GPU timings:
        benchmarks/kernels.py --sweep times the alternatives."""
        padded = padded_width(seq_len)
        if padded <= SINGLE_BLOCK_MAX:
            # Backward: dk and dv of up to 128 keys stay in registers, so 32-row query chunks and 8
            # warps (64-row chunks spill at 255 registers).
            return cls(block_q=min(padded, 64), block_k=padded, block_q_bwd=min(padded, 32),
                       block_k_bwd=padded, num_warps=4, num_warps_bwd=4 if padded <= 64 else 8)
        return cls(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32)

    def validate(self, seq_len: int) -> None:
        for name, value in dataclasses.asdict(self).items():
            if name.startswith("block") and (value < 16 or value & (value - 1)):
                raise ValueError(f"BlockSizes.{name}={value} must be a power of two >= 16 (Triton tiles)")
        single = self.block_k_bwd >= seq_len
        if not single and self.block_q_bwd != self.block_k_bwd:
            raise ValueError(f"BlockSizes: the two-scan backward (seq {seq_len} > block_k_bwd "
                             f"{self.block_k_bwd}) needs block_q_bwd == block_k_bwd")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_mask(start, size: int, seq_len: int) -> jax.Array:
    return start + jnp.arange(size) < seq_len


def _tile_mask(rows: jax.Array, head_dim: int, width: int) -> jax.Array:
    """[size, width] mask of the real rows and, when head_dim was padded, the real columns."""
    mask = rows[:, None]
    if width != head_dim:
        mask = mask & (jnp.arange(width) < head_dim)[None, :]
    return mask


# Forward -----------------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, seq_len: int, head_dim: int, scale: float,
                block_q: int, block_k: int):
    """One query block of one (batch, head). q_ref/o_ref [block_q, D]; k_ref/v_ref [S_k, D]; lse_ref [block_q]."""
    width = q_ref.shape[-1]
    q_rows = _row_mask(pl.program_id(0) * block_q, block_q, seq_len)
    q_mask = _tile_mask(q_rows, head_dim, width)
    q = load(q_ref, mask=q_mask, other=0.0)

    def step(j, carry):
        acc, m_prev, l_prev = carry
        keys = _row_mask(j * block_k, block_k, seq_len)
        kv_mask = _tile_mask(keys, head_dim, width)
        k = load(k_ref.at[pl.ds(j * block_k, block_k), :], mask=kv_mask, other=0.0)
        v = load(v_ref.at[pl.ds(j * block_k, block_k), :], mask=kv_mask, other=0.0)
        s = dot(q, k.T) * (scale * LOG2E)  # f32 [block_q, block_k], log2 units
        s = jnp.where(keys[None, :], s, -jnp.inf)
        m = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m)
        p = jnp.exp2(s - m[:, None])
        acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
        return acc, m, l_prev * correction + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_q, width), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(0, pl.cdiv(seq_len, block_k), step, init)  # noqa: E741  (flash notation)
    store(o_ref, (acc / l[:, None]).astype(o_ref.dtype), mask=q_mask)
    store(lse_ref, m + jnp.log2(l), mask=q_rows)


def _forward(q, k, v, scale: float, blocks: BlockSizes, interpret: bool):
    """-> out [B, S, H, D] in q.dtype, lse f32[B, H, S] (base 2)."""
    batch, seq_len, heads, head_dim = q.shape
    width = padded_width(head_dim)
    seq_k = _round_up(seq_len, blocks.block_k)
    kernel = functools.partial(_fwd_kernel, seq_len=seq_len, head_dim=head_dim, scale=scale,
                               block_q=blocks.block_q, block_k=blocks.block_k)
    # Query blocks vary fastest, so the programs sharing one (batch, head)'s keys run together.
    q_spec = pl.BlockSpec((None, blocks.block_q, None, width), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, seq_k, None, width), lambda i, b, h: (b, 0, h, 0))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(seq_len, blocks.block_q), batch, heads),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, blocks.block_q), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)],
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="hrm_attention_fwd",
    )(q, k, v)


# Backward ----------------------------------------------------------------------------------
def _grad_tiles(q, k, v, do, lse, delta, keys, scale: float):
    """The flash-attention-2 backward of one (query tile, key tile) pair.

    -> (p^T do, ds) with ds = p * (do v^T - delta) * scale, the logit gradient; p is recomputed
    from the saved base-2 log-sum-exp. Padded queries have q = do = 0 and contribute nothing.
    """
    s = dot(q, k.T) * (scale * LOG2E)
    s = jnp.where(keys[None, :], s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    dv = dot(p.astype(do.dtype).T, do)
    ds = p * (dot(do, v.T) - delta[:, None]) * scale
    return dv, ds


def _bwd_single_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, dk_ref, dv_ref, *,
                       seq_len: int, head_dim: int, scale: float, block_q: int):
    """All keys of one (batch, head) in one block: dq per query chunk, dk and dv accumulated.

    delta = rowsum(o * do) is computed here: each query chunk is visited exactly once.
    """
    width = q_ref.shape[-1]
    block_k = k_ref.shape[0]
    keys = _row_mask(0, block_k, seq_len)
    kv_mask = _tile_mask(keys, head_dim, width)
    k = load(k_ref, mask=kv_mask, other=0.0)
    v = load(v_ref, mask=kv_mask, other=0.0)

    def step(i, carry):
        dk, dv = carry
        chunk = pl.ds(i * block_q, block_q)
        rows = _row_mask(i * block_q, block_q, seq_len)
        mask = _tile_mask(rows, head_dim, width)
        q = load(q_ref.at[chunk, :], mask=mask, other=0.0)
        do = load(do_ref.at[chunk, :], mask=mask, other=0.0)
        o = load(o_ref.at[chunk, :], mask=mask, other=0.0)
        lse = load(lse_ref.at[chunk], mask=rows, other=0.0)
        delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
        dv_part, ds = _grad_tiles(q, k, v, do, lse, delta, keys, scale)
        store(dq_ref.at[chunk, :], dot(ds.astype(k.dtype), k).astype(dq_ref.dtype), mask=mask)
        return dk + dot(ds.astype(q.dtype).T, q), dv + dv_part

    zeros = jnp.zeros((block_k, width), jnp.float32)
    dk, dv = lax.fori_loop(0, pl.cdiv(seq_len, block_q), step, (zeros, zeros))
    store(dk_ref, dk.astype(dk_ref.dtype), mask=kv_mask)
    store(dv_ref, dv.astype(dv_ref.dtype), mask=kv_mask)


def _bwd_blocked_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *,
                        seq_len: int, head_dim: int, scale: float, block: int):
    """Program j: dk, dv of key block j over all query blocks, then dq of query block j over all keys."""
    width = q_ref.shape[-1]
    j = pl.program_id(0)
    num_blocks = pl.cdiv(seq_len, block)

    def tiles(start, refs):
        rows = _row_mask(start, block, seq_len)
        mask = _tile_mask(rows, head_dim, width)
        return rows, [load(ref.at[pl.ds(start, block), :], mask=mask, other=0.0) for ref in refs]

    def vector(ref, start, rows):
        return load(ref.at[pl.ds(start, block)], mask=rows, other=0.0)

    keys, (k, v) = tiles(j * block, (k_ref, v_ref))

    def dkdv_step(i, carry):
        dk, dv = carry
        rows, (q, do) = tiles(i * block, (q_ref, do_ref))
        lse, delta = vector(lse_ref, i * block, rows), vector(delta_ref, i * block, rows)
        dv_part, ds = _grad_tiles(q, k, v, do, lse, delta, keys, scale)
        return dk + dot(ds.astype(q.dtype).T, q), dv + dv_part

    zeros = jnp.zeros((block, width), jnp.float32)
    dk, dv = lax.fori_loop(0, num_blocks, dkdv_step, (zeros, zeros))
    kv_mask = _tile_mask(keys, head_dim, width)
    store(dk_ref, dk.astype(dk_ref.dtype), mask=kv_mask)
    store(dv_ref, dv.astype(dv_ref.dtype), mask=kv_mask)

    rows, (q, do) = tiles(j * block, (q_ref, do_ref))
    lse, delta = vector(lse_ref, j * block, rows), vector(delta_ref, j * block, rows)

    def dq_step(i, dq):
        keys_i, (k_i, v_i) = tiles(i * block, (k_ref, v_ref))
        _, ds = _grad_tiles(q, k_i, v_i, do, lse, delta, keys_i, scale)
        return dq + dot(ds.astype(k_i.dtype), k_i)

    dq = lax.fori_loop(0, num_blocks, dq_step, zeros)
    store(dq_ref, dq.astype(dq_ref.dtype), mask=_tile_mask(rows, head_dim, width))


def _backward(q, k, v, out, lse, do, scale: float, blocks: BlockSizes, interpret: bool):
    batch, seq_len, heads, head_dim = q.shape
    width = padded_width(head_dim)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    params = compiler_params(blocks.num_warps_bwd, blocks.num_stages)
    common = {"seq_len": seq_len, "head_dim": head_dim, "scale": scale}

    def whole(length):  # one (batch, head)'s full sequence, padded to `length` rows
        return pl.BlockSpec((None, length, None, width), lambda j, b, h: (b, 0, h, 0))

    def whole_vector(length):
        return pl.BlockSpec((None, None, length), lambda j, b, h: (b, h, 0))

    if blocks.block_k_bwd >= seq_len:
        seq_q = _round_up(seq_len, blocks.block_q_bwd)
        kernel = functools.partial(_bwd_single_kernel, block_q=blocks.block_q_bwd, **common)
        in_specs = [whole(seq_q), whole(blocks.block_k_bwd), whole(blocks.block_k_bwd), whole(seq_q),
                    whole(seq_q), whole_vector(seq_q)]
        out_specs = [whole(seq_q), whole(blocks.block_k_bwd), whole(blocks.block_k_bwd)]
        return pl.pallas_call(kernel, grid=(1, batch, heads), in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, compiler_params=params, interpret=interpret,
                              name="hrm_attention_bwd")(q, k, v, out, do, lse)

    # delta = rowsum(o * do) once, in XLA (one fused reduction): scan 1 reads every query block
    # once per key block, so computing it in the kernel would redo it num_blocks times. A multiply
    # and sum, not an einsum, which XLA could hand to a TF32 matmul.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    block = blocks.block_k_bwd
    padded = _round_up(seq_len, block)
    tile = pl.BlockSpec((None, block, None, width), lambda j, b, h: (b, j, h, 0))
    kernel = functools.partial(_bwd_blocked_kernel, block=block, **common)
    in_specs = [whole(padded)] * 4 + [whole_vector(padded)] * 2
    return pl.pallas_call(kernel, grid=(pl.cdiv(seq_len, block), batch, heads), in_specs=in_specs,
                          out_specs=[tile] * 3, out_shape=out_shape, compiler_params=params,
                          interpret=interpret, name="hrm_attention_bwd")(q, k, v, do, lse, delta)


# Public API --------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, scale, blocks, interpret):
    return _forward(q, k, v, scale, blocks, interpret)[0]


def _attention_fwd(q, k, v, scale, blocks, interpret):
    out, lse = _forward(q, k, v, scale, blocks, interpret)
    return out, (q, k, v, out, lse)


def _attention_bwd(scale, blocks, interpret, residuals, do):
    q, k, v, out, lse = residuals
    return _backward(q, k, v, out, lse, do, scale, blocks, interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """Non-causal softmax attention; q, k, v, result: [batch, seq, heads, head_dim], one dtype.

    scale defaults to 1/sqrt(head_dim); block_sizes to `BlockSizes.for_shape(seq)`. interpret=None
    runs the Triton kernels on GPU and Pallas interpret mode elsewhere (with a warning).
    """
    if not (q.shape == k.shape == v.shape and q.ndim == 4):
        raise ValueError(f"attention: q, k, v must share one [batch, seq, heads, head_dim] shape, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    seq_len, head_dim = q.shape[1], q.shape[3]
    blocks = block_sizes or BlockSizes.for_shape(seq_len)
    blocks.validate(seq_len)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    interpret = default_interpret() if interpret is None else interpret
    return _attention(q, k, v, scale, blocks, interpret)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None) -> jax.Array:
    """Plain jnp, as jax.nn.dot_product_attention(implementation="xla") computes it."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
