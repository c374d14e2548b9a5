"""Pieces every task CLI shares: train-config flags, model configs sized from the data, run
folders, result tables, and turning known errors into one clear line (exit code 2)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import logging
import os
import pathlib
import re
import shlex
import sys
from typing import Any, Callable

import jax

from hrm_jax.config import ATTENTION_IMPLS, MLP_IMPLS, NORM_IMPLS, HRMConfig, TrainConfig
from hrm_jax.data.format import load_metadata

RUNS_DIR = pathlib.Path(os.environ.get("HRM_RUNS_DIR", "runs"))

# TrainConfig fields settable from the command line (flag --global-batch-size -> global_batch_size).
_TRAIN_FLAGS = {"global_batch_size": int, "epochs": int, "eval_interval": int, "lr": float,
                "lr_min_ratio": float, "lr_warmup_steps": int, "weight_decay": float, "beta1": float,
                "beta2": float, "puzzle_emb_lr": float, "puzzle_emb_weight_decay": float, "seed": int}


class CLIError(ValueError):
    """A bad command-line argument: printed as one line, exit code 2."""


def cli_main(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wraps a CLI's main so that expected errors (bad input, data, checkpoints, a batch too large
    for the device) print one line.

    Every error class the package raises for bad input derives from ValueError or OSError; a
    traceback is kept only for real bugs (anything else).
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except jax.errors.JaxRuntimeError as error:
            if not is_out_of_memory(error):
                raise
            print(f"error: {out_of_memory_message(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
            return 130

    return wrapper


def is_out_of_memory(error: Exception) -> bool:
    """XLA's allocation failure (the same status on CPU and GPU)."""
    return "RESOURCE_EXHAUSTED" in str(error)


def out_of_memory_message(error: Exception) -> str:
    """What ran out, how much was asked for, and the flags that make a run fit."""
    device = jax.devices()[0]
    asked = re.search(r"allocat(?:e|ing) (\d+) bytes", str(error))  # XLA:CPU "allocating N", XLA:GPU "allocate N"
    amount = f" (an allocation of {int(asked.group(1)) / 2**30:.1f} GiB failed)" if asked else ""
    return (f"out of memory on {device.platform} device {device.device_kind!r}{amount}. Use smaller batches "
            "(train: --global-batch-size, --eval-batch-size or a smaller --preset; eval: --batch-size), split "
            "them over more GPUs (--devices N), or a device with more memory. Files already written are kept: "
            "train --resume continues from the last checkpoint")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # orbax and absl are chatty at INFO.
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags overriding the preset's TrainConfig, and how the run is driven."""
    group = parser.add_argument_group("training hyperparameters (override the preset)")
    for name, kind in _TRAIN_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=kind.__name__.upper())
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=pathlib.Path, default=None, help="run folder (default runs/<task>-<time>)")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last intact checkpoint (refused if it has none)")
    start.add_argument("--restart", action="store_true",
                       help="move a previous run in --out aside to <out>.old-<time> and start anew")
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    run.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: eval_interval epochs)")
    run.add_argument("--eval-batch-size", type=int, default=None)
    run.add_argument("--checkpoint-every", type=int, default=None,
                     help="steps between periodic checkpoints (besides one at every evaluation)")
    run.add_argument("--checkpoint-minutes", type=float, default=10.0,
                     help="save a checkpoint at least this often in wall time (default 10; 0: off)")
    run.add_argument("--early-stop-exact", type=float, default=None,
                     help="stop when training exact accuracy reaches this (the reference warns of late instability)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs (needs tensorboardX)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--devices", type=device_count, default=1, metavar="N|all",
                     help="split each batch over N local GPUs (data parallel; 'all': every one). The global and "
                          "evaluation batch sizes must divide by N; the results match one device (default 1)")


def add_kernel_flags(parser: argparse.ArgumentParser) -> None:
    """--attention-impl / --norm-impl / --mlp-impl: how (not what) the model computes; numbers in BUILD_NOTES."""
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default=None,
                        help="attention kernel (default xla); cudnn and pallas (NVIDIA GPUs, bf16) make the "
                             "Sudoku step 1.3x faster on an H100")
    parser.add_argument("--norm-impl", choices=NORM_IMPLS, default=None,
                        help="residual add + RMSNorm (default xla); pallas: a fused Triton kernel")
    parser.add_argument("--mlp-impl", choices=MLP_IMPLS, default=None,
                        help="silu(x W_gate) * (x W_up) (default xla); pallas: one Mosaic GPU matmul with the "
                             "activation in its epilogue (Hopper GPUs, bf16)")


def train_config_from_args(base: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    changes = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name, None) is not None}
    return base.replace(**changes)


def model_config_for_data(base: HRMConfig, data_dir: str | os.PathLike, split: str = "train") -> HRMConfig:
    """The preset's architecture with the task sizes (seq_len, vocab, identifiers) of the dataset."""
    meta = load_metadata(data_dir, split)
    return base.replace(seq_len=meta.seq_len, vocab_size=meta.vocab_size,
                        num_puzzle_identifiers=meta.num_puzzle_identifiers)


