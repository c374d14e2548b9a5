"""Where does a training step spend its GPU time? A jax.profiler trace, summed per kernel.

    python -m benchmarks.profile_step [--preset sudoku_extreme] [--batch 768] [--attention-impl cudnn]
                                      [--steps 5] [--out DIR]

Times the step (median of 10, synchronised), traces --steps more steps with jax.profiler
(perfetto trace), and prints the GPU kernels by total time: name, calls per step, ms per step and
share. Also times the step once more with NaN parameters: if that is much faster, some kernel's
speed depends on the values (a question the H100 leases raised; BUILD_NOTES "GPU speed").
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks.train_step import TOTAL_STEPS, random_batches
from hrm_jax.config import ATTENTION_IMPLS
from hrm_jax.presets import MODEL_PRESETS, TRAIN_PRESETS
from hrm_jax.train import init_train_state, train_step


def _time_steps(state, batches, kwargs, count):
    times = []
    for i in range(count):
        start = time.perf_counter()
        state, metrics = train_step(state, batches[i % len(batches)], **kwargs)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, statistics.median(times)


# Kernel families by name: cuBLAS/cuBLASLt GEMMs, attention, everything else XLA emits (fusions).
KERNEL_FAMILIES = (("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
                   ("attention", ("sdpa", "flash", "cudnn", "attention", "attn")),
                   ("memset/copy", ("Memset", "Memcpy")))


def kernel_family(name: str) -> str:
    for family, needles in KERNEL_FAMILIES:
        if any(n in name for n in needles):
            return family
    return "fusion (XLA)"


def family_totals(table: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = collections.Counter()
    for row in table:
        totals[kernel_family(row["kernel"])] += row["ms_per_step"]
    return dict(totals)


def kernel_table(trace_dir: str, steps: int) -> list[dict]:
    """GPU kernel events of the perfetto trace summed by name (ms per step)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[0], "rt") as f:
        events = json.load(f)["traceEvents"]
    # Device streams are the processes whose name mentions the GPU (e.g. "/device:GPU:0").
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    if not gpu_pids:
        print(f"no GPU streams in the trace; its processes: {sorted(set(names.values()))}")
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            total[e["name"]] += e.get("dur", 0) / 1e3
            calls[e["name"]] += 1
    grand = sum(total.values()) or 1.0
    return [{"kernel": name[:120], "ms_per_step": ms / steps, "calls_per_step": calls[name] / steps,
             "share": ms / grand} for name, ms in total.most_common()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sudoku_extreme", choices=sorted(set(MODEL_PRESETS) & set(TRAIN_PRESETS)))
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--attention-impl", default="cudnn", choices=ATTENTION_IMPLS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for profile_step.json")
    args = parser.parse_args(argv)
    model_config = MODEL_PRESETS[args.preset](attention_impl=args.attention_impl)
    train_config = TRAIN_PRESETS[args.preset].replace(global_batch_size=args.batch)
    kwargs = dict(model_config=model_config, train_config=train_config, total_steps=TOTAL_STEPS)
    state = init_train_state(model_config, train_config, TOTAL_STEPS)
    batches = random_batches(model_config, args.batch, 4)
    state, _ = _time_steps(state, batches, kwargs, 3)  # compile and warm up
    state, median_s = _time_steps(state, batches, kwargs, 10)
    print(f"step: {1e3 * median_s:.1f} ms median of 10 ({args.batch / median_s:.0f} examples/s)", flush=True)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            state, _ = _time_steps(state, batches, kwargs, args.steps)
        table = kernel_table(trace_dir, args.steps)
    kernel_ms = sum(row["ms_per_step"] for row in table)
    print(f"GPU kernel time {kernel_ms:.1f} ms/step over {len(table)} kernels; by family:")
    for family, ms in sorted(family_totals(table).items(), key=lambda kv: -kv[1]):
        print(f"  {family:>14}: {ms:7.2f} ms/step ({ms / kernel_ms:.1%})")
    print(f"{'ms/step':>8} {'calls':>6} {'share':>6}  kernel (top 40)")
    for row in table[:40]:
        print(f"{row['ms_per_step']:8.2f} {row['calls_per_step']:6.0f} {row['share']:6.1%}  {row['kernel']}")
    nan_state = state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params))
    _, nan_median_s = _time_steps(nan_state, batches, kwargs, 10)
    print(f"step with NaN parameters: {1e3 * nan_median_s:.1f} ms median of 10", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_step.json"), "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "attention_impl": args.attention_impl,
                       "median_step_s": median_s, "nan_params_median_step_s": nan_median_s,
                       "device": str(jax.devices()[0]), "jax": jax.__version__,
                       "families_ms_per_step": family_totals(table), "kernels": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
