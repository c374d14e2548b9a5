"""Tune and time the Mosaic GPU kernels on this GPU, then the whole step and rollout with them.

    python -m benchmarks.mosaic_kernels [--rows 768x82] [--iters 50] [--whole] [--out DIR]

Kernels (bf16, HRM's hidden 512, SwiGLU width 1536): swiglu_matmul (x [rows, 512] -> silu(x W_gate) *
(x W_up)) and matmul_add_rms_norm (rms_norm(h + x W) with x of width 512, as o_proj, and 1536, as
down_proj). For each candidate tile config: the median forward time over --iters synchronised
calls, TFLOP/s, and the normwise error against the XLA reference, beside two XLA rows: the
reference itself and the ceiling, its matmul alone (no activation, add or norm). --whole then makes
the fastest configs the defaults and times the Sudoku-Extreme train step (batch 768) and rollout
(batch 1024), cuDNN attention, for mlp/norm implementations xla/xla, pallas/xla and
pallas/pallas_matmul (the last no longer wired into the model). Merges the numbers into benchmarks/results/<gpu>-<date>.json (or --out)
under "mosaic_kernels".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.kernels import _shape
from kernels_pallas import matmul_add_rms_norm as norm
from kernels_pallas import swiglu_matmul as swiglu

HIDDEN, INTER, EPS = 512, 1536, 1e-5
SWIGLU_TILES = [swiglu.TileConfig(tile_m=64, tile_n=n, tile_k=k, stages=s, epilogue_n=e, delay_release=d)
                for n, k, s, e, d in [(128, 64, 3, 128, 1), (128, 64, 3, 64, 0), (128, 64, 4, 64, 1),
                                      (128, 128, 2, 64, 0)]]
# tile_k 32 (a 64-byte swizzle) fails Mosaic GPU's layout inference here (H100, jax 0.11.2); 128 needs
# more SMEM than there is with the 64 KB output tile.
NORM_TILES = [norm.TileConfig(tile_m=64, tile_k=64, stages=2, delay_release=d) for d in (0, 1)]
# (mlp_impl, norm_impl). ("pallas", "pallas_matmul") was measured through a model wiring that is not
# kept (BUILD_NOTES, session 6).
WHOLE_IMPLS = [("pallas", "xla"), ("xla", "xla")]


def _random(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * scale, jnp.bfloat16)


def _row(name, tiles, fn, inputs, want, flops, iters) -> dict:
    """Median forward time of fn over the rotated input sets; error against `want` for kernels."""
    row = {"impl": name, "tiles": dataclasses.asdict(tiles) if tiles else None}
    try:
        run = jax.jit(fn)
        timing = common.time_calls(lambda i: run(*inputs[i % len(inputs)]), jax.block_until_ready,
                                   warmup=3, iters=iters)
        if tiles is not None:
            got = np.asarray(run(*inputs[0]), np.float32)
            row["error"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        row.update(ms=1e3 * timing["median_s"], tflops=flops / timing["median_s"] / 1e12)
    except Exception as error:  # noqa: BLE001 - a config over the SMEM limit is reported, not fatal
        row["failed"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    print(f"{name:>24} {row.get('ms', float('nan')):8.3f} ms {row.get('tflops', float('nan')):7.1f} TFLOP/s "
          f"err {row.get('error', float('nan')):8.1e}  {row['tiles'] or ''} {row.get('failed', '')}", flush=True)
    return row


def sweep_swiglu(rows: int, iters: int) -> list[dict]:
    rng = np.random.default_rng(0)
    inputs = [(_random(rng, (rows, HIDDEN)), _random(rng, (HIDDEN, 2 * INTER), HIDDEN ** -0.5)) for _ in range(2)]
    want = np.asarray(jax.jit(swiglu.swiglu_matmul_reference)(*inputs[0]), np.float32)
    flops = 4.0 * rows * HIDDEN * INTER
    out = [_row("swiglu xla reference", None, swiglu.swiglu_matmul_reference, inputs, want, flops, iters),
           _row("swiglu xla matmul only", None, jnp.dot, inputs, want, flops, iters)]
    for tiles in SWIGLU_TILES:
        out.append(_row("swiglu pallas", tiles, lambda x, w, t=tiles: swiglu.swiglu_matmul(x, w, tiles=t),
                        inputs, want, flops, iters))
    return [dict(r, kernel="swiglu_matmul", rows=rows) for r in out]


def sweep_norm(rows: int, k_dim: int, iters: int) -> list[dict]:
    rng = np.random.default_rng(1)
    inputs = [(_random(rng, (rows, HIDDEN)), _random(rng, (rows, k_dim)), _random(rng, (k_dim, HIDDEN), k_dim ** -0.5))
              for _ in range(2)]
    reference = lambda h, x, w: norm.matmul_add_rms_norm_reference(h, x, w, EPS)  # noqa: E731
    want = np.asarray(jax.jit(reference)(*inputs[0]), np.float32)
    flops = 2.0 * rows * k_dim * HIDDEN
    out = [_row(f"norm k={k_dim} xla reference", None, reference, inputs, want, flops, iters),
           _row(f"norm k={k_dim} xla matmul only", None, lambda h, x, w: jnp.dot(x, w), inputs, want, flops, iters)]
    for tiles in NORM_TILES:
        out.append(_row(f"norm k={k_dim} pallas", tiles,
                        lambda h, x, w, t=tiles: norm.matmul_add_rms_norm(h, x, w, EPS, tiles=t),
                        inputs, want, flops, iters))
    return [dict(r, kernel="matmul_add_rms_norm", rows=rows, k=k_dim) for r in out]


def _fastest(rows: list[dict]):
    """The tile config with the least total time over the shapes it ran at (None if none ran)."""
    totals: dict[tuple, float] = {}
    for r in rows:
        if r["tiles"] and "ms" in r:
            key = tuple(r["tiles"].items())
            totals[key] = totals.get(key, 0.0) + r["ms"]
    return dict(min(totals, key=totals.get)) if totals else None


def whole_step_and_rollout(iters: int) -> list[dict]:
    from benchmarks.rollout import _randomise_heads, bench_jax  # noqa: PLC0415
    from benchmarks.train_step import bench_train_step  # noqa: PLC0415
    from hrm_jax.config import MODEL_PRESETS  # noqa: PLC0415
    from hrm_jax.model import init_params  # noqa: PLC0415

    rows = []
    for mlp, norm_impl in WHOLE_IMPLS:
        row = bench_train_step("sudoku_extreme", 768, iters, 5, "cudnn", norm_impl, 1, mlp)
        rows.append(row)
        print(f"train step, mlp {mlp}, norm {norm_impl}: {1e3 * row['median_s']:.2f} ms, "
              f"{row['examples_per_s']:.0f} ex/s, MFU {row.get('mfu', float('nan')):.1%}", flush=True)
    config = MODEL_PRESETS["sudoku_extreme"](attention_impl="cudnn")
    params = _randomise_heads(jax.device_get(init_params(config, jax.random.key(0))))
    for mlp, norm_impl in WHOLE_IMPLS:
        row = bench_jax(config.replace(mlp_impl=mlp, norm_impl=norm_impl), params, 1024, iters, 3)
        rows.append(dict(row, mlp_impl=mlp, norm_impl=norm_impl))
        print(f"rollout 1024, mlp {mlp}, norm {norm_impl}: {row['puzzles_per_s']:.1f} puzzles/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_shape, default=(768, 82), help="BATCHxSEQ of the kernel sweeps")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--whole", action="store_true",
                        help="then time the train step and rollout with the fastest tiles as defaults")
    parser.add_argument("--whole-only", action="store_true", help="skip the sweeps: --whole with the default tiles")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        parser.exit(2, "benchmarks.mosaic_kernels: needs a Hopper GPU\n")
    if args.whole_only:
        path = common.save_results("mosaic_kernels", {"whole": whole_step_and_rollout(args.iters)}, args.out)
        print(f"results: {path}")
        return 0
    rows = args.rows[0] * args.rows[1]
    results = {"swiglu": sweep_swiglu(rows, args.iters),
               "norm": sweep_norm(rows, HIDDEN, args.iters) + sweep_norm(rows, INTER, args.iters)}
    best_swiglu, best_norm = _fastest(results["swiglu"]), _fastest(results["norm"])
    results["fastest"] = {"swiglu": best_swiglu, "norm": best_norm}
    print("fastest:", results["fastest"])
    path = common.save_results("mosaic_kernels", results, args.out)
    if args.whole:
        if best_swiglu:
            swiglu.DEFAULT_TILES = swiglu.TileConfig(**best_swiglu)
        if best_norm:
            norm.DEFAULT_TILES = norm.TileConfig(**best_norm)
        results["whole"] = whole_step_and_rollout(30)
        path = common.save_results("mosaic_kernels", results, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
