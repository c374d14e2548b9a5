"""Time the full HRM training step (ACT segment, target-Q forward, backward, AdamATan2, sparse SignSGD).

    python -m benchmarks.train_step --preset sudoku_extreme --batch 384 [--batch 768] [--iters 50]
        [--attention-impl xla|cudnn|pallas ...] [--norm-impl xla|pallas ...] [--mlp-impl xla|pallas ...]
        [--torch eager|compile ...]
        [--devices N ...]

Prints steps/s, examples/s, TFLOP/s from the analytic count (benchmarks/common.py) and MFU against
the GPU's dense bf16 peak, and peak device memory; merges the numbers into
benchmarks/results/<gpu>-<date>.json. On a CUDA machine the same step of the torch module
(export/torch_train.py: the reference's train_batch on export.torch_model, eager and
torch.compile) runs at the same shapes in the same process, and the JAX/torch ratios are printed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from hrm_jax import parallel
from hrm_jax.config import ATTENTION_IMPLS, MLP_IMPLS, NORM_IMPLS
from hrm_jax.presets import MODEL_PRESETS, TRAIN_PRESETS
from hrm_jax.train import init_train_state, put_state, step_function


def random_batches(config, batch_size: int, count: int, seed: int = 0) -> list[dict[str, jax.Array]]:
    """Sudoku-like token batches on the device (never zeros: XLA may skip work on them), rotated during timing."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        labels = rng.integers(2, config.vocab_size, (batch_size, config.seq_len))
        inputs = np.where(rng.random(labels.shape) < 0.7, 1, labels)  # ~70% blanks
        ids = rng.integers(0, config.num_puzzle_identifiers, (batch_size,))
        batches.append(jax.device_put({"inputs": jnp.asarray(inputs, jnp.int32),
                                       "labels": jnp.asarray(labels, jnp.int32),
                                       "puzzle_identifiers": jnp.asarray(ids, jnp.int32)}))
    return batches


# The Sudoku-Extreme-1k protocol's schedule length (20,000 epochs x 1,000 puzzles / batch 768).
TOTAL_STEPS = 26_042


def _configs(preset: str, batch_size: int, **model_overrides):
    model_config = MODEL_PRESETS[preset](**model_overrides)
    train_config = TRAIN_PRESETS.get(preset, TRAIN_PRESETS["sudoku_extreme"]).replace(global_batch_size=batch_size)
    return model_config, train_config, TOTAL_STEPS


def _throughput(model_config, batch_size: int, timing: dict, devices: int = 1) -> dict:
    """Rates from the median step (and the back-to-back window), TFLOP/s by the analytic count, MFU
    (against the peak of all `devices`)."""
    flops = common.train_flops_per_example(model_config) * batch_size
    out = {"steps_per_s": 1 / timing["median_s"], "examples_per_s": batch_size / timing["median_s"],
           "window_examples_per_s": batch_size / timing["window_s"],
           "tflops": flops / timing["median_s"] / 1e12, "gflop_per_example": flops / batch_size / 1e9}
    peak = common.device_info()["peak_bf16_tflops"]
    if peak:
        out["mfu"] = out["tflops"] / (peak * devices)
    return out


def bench_train_step(preset: str, batch_size: int, iters: int, warmup: int, attention_impl: str = "xla",
                     norm_impl: str = "xla", devices: int = 1, mlp_impl: str = "xla") -> dict:
    """The JAX step on one device, or data parallel over `devices` (hrm_jax.parallel)."""
    model_config, train_config, total_steps = _configs(preset, batch_size, attention_impl=attention_impl,
                                                       norm_impl=norm_impl, mlp_impl=mlp_impl)
    state = init_train_state(model_config, train_config, total_steps)
    batches = random_batches(model_config, batch_size, 8)
    mesh = None if devices == 1 else parallel.data_mesh(devices)
    if mesh is not None:  # placed once, so the timed calls move no data
        state, batches = put_state(state, mesh), [parallel.put_batch(b, mesh) for b in batches]
    step = step_function(model_config, train_config, total_steps, mesh)
    holder = {"state": state}

    def call(i):
        holder["state"], metrics = step(holder["state"], batches[i % len(batches)])
        return metrics["lm_loss"]

    timing = common.time_calls(call, jax.block_until_ready, warmup=warmup, iters=iters)
    return {"preset": preset, "batch": batch_size, "backend": "jax" if devices == 1 else f"jax x{devices}",
            "attention_impl": attention_impl, "norm_impl": norm_impl, "mlp_impl": mlp_impl, "devices": devices,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), **timing,
            **_throughput(model_config, batch_size, timing, devices), "peak_memory_gib": common.peak_memory_gib(),
            "steps_taken": int(holder["state"].step)}


