"""What the task CLIs share: the parser skeleton (quick start, train, eval), the train command
(a preset sized to the data, overridden by flags), run folders and result tables.

Each task file (sudoku.py, maze.py, arc.py) adds its own commands (build, solve, ...) and flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import pathlib
import shlex
import sys
from collections.abc import Callable
from typing import Any

import jax

from hrm_jax import cli, distributed
from hrm_jax import train as training
from hrm_jax.config import IMPLEMENTATION_FIELDS, LoopConfig, OptimConfig, RunConfig
from hrm_jax.presets import preset, presets_for, sized_for_data

RUNS_DIR = pathlib.Path(os.environ.get("HRM_RUNS_DIR", "runs"))
QUICKSTART = "quickstart"  # each task's `--preset quickstart` is the registry's <task>_quickstart
CLIError = cli.CLIError  # the task files raise it for bad arguments


# The parser ----------------------------------------------------------------------------------
def task_parser(task: str, doc: str) -> tuple[argparse.ArgumentParser, Any]:
    """The top-level parser of `python -m experiments.<task>` (its description and examples from
    the module docstring) with the quick-start flags every task has, and its subcommand set."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{task}", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=doc.split("\n\n", 1)[1])
    parser.add_argument("--data", type=pathlib.Path, default=None,
                        help="quick start: dataset folder (built if missing)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="quick start: run folder")
    parser.add_argument("--steps", type=cli.positive_int, default=300,
                        help="quick start: optimizer steps (default 300, a few minutes on 2 CPU cores)")
    # Its own dest: `train --seed` (OptimConfig.seed) must not see the quick start's default.
    parser.add_argument("--seed", dest="quickstart_seed", type=int, default=0, help="quick start: seed")
    parser.add_argument("--no-progress", action="store_true", help="quick start: no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library (INFO)")
    return parser, parser.add_subparsers(dest="command")


def add_train_command(sub, task: str, *, default_preset: str, data_help: str | None = None,
                      preset_help: str | None = None) -> argparse.ArgumentParser:
    """`train`: --data, --preset (the task's presets), the kernel, optimizer and loop flags."""
    train = sub.add_parser("train", help="train on a built dataset")
    if data_help is None:
        train.add_argument("--data", type=pathlib.Path, required=True)
    else:
        train.add_argument("--data", type=pathlib.Path, default=None, help=data_help)
    names = [_short(name, task) for name in presets_for(task)]
    train.add_argument("--preset", choices=names, default=default_preset, help=preset_help)
    cli.add_config_flags(train.add_argument_group("kernels (how, not what, the model computes)"),
                         type(preset(_full(default_preset, task)).model), only=IMPLEMENTATION_FIELDS)
    cli.add_config_flags(train.add_argument_group("training hyperparameters (override the preset)"), OptimConfig)
    cli.add_config_flags(train.add_argument_group("run"), LoopConfig)
    cli.add_config_flags(train.add_argument_group(
        "several processes or hosts (jax.distributed; every process runs the same command, see README 'Long runs')"),
        distributed.ClusterConfig)
    return train


def add_eval_command(sub, help_text: str) -> argparse.ArgumentParser:
    """`eval`: --checkpoint, --data, --split, --batch-size, --json (tasks add their own flags)."""
    evaluate = sub.add_parser("eval", help=help_text)
    evaluate.add_argument("--checkpoint", type=pathlib.Path, required=True)
    evaluate.add_argument("--data", type=pathlib.Path, required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--batch-size", type=cli.positive_int, default=256)
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    return evaluate


def run_main(parser: argparse.ArgumentParser, commands: dict[str | None, Callable[[argparse.Namespace], int]],
             argv: list[str] | None) -> int:
    """Parses, sets up logging and runs the chosen command (None: the quick start)."""
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    return commands[args.command](args)


def _short(name: str, task: str) -> str:
    return QUICKSTART if name == f"{task}_{QUICKSTART}" else name


def _full(name: str, task: str) -> str:
    return f"{task}_{QUICKSTART}" if name == QUICKSTART else name


# Running ----------------------------------------------------------------------------------------
def run_config_from_args(args: argparse.Namespace, task: str, data_dir: str | os.PathLike) -> RunConfig:
    """The preset of --preset sized to the data, with every given flag applied and a run folder."""
    run = sized_for_data(preset(_full(args.preset, task)), data_dir)
    loop = cli.config_from_flags(run.loop, args)
    return run.replace(model=cli.config_from_flags(run.model, args, only=IMPLEMENTATION_FIELDS),
                       optim=cli.config_from_flags(run.optim, args),
                       loop=loop.replace(out_dir=str(new_run_dir(task, loop.out_dir))))


def join_cluster(args: argparse.Namespace) -> bool:
    """Joins a multi-process run when the flags, the environment or SLURM describe one (before anything
    else uses jax); returns whether this process is process 0 (True in a single-process run).

    The other processes run the same command: their output would repeat process 0's, so their stdout
    is dropped and their library logging is cut to errors; errors still reach stderr."""
    cluster = distributed.resolve(cli.config_from_flags(distributed.ClusterConfig(), args))
    if cluster is None:
        return True
    if getattr(args, "out_dir", None) is None:
        raise CLIError("a multi-process run needs --out DIR, the same folder for every process (on a filesystem "
                       "they all see): the default name holds each process's own start time")
    distributed.initialize(cluster)
    if distributed.is_primary():
        print(f"joined {jax.process_count()} processes ({jax.device_count()} devices) through the coordinator at "
              f"{cluster.coordinator or 'the address SLURM gives'}; process 0 prints for all")
        return True
    print(f"process {jax.process_index()} of {jax.process_count()}: process 0 prints the run's output",
          file=sys.stderr, flush=True)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stays open until the process exits)
    logging.getLogger("hrm_jax").setLevel(logging.ERROR)
    return False


def train_from_args(args: argparse.Namespace, task: str, data_dir: str | os.PathLike) -> dict[str, Any]:
    """The `train` command of every task CLI (joining a multi-process run first, if there is one)."""
    join_cluster(args)
    run = run_config_from_args(args, task, data_dir)
    print(f"run folder: {run.loop.out_dir}\nmodel: {format_config(run.model)}\ntrain: {format_config(run.optim)}")
    return train_or_exit(run, data_dir)


def quickstart(args: argparse.Namespace, task: str, data_dir: str | os.PathLike, *, evaluations: int) -> dict:
    """The quick start's training: `<task>_quickstart` for --steps steps, `evaluations` evaluations
    and checkpoints spread over them."""
    run = sized_for_data(preset(f"{task}_{QUICKSTART}"), data_dir)
    every = max(1, args.steps // evaluations)
    run = run.replace(optim=run.optim.replace(seed=args.quickstart_seed), loop=LoopConfig(
        out_dir=str(new_run_dir(f"{task}-{QUICKSTART}", args.out)), total_steps=args.steps, eval_every=every,
        checkpoint_every=every, log_every=10, progress=not args.no_progress))
    print(f"training {format_config(run.model)}\n  for {args.steps} steps at batch "
          f"{run.optim.global_batch_size} -> {run.loop.out_dir}")
    return train_or_exit(run, data_dir)


def train_or_exit(run: RunConfig, data_dir: str | os.PathLike) -> dict[str, Any]:
    """hrm_jax.train.train; a run stopped by SIGTERM/SIGINT (its checkpoint saved) prints how to
    resume it and exits 0, so schedulers see a clean stop."""
    summary = training.train(run, data_dir)
    if summary["stopped_by"] is not None:
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}, checkpoint saved; continue with: "
              f"{resume_command(run.loop.out_dir)}")
        sys.exit(0)
    return summary


