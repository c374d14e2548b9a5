"""Seconds per fine-tune step of the two sleep trainers (sage/sleep_jax.py, sage/sleep_torch.py) on this machine.

Each trainer's own `fine_tune` runs `--warmup + --iters` steps from the shipped model's weights (hidden 256,
2 + 2 layers, 2 x 2 cycles, 81 + 0 positions) on batches of held-out puzzles it ships with (sleep's
constant-lr AdamATan2 settings); a step is the time between two batch requests of the trainer's loop (the
step's lm_loss is read back each step, so each interval is one whole, synchronised step). The first
`--warmup` steps (JAX compiles the step in the first) are reported apart, the median of the rest is the
number; the arms take turns (`--rounds`), so that the load of a shared machine falls on each alike. Arms:

    jax            the model config as shipped (forward_dtype bfloat16), what `--trainer jax` runs
    jax-float32    the same with forward_dtype float32 (XLA:CPU emulates bf16 matmuls)
    torch          `--trainer torch`: float32 on a CPU, the config's dtype on CUDA, torch's default threads
    torch-1thread  the same on one intra-op thread (torch.set_num_threads(1) for this arm only: its
                   OpenMP threads spin-wait, which costs much on a CPU other jobs also load)

    python -m benchmarks.sleep_trainers [--batch-sizes 8 32] [--rounds 3] [--iters 4] [--arms jax jax-float32 torch]

Writes benchmarks/results/sleep_trainers_<machine>.json (or --out FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from hrm_jax.pretrained import heldout_sample, load_pretrained
from sage.sleep import SleepConfig, select_trainer

ARMS = ("jax", "jax-float32", "torch", "torch-1thread")


def timed_batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int, steps: int, stamps: list[float]):
    """Batches of consecutive rows; appends the time of every request and of the loop's end to `stamps`."""
    for step in range(steps):
        stamps.append(time.perf_counter())
        rows = np.arange(step * batch_size, (step + 1) * batch_size) % len(inputs)
        yield {"inputs": inputs[rows], "labels": labels[rows], "puzzle_identifiers": np.zeros(batch_size, np.int32)}
    stamps.append(time.perf_counter())


def load_data():
    params, config = load_pretrained()
    pairs = [pair for band in heldout_sample().values() for pair in band]
    inputs = np.stack([p for p, _ in pairs]).astype(np.int32) + 1
    labels = np.stack([s for _, s in pairs]).astype(np.int32) + 1
    return params, config, inputs, labels


def time_steps(arm: str, data, batch_size: int, steps: int) -> list[float]:
    """Seconds of each of `steps` steps of one fine_tune call of `arm`."""
    params, config, inputs, labels = data
    if arm == "jax-float32":
        config = config.replace(forward_dtype="float32")
    sleep = SleepConfig(steps=steps, batch_size=batch_size)
    stamps: list[float] = []
    threads = torch.get_num_threads()
    if arm == "torch-1thread":
        torch.set_num_threads(1)
    try:
        select_trainer(arm.split("-")[0]).fine_tune(params, config, timed_batches(inputs, labels, batch_size, steps,
                                                                                  stamps), sleep.train_config(), steps)
    finally:
        torch.set_num_threads(threads)
    return [float(s) for s in np.diff(stamps)]


def time_arms(arms: list[str], data, batch_size: int, warmup: int, iters: int, rounds: int) -> list[dict]:
    """Rounds of every arm in turn (so that a change of the machine's load hits every arm alike); per round
    and arm one fine_tune of warmup + iters steps, the first `warmup` of the first round reported apart
    (JAX compiles there; later rounds reuse the compiled step, and their warm-up steps are dropped too)."""
    steps = {arm: [] for arm in arms}
    first = {}
    for round_index in range(rounds):
        for arm in arms:
            times = time_steps(arm, data, batch_size, warmup + iters)
            if round_index == 0:
                first[arm] = [round(t, 3) for t in times[:warmup]]
            steps[arm] += times[warmup:]
    return [{"arm": arm, "batch_size": batch_size, "first_steps_s": first[arm],
             "median_step_s": statistics.median(steps[arm]), "min_step_s": min(steps[arm]),
             "max_step_s": max(steps[arm]), "timed_steps": len(steps[arm]), "step_s": [round(t, 4) for t in steps[arm]]}
            for arm in arms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows, data = [], load_data()
    for batch_size in args.batch_sizes:
        for row in time_arms(args.arms, data, batch_size, args.warmup, args.iters, args.rounds):
            rows.append(row)
            print(f"batch {batch_size:3d}  {row['arm']:12s} median {row['median_step_s']:.3f} s/step "
                  f"(min {row['min_step_s']:.3f}, max {row['max_step_s']:.3f}; first {row['first_steps_s']})",
                  flush=True)
    import jax  # noqa: PLC0415
    import torch  # noqa: PLC0415  (versions for the record; both frameworks are loaded by now)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "jax": jax.__version__,
               "torch": torch.__version__, "torch_default_threads": torch.get_num_threads()}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"sleep_trainers_cpu{os.cpu_count()}.json")
    with open(out, "w") as f:
        json.dump({"machine": machine, "settings": vars(args), "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
