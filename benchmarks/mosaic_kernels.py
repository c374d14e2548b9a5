"""Tune and time the Mosaic GPU kernel (fused SwiGLU matmul), then the whole step and rollout with it.

    python -m benchmarks.mosaic_kernels [--rows 768x82] [--iters 50] [--whole | --whole-only] [--out DIR]

swiglu_matmul (kernels_pallas/swiglu_matmul.py) at HRM's hidden 512 and SwiGLU width 1536, bf16: for
each candidate tile config, the median forward time over --iters synchronised calls, TFLOP/s, and
the normwise error against the XLA reference, beside two XLA rows: the reference itself (two
matmuls and the silu * up pass) and the ceiling, `x @ W_gate_up` alone. --whole then makes the
fastest config the default and times the Sudoku-Extreme train step (batch 768) and rollout (batch
1024), cuDNN attention, with mlp_impl pallas and xla. Merges the numbers into
benchmarks/results/<gpu>-<date>.json (or --out) under "mosaic_kernels".

The fused projection + residual add + RMSNorm kernel this script also timed was dropped (commit
7740b86 has it; BUILD_NOTES.md, GPU speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.kernels import SWIGLU_TILES, _normwise_error, _shape
from kernels_pallas import swiglu_matmul as swiglu

HIDDEN, INTER = 512, 1536
MLP_IMPLS = ("pallas", "xla")


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
            row["error"] = _normwise_error(run(*inputs[0]), want)
        row.update(ms=1e3 * timing["median_s"], tflops=flops / timing["median_s"] / 1e12)
    except Exception as error:  # noqa: BLE001 - a config over the SMEM limit is reported, not fatal
        row["failed"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    print(f"{name:>24} {row.get('ms', float('nan')):8.3f} ms {row.get('tflops', float('nan')):7.1f} TFLOP/s "
          f"err {row.get('error', float('nan')):8.1e}  {row['tiles'] or ''} {row.get('failed', '')}", flush=True)
    return row


def sweep(rows: int, iters: int) -> list[dict]:
    rng = np.random.default_rng(0)
    inputs = [(_random(rng, (rows, HIDDEN)), _random(rng, (HIDDEN, 2 * INTER), HIDDEN ** -0.5)) for _ in range(2)]
    want = np.asarray(jax.jit(swiglu.swiglu_matmul_reference)(*inputs[0]), np.float32)
    flops = 4.0 * rows * HIDDEN * INTER
    out = [_row("xla reference", None, swiglu.swiglu_matmul_reference, inputs, want, flops, iters),
           _row("xla matmul only", None, jnp.dot, inputs, want, flops, iters)]
    for tiles in [swiglu.TileConfig()] + SWIGLU_TILES:
        out.append(_row("pallas", tiles, lambda x, w, t=tiles: swiglu.swiglu_matmul(x, w, tiles=t),
                        inputs, want, flops, iters))
    return [dict(r, rows=rows) for r in out]


def whole_step_and_rollout(iters: int) -> list[dict]:
    from benchmarks.rollout import _randomise_heads, bench_jax  # noqa: PLC0415
    from benchmarks.train_step import bench_train_step  # noqa: PLC0415
    from hrm_jax.model import init_params  # noqa: PLC0415
    from hrm_jax.presets import MODEL_PRESETS  # noqa: PLC0415

    rows = []
    for mlp in MLP_IMPLS:
        row = bench_train_step("sudoku_extreme", 768, iters, 5, "cudnn", "xla", 1, mlp)
        rows.append(row)
        print(f"train step, mlp {mlp}: {1e3 * row['median_s']:.2f} ms, {row['examples_per_s']:.0f} ex/s, "
              f"MFU {row.get('mfu', float('nan')):.1%}", flush=True)
    config = MODEL_PRESETS["sudoku_extreme"](attention_impl="cudnn")
    params = _randomise_heads(jax.device_get(init_params(config, jax.random.key(0))))
    for mlp in MLP_IMPLS:
        row = bench_jax(config.replace(mlp_impl=mlp), params, 1024, iters, 3)
        rows.append(dict(row, mlp_impl=mlp))
        print(f"rollout 1024, mlp {mlp}: {row['puzzles_per_s']:.1f} puzzles/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_shape, default=(768, 82), help="BATCHxSEQ of the kernel sweep")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--whole", action="store_true",
                        help="then time the train step and rollout with the fastest tiles as the default")
    parser.add_argument("--whole-only", action="store_true", help="skip the sweep: --whole with the default tiles")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        parser.exit(2, "benchmarks.mosaic_kernels: needs a Hopper GPU\n")
    results = {}
    if not args.whole_only:
        results["sweep"] = sweep(args.rows[0] * args.rows[1], args.iters)
        timed = [r for r in results["sweep"] if r["tiles"] and "ms" in r]
        if not timed:
            parser.exit(1, "benchmarks.mosaic_kernels: no tile config ran\n")
        results["fastest"] = min(timed, key=lambda r: r["ms"])["tiles"]
        print("fastest:", results["fastest"])
        swiglu.DEFAULT_TILES = swiglu.TileConfig(**results["fastest"])
    path = common.save_results("mosaic_kernels", results, args.out)
    if args.whole or args.whole_only:
        results["whole"] = whole_step_and_rollout(args.iters)
        path = common.save_results("mosaic_kernels", results, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
