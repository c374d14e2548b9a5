"""Choose the fused SwiGLU kernel's tiles on this GPU, then time the whole step and rollout with them.

    python -m benchmarks.swiglu_tiles [--rows 768x82] [--iters 50] [--whole] [--out DIR]

For each candidate TileConfig (kernels_pallas/swiglu_matmul.py): the median forward time over
--iters synchronised calls at hidden 512 / width 1536 (bf16), its TFLOP/s, its normwise error
against the XLA reference, beside two XLA rows: the reference (two matmuls and the silu * up pass)
and the ceiling `x @ W_gate_up` alone (the matmul with no activation at all). --whole then sets the
fastest config as the default and times the Sudoku-Extreme train step (batch 768) and rollout
(batch 1024), cuDNN attention, with mlp_impl xla and pallas. Merges the numbers into
benchmarks/results/<gpu>-<date>.json (or --out) under "swiglu_tiles".
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
from kernels_pallas import swiglu_matmul as swiglu

HIDDEN, INTER = 512, 1536
CANDIDATES = [swiglu.TileConfig(tile_m=64, tile_n=n, tile_k=k, stages=s, epilogue_n=e, delay_release=d)
              for n, k, s, e, d in [(128, 64, 3, 64, 0), (128, 128, 2, 64, 0), (128, 64, 4, 64, 0),
                                    (128, 64, 3, 64, 1), (128, 64, 4, 64, 1), (128, 128, 2, 128, 0),
                                    (128, 64, 3, 128, 1), (64, 64, 4, 64, 1), (64, 128, 3, 64, 1)]]


def _time_forward(fn, inputs, iters: int) -> float:
    run = jax.jit(fn)
    timing = common.time_calls(lambda i: run(*inputs[i % len(inputs)]), jax.block_until_ready,
                               warmup=3, iters=iters)
    return timing["median_s"]


def sweep(rows: int, iters: int) -> list[dict]:
    rng = np.random.default_rng(0)
    inputs = [(jnp.asarray(rng.standard_normal((rows, HIDDEN), np.float32), jnp.bfloat16),
               jnp.asarray(rng.standard_normal((HIDDEN, 2 * INTER), np.float32) / HIDDEN ** 0.5, jnp.bfloat16))
              for _ in range(2)]
    flops = 4.0 * rows * HIDDEN * INTER
    want = np.asarray(jax.jit(swiglu.swiglu_matmul_reference)(*inputs[0]), np.float32)
    fns = [("xla reference", None, swiglu.swiglu_matmul_reference), ("xla matmul only", None, jnp.dot)]
    fns += [("pallas", tiles, lambda x, w, t=tiles: swiglu.swiglu_matmul(x, w, tiles=t)) for tiles in CANDIDATES]
    results = []
    for name, tiles, fn in fns:
        row = {"impl": name, "rows": rows, "tiles": dataclasses.asdict(tiles) if tiles else None}
        try:
            seconds = _time_forward(fn, inputs, iters)
            if tiles is not None:
                got = np.asarray(jax.jit(fn)(*inputs[0]), np.float32)
                row["error"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            row.update(ms=1e3 * seconds, tflops=flops / seconds / 1e12)
        except Exception as error:  # noqa: BLE001 - a config over the SMEM limit is reported, not fatal
            row["failed"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        results.append(row)
        print(f"{name:>16} {row.get('ms', float('nan')):8.3f} ms {row.get('tflops', float('nan')):7.1f} TFLOP/s "
              f"err {row.get('error', float('nan')):8.1e}  {row['tiles'] or ''} {row.get('failed', '')}", flush=True)
    return results


def whole_step_and_rollout(tiles: swiglu.TileConfig, iters: int) -> list[dict]:
    from benchmarks.rollout import _randomise_heads, bench_jax  # noqa: PLC0415
    from benchmarks.train_step import bench_train_step  # noqa: PLC0415
    from hrm_jax.config import MODEL_PRESETS  # noqa: PLC0415
    from hrm_jax.model import init_params  # noqa: PLC0415

    swiglu.DEFAULT_TILES = tiles
    rows = []
    for mlp in ("xla", "pallas"):
        rows.append(bench_train_step("sudoku_extreme", 768, iters, 5, "cudnn", "xla", 1, mlp))
        print(f"train step, mlp {mlp}: {1e3 * rows[-1]['median_s']:.2f} ms, {rows[-1]['examples_per_s']:.0f} ex/s, "
              f"MFU {rows[-1].get('mfu', float('nan')):.1%}", flush=True)
    config = MODEL_PRESETS["sudoku_extreme"](attention_impl="cudnn")
    params = _randomise_heads(jax.device_get(init_params(config, jax.random.key(0))))
    for mlp in ("xla", "pallas"):
        rows.append(bench_jax(config.replace(mlp_impl=mlp), params, 1024, iters, 3))
        print(f"rollout 1024, mlp {mlp}: {rows[-1]['puzzles_per_s']:.1f} puzzles/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_shape, default=(768, 82), help="BATCHxSEQ of the kernel sweep")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--whole", action="store_true", help="then time the train step and rollout with the best tiles")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        parser.exit(2, "benchmarks.swiglu_tiles: needs a Hopper GPU\n")
    results = {"sweep": sweep(args.rows[0] * args.rows[1], args.iters)}
    timed = [r for r in results["sweep"] if r["tiles"] and "ms" in r]
    if not timed:
        parser.exit(1, "benchmarks.swiglu_tiles: no tile config ran\n")
    best = min(timed, key=lambda r: r["ms"])
    results["best_tiles"] = best["tiles"]
    print("fastest:", best["tiles"])
    path = common.save_results("swiglu_tiles", results, args.out)
    if args.whole:
        results["whole"] = whole_step_and_rollout(swiglu.TileConfig(**best["tiles"]), 30)
        path = common.save_results("swiglu_tiles", results, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
