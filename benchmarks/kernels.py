"""Time the Pallas kernels (kernels_pallas/) against XLA, forward and forward + backward.

    python -m benchmarks.kernels [--shape 384x82 --shape 768x82 --shape 32x900] [--iters 50] [--sweep]

A shape is batch x seq at HRM's hidden 512 (8 heads of 64, SwiGLU width 1536), bfloat16 (swiglu: the
fused silu(x W_gate) * (x W_up) matmul, forward only; its backward is XLA's by design): Sudoku-Extreme
runs seq 82 (81 cells + the puzzle-embedding slot) at global batch 384 or 768, Maze/ARC seq 900.
Per kernel and shape: the median over --iters synchronised calls of the jitted forward and of the
jitted forward + vjp of a random cotangent (warm-up and compilation excluded, two input sets
rotated), for the Pallas kernel, XLA, and cuDNN attention where it runs; the Pallas results' normwise
error against XLA's. --sweep also times a few block sizes per kernel (the defaults were chosen
without a GPU). A config that fails to compile or run is reported and skipped. Merges the numbers
into benchmarks/results/<gpu>-<date>.json (or --out) under "kernels".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from hrm_jax.layers import rms_norm
from kernels_pallas import attention as attn
from kernels_pallas import rms_norm as norm
from kernels_pallas import swiglu_matmul as swiglu

HIDDEN, HEADS, EPS, INTER = 512, 8, 1e-5, 1536
DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What to time: input and cotangent shapes for (batch, seq), and fn(*inputs) per implementation."""

    name: str
    input_shapes: Callable[[int, int], list[tuple[int, ...]]]
    output_shape: Callable[[int, int], tuple[int, ...]]
    impls: Callable[[Any, bool], dict[str, Callable]]  # (block sizes or None, interpret) -> {impl: fn}
    flops: Callable[[int, int], float] | None = None  # forward FLOPs (attention)


def _attention_impls(blocks, interpret):
    return {"pallas": lambda q, k, v: attn.attention(q, k, v, block_sizes=blocks, interpret=interpret),
            "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")}


def _norm_impls(blocks, interpret):
    return {"pallas": lambda h, d: norm.add_rms_norm(h, d, EPS, block_sizes=blocks, interpret=interpret),
            "xla": lambda h, d: rms_norm(h + d, EPS)}


# Tile configs tried besides the default (benchmarks.mosaic_kernels sweeps the same ones). SMEM per
# stage: 2 tile_m x tile_k + 2 tile_k x tile_n bf16, plus the epilogue's staging slots.
SWIGLU_TILES = [swiglu.TileConfig(tile_m=64, tile_n=n, tile_k=k, stages=s, epilogue_n=e, delay_release=d)
                for n, k, s, e, d in [(128, 64, 3, 64, 0), (128, 64, 4, 64, 1), (128, 128, 2, 64, 0),
                                      (64, 64, 4, 64, 1)]]


def _swiglu_impls(tiles, interpret):
    return {"pallas": lambda x, w: swiglu.swiglu_matmul(x, w, tiles=tiles, interpret=interpret),
            "xla": swiglu.swiglu_matmul_reference}