def resume_command(out_dir: str | os.PathLike) -> str:
    """This process's command line with --out pointing at out_dir and --resume (not --restart)."""
    argv = [arg for arg in sys.argv[1:] if arg not in ("--resume", "--restart") and not arg.startswith("--out=")]
    if "--out" in argv:
        index = argv.index("--out")
        del argv[index:index + 2]
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    module = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join(["python", *module, *argv, "--out", os.fspath(out_dir), "--resume"])


def new_run_dir(task: str, out: str | os.PathLike | None) -> pathlib.Path:
    if out is not None:
        return pathlib.Path(out)
    return RUNS_DIR / f"{task}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


# Output ----------------------------------------------------------------------------------------
def format_config(config: Any) -> str:
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))


def print_eval_table(results: dict[str, dict[str, float]], title: str = "evaluation") -> None:
    """Exact and token accuracy (last segment and Q-halted) beside the copy-the-input baseline."""
    print(f"\n{title}")
    header = (f"{'split':<22} {'count':>7} {'exact':>8} {'exact(Q)':>9} {'token':>8} {'steps(Q)':>9} "
              f"{'copy exact':>11} {'copy token':>11}")
    print(header)
    print("-" * len(header))
    for name, m in results.items():
        print(f"{name:<22} {int(m.get('count', 0)):>7} {m['exact_accuracy']:>8.2%} "
              f"{m.get('early_exact_accuracy', float('nan')):>9.2%} {m['accuracy']:>8.2%} "
              f"{m.get('early_steps', float('nan')):>9.2f} {m.get('copy_exact_accuracy', float('nan')):>11.2%} "
              f"{m.get('copy_accuracy', float('nan')):>11.2%}")


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