def new_run_dir(task: str, out: pathlib.Path | None) -> pathlib.Path:
    if out is not None:
        return out
    return RUNS_DIR / f"{task}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_training(model_config: HRMConfig, train_config: TrainConfig, data_dir: str | os.PathLike,
                 out_dir: pathlib.Path, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """hrm_jax.train.train with the run flags of add_train_flags (keyword overrides win)."""
    from hrm_jax.train import train  # noqa: PLC0415  (keeps --help fast)

    options = dict(max_steps=args.max_steps, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
                   checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                   resume=args.resume, restart=args.restart,
                   early_stop_exact=args.early_stop_exact, log_every=args.log_every,
                   progress=not args.no_progress, tensorboard=args.tensorboard, num_devices=args.devices)
    options.update(overrides)
    summary = train(model_config, train_config, data_dir, out_dir, **options)
    if summary["stopped_by"] is not None:
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}, checkpoint saved; continue with: "
              f"{resume_command(out_dir)}")
        sys.exit(0)
    return summary


def resume_command(out_dir: str | os.PathLike) -> str:
    """This process's command line with --out pointing at out_dir and --resume (not --restart)."""
    argv = [arg for arg in sys.argv[1:] if arg not in ("--resume", "--restart")]
    if "--out" in argv:
        index = argv.index("--out")
        del argv[index:index + 2]
    argv = [arg for arg in argv if not arg.startswith("--out=")]
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else sys.argv[0]
    return shlex.join(["python", "-m", module, *argv, "--out", os.fspath(out_dir), "--resume"])


def format_config(config: Any) -> str:
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))


def print_eval_table(results: dict[str, dict[str, float]], title: str = "evaluation") -> None:
    """Exact and token accuracy (last segment and Q-halted) beside the copy-the-input baseline."""
    print(f"\n{title}")
    header = f"{'split':<22} {'count':>7} {'exact':>8} {'exact(Q)':>9} {'token':>8} {'steps(Q)':>9} {'copy exact':>11} {'copy token':>11}"
    print(header)
    print("-" * len(header))
    for name, m in results.items():
        print(f"{name:<22} {int(m.get('count', 0)):>7} {m['exact_accuracy']:>8.2%} "
              f"{m.get('early_exact_accuracy', float('nan')):>9.2%} {m['accuracy']:>8.2%} "
              f"{m.get('early_steps', float('nan')):>9.2f} {m.get('copy_exact_accuracy', float('nan')):>11.2%} "
              f"{m.get('copy_accuracy', float('nan')):>11.2%}")


def _int_at_least(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def device_count(text: str) -> int | None:
    """argparse type: a positive integer, or 'all' (None: every local device)."""
    return None if text == "all" else _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def train_from_args(args: argparse.Namespace, model_base: HRMConfig, train_base: TrainConfig,
                    data_dir: str | os.PathLike, task: str) -> dict[str, Any]:
    """The `train` command of every task CLI: size the preset to the data, apply the flags, run."""
    model_config = model_config_for_data(model_base, data_dir)
    for field in ("attention_impl", "norm_impl", "mlp_impl"):
        if getattr(args, field, None):
            model_config = model_config.replace(**{field: getattr(args, field)})
    train_config = train_config_from_args(train_base, args)
    out = new_run_dir(task, args.out)
    print(f"run folder: {out}\nmodel: {format_config(model_config)}\ntrain: {format_config(train_config)}")
    return run_training(model_config, train_config, data_dir, out, args)


def print_run_summary(summary: dict[str, Any], best_note: str = "") -> None:
    """Last held-out evaluation, best exact accuracy, and where the run's files are."""
    if summary.get("eval"):
        print_eval_table({"test (last eval)": summary["eval"]}, "held-out evaluation")
    best = summary.get("best_exact_accuracy")
    print(f"\nsteps: {summary['step']} of {summary['total_steps']}"
          f"{' (stopped early)' if summary.get('stopped_early') else ''}; best test exact accuracy: "
          f"{'n/a' if best is None else f'{best:.2%}'}{best_note}")
    train = summary.get("train") or {}
    if "elapsed_s" in train:
        print(f"wall time: {train['elapsed_s'] / 60:.1f} min; last window {train['steps_per_s']:.2f} steps/s "
              "(training only)")
    paths = summary["paths"]
    print(f"checkpoints: {paths['checkpoints']}\nbest checkpoint: {paths['best']}\n"
          f"metrics: {paths['metrics']}\nplot: {paths['plot']}")


def cpu_quickstart_model() -> HRMConfig:
    """The Sudoku and Maze quick-start architecture: small enough for 2 CPU cores, large enough to
    beat the baselines within minutes (128 wide, 2+2 layers, 2x2 cycles, 4 ACT steps)."""
    from hrm_jax.config import tiny  # noqa: PLC0415

    return tiny(hidden_size=128, num_heads=4, H_layers=2, L_layers=2, H_cycles=2, L_cycles=2,
                halt_max_steps=4, forward_dtype="float32")


def cpu_quickstart_train() -> TrainConfig:
    return TrainConfig(global_batch_size=64, epochs=100000, eval_interval=None, lr=1e-3, lr_warmup_steps=50,
                       weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1)