KERNELS = {
    "attention": Kernel("attention", lambda b, s: [(b, s, HEADS, HIDDEN // HEADS)] * 3,
                        lambda b, s: (b, s, HEADS, HIDDEN // HEADS), _attention_impls,
                        flops=lambda b, s: 4.0 * b * HEADS * s * s * (HIDDEN // HEADS)),
    "add_rms_norm": Kernel("add_rms_norm", lambda b, s: [(b, s, HIDDEN)] * 2, lambda b, s: (b, s, HIDDEN),
                           _norm_impls),
    "swiglu": Kernel("swiglu", lambda b, s: [(b, s, HIDDEN), (HIDDEN, 2 * INTER)], lambda b, s: (b, s, INTER),
                     _swiglu_impls, flops=lambda b, s: 4.0 * b * s * HIDDEN * INTER),
}


def _sweep_blocks(kernel: str, seq: int) -> list:
    """A few block sizes around the defaults (the first entry is the default)."""
    if kernel == "attention":
        base = attn.BlockSizes.for_shape(seq)
        fields = ("block_q", "block_k", "num_warps")
        fwd = [(32, 128, 4), (128, 128, 8), (32, 32, 4), (64, 64, 4)] if seq <= 128 else \
              [(128, 64, 4), (128, 64, 8), (64, 128, 4), (128, 128, 8), (32, 64, 4)]
        # Backward: (query rows, keys per program, warps); keys >= seq is the single-pass backward.
        bwd = [(16, 128, 8), (64, 128, 8), (32, 128, 4)] if seq <= 128 else []
        bwd += [(32, 32, 2), (64, 64, 4), (64, 64, 8), (16, 16, 2), (128, 128, 8)]
        variants = [dict(zip(fields, v)) for v in fwd]
        variants += [dict(zip(("block_q_bwd", "block_k_bwd", "num_warps_bwd"), v)) for v in bwd]
        variants += [{"num_stages": s} for s in (1, 3)]
        return [base] + [dataclasses.replace(base, **v) for v in variants]
    if kernel == "swiglu":
        return [swiglu.TileConfig()] + SWIGLU_TILES
    base = norm.BlockSizes.for_shape(HIDDEN)
    return [base] + [norm.BlockSizes(block_rows=rows, num_warps=w)
                     for rows, w in [(1, 1), (1, 2), (2, 2), (4, 4), (16, 4), (16, 8), (32, 8)]]


def _random_sets(shapes, count: int, seed: int) -> list[tuple[jax.Array, ...]]:
    """`count` input tuples on the device, unit normals (never zeros: XLA may skip work on them)."""
    rng = np.random.default_rng(seed)
    return [tuple(jax.device_put(jnp.asarray(rng.standard_normal(s, np.float32), DTYPE)) for s in shapes)
            for _ in range(count)]


def _normwise_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def time_impl(fn: Callable, inputs: list, cotangents: list, iters: int, warmup: int) -> dict[str, Any]:
    """Median seconds of the forward and of forward + vjp; -> also the first set's outputs (host)."""
    forward = jax.jit(fn)

    @jax.jit
    def forward_backward(args, cotangent):
        # The output is returned too: a kernel whose residuals are only its inputs would otherwise
        # have its forward removed as dead code.
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    n = len(inputs)
    fwd = common.time_calls(lambda i: forward(*inputs[i % n]), jax.block_until_ready, warmup=warmup, iters=iters)
    both = common.time_calls(lambda i: forward_backward(inputs[i % n], cotangents[i % n]), jax.block_until_ready,
                             warmup=warmup, iters=iters)
    # The forward output from the plain forward: under vjp a kernel may run another forward rule (swiglu).
    outputs = jax.device_get((forward(*inputs[0]), forward_backward(inputs[0], cotangents[0])[1]))
    return {"fwd": fwd, "fwd_bwd": both}, outputs


def bench_kernel(kernel: Kernel, batch: int, seq: int, iters: int, warmup: int, blocks=None,
                 impls: tuple[str, ...] | None = None, interpret: bool = False) -> list[dict[str, Any]]:
    inputs = _random_sets(kernel.input_shapes(batch, seq), 2, seed=batch + seq)
    cotangents = [s[0] for s in _random_sets([kernel.output_shape(batch, seq)], 2, seed=1)]
    rows, outputs = [], {}
    fns = kernel.impls(blocks, interpret)
    for impl in impls or tuple(fns):
        row = {"kernel": kernel.name, "batch": batch, "seq": seq, "impl": impl,
               "block_sizes": dataclasses.asdict(blocks) if (impl == "pallas" and blocks) else None}
        try:
            timing, outputs[impl] = time_impl(fns[impl], inputs, cotangents, iters, warmup)
        except Exception as error:  # noqa: BLE001 - report and go on: one failing config must not end the run
            row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
            rows.append(row)
            continue
        row.update(fwd_ms=1e3 * timing["fwd"]["median_s"], fwd_bwd_ms=1e3 * timing["fwd_bwd"]["median_s"],
                   fwd_min_ms=1e3 * timing["fwd"]["min_s"], fwd_bwd_min_ms=1e3 * timing["fwd_bwd"]["min_s"],
                   iters=iters)
        if kernel.flops:
            # fwd+bwd counted as 3x the forward (backward = 2 forwards; the kernel's recompute not counted).
            row["fwd_tflops"] = kernel.flops(batch, seq) / timing["fwd"]["median_s"] / 1e12
            row["fwd_bwd_tflops"] = 3 * kernel.flops(batch, seq) / timing["fwd_bwd"]["median_s"] / 1e12
        rows.append(row)
    if "xla" in outputs:
        (want_out, want_grads) = outputs["xla"]
        for row in rows:
            if row["impl"] != "xla" and row["impl"] in outputs:
                got_out, got_grads = outputs[row["impl"]]
                row["fwd_error"] = _normwise_error(got_out, want_out)
                row["grad_error"] = max(_normwise_error(g, w) for g, w in zip(got_grads, want_grads))
        xla = next(r for r in rows if r["impl"] == "xla")
        for row in rows:
            if "fwd_ms" in row and "fwd_ms" in xla:
                row["fwd_speedup_vs_xla"] = xla["fwd_ms"] / row["fwd_ms"]
                row["fwd_bwd_speedup_vs_xla"] = xla["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def sweep(kernel: Kernel, batch: int, seq: int, iters: int, warmup: int,
          interpret: bool = False) -> list[dict[str, Any]]:
    rows = []
    for blocks in _sweep_blocks(kernel.name, seq):
        rows += bench_kernel(kernel, batch, seq, iters, warmup, blocks, impls=("pallas",), interpret=interpret)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'kernel':>12} {'shape':>8} {'impl':>6} {'fwd ms':>8} {'f+b ms':>8} {'fwd x':>6} {'f+b x':>6} "
          f"{'fwd err':>8} {'grad err':>8}  blocks / error")
    for r in rows:
        shape = f"{r['batch']}x{r['seq']}"
        if "error" in r:
            print(f"{r['kernel']:>12} {shape:>8} {r['impl']:>6}  FAILED  {r['error']}")
            continue
        blocks = "" if not r["block_sizes"] else " ".join(f"{k}={v}" for k, v in r["block_sizes"].items())
        print(f"{r['kernel']:>12} {shape:>8} {r['impl']:>6} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
              f"{r.get('fwd_speedup_vs_xla', float('nan')):6.2f} {r.get('fwd_bwd_speedup_vs_xla', float('nan')):6.2f} "
              f"{r.get('fwd_error', float('nan')):8.1e} {r.get('grad_error', float('nan')):8.1e}  {blocks}")


def print_fastest(rows: list[dict[str, Any]]) -> None:
    for seq in dict.fromkeys(r["seq"] for r in rows):
        ok = [r for r in rows if r["seq"] == seq and "error" not in r]
        for key, label in (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward+backward")) if ok else ():
            best = min(ok, key=lambda r: r[key])
            print(f"fastest {best['kernel']} {label} at seq {seq} ({best[key]:.3f} ms): {best['block_sizes']}")


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ such as 384x82, got {text!r}") from None
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"batch and seq must be positive, got {text!r}")
    return batch, seq


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_shape, action="append",
                        help="BATCHxSEQ (repeatable; default 384x82, 768x82, 32x900)")
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="kernel(s) to time (default all)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sweep", action="store_true",
                        help="also time a few block sizes per kernel at the first shape of each seq")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Pallas kernels in interpret mode: a CPU smoke test of this script, "
                             "timings meaningless")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.interpret:
        parser.exit(2, f"benchmarks.kernels: needs a GPU (the default backend is {jax.default_backend()!r}); "
                       "--interpret smoke-tests the script on CPU\n")
    # jax >= 0.11 marks the Pallas Triton backend deprecated at every lowering; say it once, here.
    warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
    shapes = args.shape or [(384, 82), (768, 82), (32, 900)]
    rows, sweeps, path = [], [], None
    for name in args.kernel or list(KERNELS):
        kernel_rows = [row for batch, seq in shapes
                       for row in bench_kernel(KERNELS[name], batch, seq, args.iters, args.warmup,
                                               interpret=args.interpret)]
        print_table(kernel_rows)
        rows += kernel_rows
        if args.sweep:
            kernel_sweeps = []
            for seq in dict.fromkeys(s for _, s in shapes):  # at the first batch of each seq
                batch = next(b for b, s in shapes if s == seq)
                kernel_sweeps += sweep(KERNELS[name], batch, seq, args.iters, args.warmup, args.interpret)
            print(f"\n{name} block-size sweep (the first row of each seq is the default):")
            print_table(kernel_sweeps)
            print_fastest(kernel_sweeps)
            sweeps += kernel_sweeps
        print()
        # Saved after every kernel, so a crash later keeps what was measured.
        path = common.save_results("kernels", {"rows": rows, "sweep": sweeps}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
