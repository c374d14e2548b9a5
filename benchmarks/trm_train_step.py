"""Time the TRM-MLP Sudoku training step of hrm_jax against the reference's own code, in one process.

    python -m benchmarks.trm_train_step --reference /path/to/TinyRecursiveModels [--batch 768] [--iters 30]
    python -m benchmarks.trm_train_step --reference /tmp/trm_ref --tiny --torch eager   # CPU smoke test

Both sides train the `trm_sudoku_mlp` preset (5,028,866 parameters; 97 positions, H_cycles 3,
L_cycles 6, 16 ACT steps, bf16 compute) from the same initial weights on the same random batches, at
the paper's global batch (768, one GPU):

* **jax**: hrm_jax.train.train_step (ACT segment, backward of the last recursion, AdamATan2, sparse
  sign-SGD, EMA update), jitted;
* **reference**: its pretrain.py `train_batch` for world size 1 with `ema=True`, on its own modules
  (models/recursive_reasoning/trm.py, models/losses.py ACTLossHead, models/sparse_embedding.py,
  models/ema.py EMAHelper; loaded by benchmarks/trm_reference.py, driven by
  benchmarks/reference_trainer.py) under `torch.compile` as pretrain.py compiles its model: forward +
  loss, `((1 / B) * loss).backward()`, the dense update, the sign-SGD, `zero_grad`, `EMAHelper.update`.
  The dense update is export.torch_train.adam_atan2_ (the AdamATan2 formula) compiled by
  torch.compile, because the reference's adam-atan2 CUDA extension is not installable offline;
  everything else is the reference's code.

Each timed step is synchronised (`block_until_ready` / `torch.cuda.synchronize`); the median over
--iters steps after --warmup steps is reported (benchmarks/common.py `time_calls`).

FLOPs per example of one training step (multiply-add = 2 FLOPs; heads, embeddings and norms left out):

    F_block = 6 T h (i + i_T)                       mlp_t block: channel SwiGLU (3 matmuls h x i per
                                                    token) + sequence SwiGLU (3 matmuls T x i_T per channel)
    F_block = 2 (4 h^2 + 3 h i) T + 4 T^2 h         attention block
    F_step  = L_layers F_block (n_fwd + 2 n_bwd)
    n_fwd   = H_cycles (L_cycles + 1)               net applications in the segment's forward
    n_bwd   = L_cycles + 1                          the last recursion, backpropagated (2x its forward)
            (+ n_fwd more forward with no_ACT_continue=False: the target-Q forward)

with T = total_seq_len (97), h = hidden (512), i = 1536, i_T = 512. trm_sudoku_mlp: F_block = 0.610
GFLOP, F_step = 2 x 0.610 x (21 + 14) = 42.72 GFLOP per example. MFU = F_step x batch / median step
time / the GPU's dense bf16 peak (benchmarks/common.py PEAK_BF16_TFLOPS).

Needs jax, torch, einops and numpy, and a checkout of the reference; not pydantic, hydra, wandb or
adam-atan2 (benchmarks/trm_reference.py stands in for pydantic). Results are printed and merged
under "trm_train_step" into benchmarks/results/<gpu>-<date>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from benchmarks import common, trm_reference
from benchmarks.train_step import random_batches
from hrm_jax.presets import TRM_TRAIN_PRESETS, trm_sudoku_mlp
from hrm_jax.train import init_train_state, step_function
from hrm_jax.trm_config import TRMConfig

# Sudoku-Extreme-1k: the README's 50,000 epochs x 1,000 groups (one example drawn per group) / batch 768.
TOTAL_STEPS = 65_104


def train_flops_per_example(config: TRMConfig) -> float:
    """F_step of the module docstring."""
    t, h, i = config.total_seq_len, config.hidden_size, config.intermediate_size
    if config.mlp_t:
        block = 6 * t * h * (i + config.sequence_intermediate_size)
    else:
        block = 2 * (4 * h * h + 3 * h * i) * t + 4 * t * t * h
    forward = config.H_cycles * (config.L_cycles + 1)
    passes = forward + 2 * (config.L_cycles + 1) + (0 if config.no_ACT_continue else forward)
    return config.L_layers * block * passes


def configs(tiny: bool, batch: int):
    if tiny:
        model = trm_sudoku_mlp(hidden_size=64, puzzle_emb_ndim=64, puzzle_emb_len=2, H_cycles=2, L_cycles=2,
                               halt_max_steps=4, forward_dtype="float32")
    else:
        model = trm_sudoku_mlp()
    train = TRM_TRAIN_PRESETS["trm_sudoku_mlp"].replace(global_batch_size=batch)
    return model, train, TOTAL_STEPS


def _throughput(model_config: TRMConfig, batch: int, timing: dict) -> dict:
    flops = train_flops_per_example(model_config) * batch
    out = {"steps_per_s": 1 / timing["median_s"], "examples_per_s": batch / timing["median_s"],
           "tflops": flops / timing["median_s"] / 1e12, "gflop_per_example": flops / batch / 1e9}
    peak = common.device_info()["peak_bf16_tflops"]
    out["mfu"] = out["tflops"] / peak if peak else None
    return out


def bench_jax(model_config, train_config, total_steps, state, batches, iters, warmup) -> dict:
    step = step_function(model_config, train_config, total_steps)
    holder = {"state": state}

    def call(i):
        holder["state"], metrics = step(holder["state"], batches[i % len(batches)])
        return metrics["lm_loss"]

    timing = common.time_calls(call, jax.block_until_ready, warmup=warmup, iters=iters)
    return {"backend": "jax", "jax": jax.__version__, **timing, **_throughput(model_config, len(batches[0]["inputs"]),
                                                                               timing),
            "peak_memory_gib": common.peak_memory_gib()}


def bench_reference(ref, model_config, train_config, total_steps, params, batches, iters, warmup, compiled) -> dict:
    import torch  # noqa: PLC0415  (torch is optional for hrm_jax; the reference side needs it)

    from benchmarks.reference_trainer import ReferenceTrainer  # noqa: PLC0415  (imports torch)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = trm_reference.model(ref, model_config, params, train_config.global_batch_size, device)
    trainer = ReferenceTrainer(ref, model, train_config, total_steps, compiled=compiled)
    torch_batches = [{k: torch.from_numpy(np.array(v)).to(device) for k, v in b.items()} for b in batches]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timing = common.time_calls(lambda i: trainer.step(torch_batches[i % len(torch_batches)])["lm_loss"],
                               lambda _: torch.cuda.synchronize() if cuda else None, warmup=warmup, iters=iters)
    return {"backend": "reference torch.compile" if compiled else "reference eager", "torch": torch.__version__,
            "pydantic_stand_in": ref.stand_in, **timing,
            **_throughput(model_config, len(batches[0]["inputs"]), timing),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of SamsungSAILMontreal/TinyRecursiveModels")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 768; --tiny: 8)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 30; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny: 1)")
    parser.add_argument("--torch", choices=("compile", "eager", "none"), default="compile",
                        help="how the reference runs (pretrain.py compiles; eager for a quick CPU check)")
    parser.add_argument("--tiny", action="store_true", help="a 64-wide float32 model at batch 8: a CPU smoke test")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    batch = args.batch or (8 if args.tiny else 768)
    iters, warmup = args.iters or (3 if args.tiny else 30), args.warmup or (1 if args.tiny else 5)
    try:
        ref = trm_reference.load(args.reference, keep=True) if args.torch != "none" else None
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    common.share_gpu_with_torch()
    model_config, train_config, total_steps = configs(args.tiny, batch)
    state = init_train_state(model_config, train_config, total_steps)
    params = jax.device_get(state.params)  # both sides start here
    batches = random_batches(model_config, batch, 8)
    rows = []
    if ref is not None:  # first: the JAX step donates its state, whose params the reference copies
        rows.append(bench_reference(ref, model_config, train_config, total_steps, params, batches, iters, warmup,
                                    args.torch == "compile"))
    rows.insert(0, bench_jax(model_config, train_config, total_steps, state, batches, iters, warmup))
    result = {"preset": "trm_sudoku_mlp" + (" (tiny)" if args.tiny else ""), "batch": batch, "iters": iters,
              "warmup": warmup, "model_config": model_config.to_dict(), "rows": rows,
              "gflop_per_example": train_flops_per_example(model_config) / 1e9}
    print(f"{'backend':>24} {'ms/step':>9} {'steps/s':>8} {'ex/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6}"
        peak = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else f"{'-':>8}"
        print(f"{r['backend']:>24} {1e3 * r['median_s']:9.2f} {r['steps_per_s']:8.2f} {r['examples_per_s']:9.0f} "
              f"{r['tflops']:8.2f} {mfu} {peak}")
    if len(rows) == 2:
        result["jax_over_reference"] = rows[0]["examples_per_s"] / rows[1]["examples_per_s"]
        print(f"jax / {rows[1]['backend']}: {result['jax_over_reference']:.2f}x examples/s "
              f"({result['gflop_per_example']:.2f} GFLOP per example)")
    print(f"results: {common.save_results('trm_train_step', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
