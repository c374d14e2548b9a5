"""Find where the training loop loses speed against the isolated train step.

    python -m benchmarks.train_loop --data DIR [--preset sudoku_extreme] [--attention-impl cudnn]
                                    [--steps 300] [--profile-out FILE]

Runs the same jitted train step four ways on a built dataset and prints steps/s per window of
100 steps (so a slowdown over time shows):
  device   - batches already on the device, rotated (the ceiling; benchmarks/train_step.py)
  sampler  - batches drawn by TrainSampler on the host each step, as train() does
  prefetch - the sampler's next batch drawn and put on the device while the step runs
  train    - hrm_jax.train.train itself (no evaluation, no checkpoints), under cProfile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time

import jax

from benchmarks import common
from benchmarks.train_step import TOTAL_STEPS, random_batches
from hrm_jax.config import ATTENTION_IMPLS, LoopConfig, RunConfig
from hrm_jax.data.format import load_split
from hrm_jax.data.sampler import TrainSampler
from hrm_jax.presets import MODEL_PRESETS, TRAIN_PRESETS, sized_for_data
from hrm_jax.train import init_train_state, train, train_step

WINDOW = 100


def _windows(name: str, step_once, steps: int, sync) -> list[float]:
    """steps/s of each WINDOW-step window, synchronising at window ends only (as train() logs)."""
    print(f"{name:9} steps/s per {WINDOW}-step window:", end="", flush=True)
    rates, out = [], None
    start = time.perf_counter()
    for i in range(1, steps + 1):
        out = step_once()
        if i % WINDOW == 0:
            sync(out)
            now = time.perf_counter()
            rates.append(WINDOW / (now - start))
            print(f" {rates[-1]:.2f}", end="", flush=True)
            start = now
    print(flush=True)
    return rates


def run(args) -> dict:
    run_config = sized_for_data(RunConfig(model=MODEL_PRESETS[args.preset](attention_impl=args.attention_impl),
                                          optim=TRAIN_PRESETS[args.preset]), args.data)
    model_config, train_config = run_config.model, run_config.optim
    total_steps = TOTAL_STEPS
    split = load_split(args.data, "train")
    kwargs = dict(model_config=model_config, train_config=train_config, total_steps=total_steps)
    holder = {"state": init_train_state(model_config, train_config, total_steps)}
    results = {}

    def warm(batch):
        holder["state"], metrics = train_step(holder["state"], batch, **kwargs)
        jax.block_until_ready(metrics)

    device_batches = random_batches(model_config, train_config.global_batch_size, 8)
    warm(device_batches[0])
    counter = {"i": 0}

    def device_step():
        counter["i"] += 1
        holder["state"], metrics = train_step(holder["state"], device_batches[counter["i"] % 8], **kwargs)
        return metrics

    results["device"] = _windows("device", device_step, args.steps, jax.block_until_ready)

    sampler = TrainSampler(split, train_config.global_batch_size, train_config.seed,
                           epochs_per_iter=train_config.eval_interval)
    warm(sampler.next_batch())

    def sampler_step():
        holder["state"], metrics = train_step(holder["state"], sampler.next_batch(), **kwargs)
        return metrics

    results["sampler"] = _windows("sampler", sampler_step, args.steps, jax.block_until_ready)
    pending = {"batch": jax.device_put(sampler.next_batch())}

    def prefetch_step():
        holder["state"], metrics = train_step(holder["state"], pending["batch"], **kwargs)
        pending["batch"] = jax.device_put(sampler.next_batch())
        return metrics

    results["prefetch"] = _windows("prefetch", prefetch_step, args.steps, jax.block_until_ready)
    del holder["state"]

    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        profiler.enable()
        loop = LoopConfig(out_dir=out_dir, total_steps=total_steps, max_steps=args.steps + 1, eval_split=None,
                          log_every=WINDOW, progress=False)
        summary = train(run_config.replace(loop=loop), args.data)
        profiler.disable()
        elapsed = time.perf_counter() - start
    results["train"] = [args.steps / elapsed]  # includes its one compile and the final checkpoint
    print(f"train     {args.steps} steps in {elapsed:.1f} s (with set-up and a final checkpoint)", flush=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    if args.profile_out:
        profiler.dump_stats(args.profile_out)
    print(text.getvalue())
    return {"preset": args.preset, "attention_impl": args.attention_impl, "batch": train_config.global_batch_size,
            "steps": args.steps, "steps_per_s_by_window": results, "final_step": summary["step"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a built dataset (python -m experiments.sudoku build)")
    parser.add_argument("--preset", default="sudoku_extreme", choices=sorted(set(MODEL_PRESETS) & set(TRAIN_PRESETS)))
    parser.add_argument("--attention-impl", default="xla", choices=ATTENTION_IMPLS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--profile-out", default=None, help="write the cProfile stats of the train() run here")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    result = run(args)
    print("wrote", common.save_results(f"train_loop_{args.attention_impl}", result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