def bench_torch_train_step(preset: str, batch_size: int, iters: int, warmup: int, compiled: bool) -> dict:
    """The reference's step in torch (export/torch_train.py) on the GPU, same shapes and schedule."""
    import torch  # noqa: PLC0415

    from export.torch_train import TorchTrainer, model_from_params  # noqa: PLC0415
    from hrm_jax.model import init_params  # noqa: PLC0415

    model_config, train_config, total_steps = _configs(preset, batch_size)
    cuda = torch.cuda.is_available()  # the CPU path only checks that the harness runs
    device = "cuda" if cuda else "cpu"
    model = model_from_params(init_params(model_config, jax.random.key(0)), model_config, device)
    trainer = TorchTrainer(model, train_config, total_steps, compiled=compiled)
    batches = [{k: torch.from_numpy(np.array(v)).to(device) for k, v in b.items()}
               for b in random_batches(model_config, batch_size, 8)]
    if cuda:  # the previous row's torch memory is free by now; give it back and reset the peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timing = common.time_calls(lambda i: trainer.step(batches[i % len(batches)])["lm_loss"],
                               lambda _: torch.cuda.synchronize() if cuda else None, warmup=warmup, iters=iters)
    return {"preset": preset, "batch": batch_size, "backend": "torch.compile" if compiled else "torch eager",
            "torch": torch.__version__, **timing, **_throughput(model_config, batch_size, timing),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "steps_taken": trainer.step_count}


def _torch_modes(requested: list[str] | None) -> list[str]:
    """--torch as given, else eager and compile when torch sees a CUDA device."""
    if requested is not None:
        return [m for m in requested if m != "none"]
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return []
    return ["eager", "compile"] if torch.cuda.is_available() else []


def _print_rows(rows: list[dict]) -> None:
    print(f"{'backend':>14} {'attn':>6} {'norm':>6} {'mlp':>6} {'batch':>6} {'ms/step':>8} {'steps/s':>8} "
          f"{'ex/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['backend']:>14} {r.get('attention_impl', '-'):>6} {r.get('norm_impl', '-'):>6} "
              f"{r.get('mlp_impl', '-'):>6} {r['batch']:>6} "
              f"{1e3 * r['median_s']:8.2f} {r['steps_per_s']:8.2f} {r['examples_per_s']:9.0f} "
              f"{r['tflops']:8.1f} {r.get('mfu', float('nan')):6.1%} {r['peak_memory_gib'] or float('nan'):8.2f}")
    for torch_row in (r for r in rows if not r["backend"].startswith("jax")):
        for jax_row in (r for r in rows if r["backend"] == "jax" and r["batch"] == torch_row["batch"]):
            print(f"batch {jax_row['batch']}: jax ({jax_row['attention_impl']}, {jax_row['norm_impl']}, "
                  f"{jax_row['mlp_impl']}) / "
                  f"{torch_row['backend']} = {jax_row['examples_per_s'] / torch_row['examples_per_s']:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sudoku_extreme", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, action="append", help="global batch (repeatable; default 384 and 768)")
    parser.add_argument("--iters", type=int, default=50, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--attention-impl", action="append", choices=ATTENTION_IMPLS,
                        help="attention implementation(s) to time (repeatable; default xla)")
    parser.add_argument("--norm-impl", action="append", choices=NORM_IMPLS,
                        help="residual add + RMSNorm implementation(s) to time (repeatable; default xla); "
                             "every attention x norm x mlp combination runs")
    parser.add_argument("--mlp-impl", action="append", choices=MLP_IMPLS,
                        help="silu(x W_gate) * (x W_up) implementation(s) to time (repeatable; default xla)")
    parser.add_argument("--torch", action="append", choices=("eager", "compile", "none"),
                        help="torch module mode(s) to time beside JAX (repeatable; default eager and compile "
                             "when torch sees a CUDA device; 'none' skips torch)")
    parser.add_argument("--devices", type=int, action="append",
                        help="JAX: split the batch over this many local GPUs, data parallel (repeatable; default 1)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    common.share_gpu_with_torch()
    rows = []
    for batch in args.batch or [384, 768]:
        for impls in itertools.product(args.attention_impl or ["xla"], args.norm_impl or ["xla"], args.devices or [1],
                                       args.mlp_impl or ["xla"]):
            rows.append(bench_train_step(args.preset, batch, args.iters, args.warmup, *impls))
            path = common.save_results(f"train_step_{args.preset}", rows, args.out)
        for mode in _torch_modes(args.torch):
            rows.append(bench_torch_train_step(args.preset, batch, args.iters, args.warmup, mode == "compile"))
            path = common.save_results(f"train_step_{args.preset}", rows, args.out)
    _print_rows(rows)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
