"""Time a full evaluation rollout (halt_max_steps ACT segments) in JAX and in the torch module.

    python -m benchmarks.rollout --preset sudoku_extreme [--batch 1 --batch 64 --batch 1024]
        [--attention-impl xla|cudnn|pallas ...] [--mlp-impl xla|pallas ...] [--no-torch]

JAX: hrm_jax.evaluate.rollout under jit (what evaluation runs). Torch: export.torch_model.HRMTorch, one
ACT segment per call (eager, and torch.compile'd as the reference compiles its model), looped over
halt_max_steps segments in Python; same weights and inputs. Prints puzzles/s and the JAX/torch ratio; merges the
numbers into benchmarks/results/<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_step import random_batches
from hrm_jax.config import ATTENTION_IMPLS, MLP_IMPLS
from hrm_jax.evaluate import rollout
from hrm_jax.model import init_params
from hrm_jax.presets import MODEL_PRESETS


def _randomise_heads(params, seed=0):
    """Non-zero Q head and puzzle embeddings, so no backend can shortcut a zero path."""
    rng = np.random.default_rng(seed)
    q_kernel = params["dense"]["q_head"]["kernel"]
    params["dense"]["q_head"]["kernel"] = np.asarray(rng.normal(0, 0.02, q_kernel.shape), np.float32)
    if "puzzle_emb" in params:
        params["puzzle_emb"] = np.asarray(rng.normal(0, 0.02, params["puzzle_emb"].shape), np.float32)
    return jax.device_put(params)


def bench_jax(config, params, batch_size, iters, warmup):
    batches = random_batches(config, batch_size, 4)
    run = jax.jit(rollout, static_argnames=("config",))
    timing = common.time_calls(lambda i: run(params, config, batches[i % 4])["predictions"],
                               jax.block_until_ready, warmup=warmup, iters=iters)
    name = f"jax {config.attention_impl}" + ("" if config.mlp_impl == "xla" else f"+{config.mlp_impl} mlp")
    return {"backend": name, "batch": batch_size, **timing,
            "puzzles_per_s": batch_size / timing["median_s"]}


def bench_torch(config, params, batch_size, iters, warmup, compiled: bool):
    import torch  # noqa: PLC0415

    from export.convert import to_torch_state_dict  # noqa: PLC0415
    from export.torch_model import HRMTorch  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = HRMTorch(config).to(device)
    model.load_state_dict({k: v.to(device) for k, v in to_torch_state_dict(jax.device_get(params), config).items()})
    # As the reference's evaluation: the compiled module runs one ACT segment, Python loops over
    # halt_max_steps segments (compiling the whole unrolled rollout takes minutes).
    step = torch.compile(model, dynamic=False) if compiled else model
    batches = [{k: torch.from_numpy(np.array(v)).to(device) for k, v in b.items()}
               for b in random_batches(config, batch_size, 4)]
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)

    def call(i):
        b = batches[i % 4]
        carry = model.initial_carry(b["inputs"], b["puzzle_identifiers"])
        for _ in range(config.halt_max_steps):
            out = step(*carry)
            carry = out[:6]
        return out[6].argmax(-1)

    with torch.no_grad():
        timing = common.time_calls(call, sync, warmup=warmup, iters=iters)
    name = "torch.compile" if compiled else "torch eager"
    return {"backend": name, "batch": batch_size, **timing, "puzzles_per_s": batch_size / timing["median_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sudoku_extreme", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1, 64, 1024)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention-impl", action="append", choices=ATTENTION_IMPLS,
                        help="JAX attention implementation(s) (repeatable; default xla)")
    parser.add_argument("--mlp-impl", action="append", choices=MLP_IMPLS,
                        help="JAX SwiGLU implementation(s) (repeatable; default xla); every attention x mlp pair runs")
    parser.add_argument("--no-torch", action="store_true", help="time only the JAX rollout")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    common.share_gpu_with_torch()
    config = MODEL_PRESETS[args.preset]()
    params = _randomise_heads(jax.device_get(init_params(config, jax.random.key(0))))
    rows = []
    for batch in args.batch or [1, 64, 1024]:
        for attention, mlp in itertools.product(args.attention_impl or ["xla"], args.mlp_impl or ["xla"]):
            rows.append(bench_jax(config.replace(attention_impl=attention, mlp_impl=mlp), params, batch, args.iters,
                                  args.warmup))
        if not args.no_torch:
            for compiled in (False, True):
                rows.append(bench_torch(config, params, batch, args.iters, args.warmup, compiled))
        path = common.save_results(f"rollout_{args.preset}", rows, args.out)
    print(f"{'batch':>6} {'backend':>22} {'ms/rollout':>10} {'puzzles/s':>10} {'TFLOP/s':>8}")
    flops = common.rollout_flops_per_example(config)
    for r in rows:
        print(f"{r['batch']:>6} {r['backend']:>22} {1e3 * r['median_s']:10.2f} {r['puzzles_per_s']:10.1f} "
              f"{r['puzzles_per_s'] * flops / 1e12:8.1f}")
    for r in rows:
        for torch_row in (t for t in rows if t["batch"] == r["batch"] and t["backend"].startswith("torch")):
            if r["backend"].startswith("jax"):
                print(f"batch {r['batch']}: {r['backend']} / {torch_row['backend']} = "
                      f"{r['puzzles_per_s'] / torch_row['puzzles_per_s']:.2f}x")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
