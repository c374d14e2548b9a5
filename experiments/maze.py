"""Maze-Hard with HRM: generate the mazes, train, evaluate.

    python -m experiments.maze                        # quick start: small mazes, small model, CPU, minutes
    python -m experiments.maze build --out data/maze-30x30-hard-1k
    python -m experiments.maze train --data data/maze-30x30-hard-1k --preset maze_hard
    python -m experiments.maze eval --checkpoint runs/maze-.../best --data data/maze-30x30-hard-1k --show 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from experiments import common
from hrm_jax import cli

TASK = "maze"
# Quick-start mazes: 8x8 (64 tokens, a 4x4 lattice) with paths over 10 steps, the same
# generator as the paper-sized set at a size that a small model learns on 2 CPU cores.
QUICKSTART_SIZE, QUICKSTART_MIN_PATH = 8, 10
NO_COPY_BASELINE = " (copy-the-input baseline: 0%: the input marks no path)"


# Commands ---------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from hrm_jax.data.maze import build_maze_dataset  # noqa: PLC0415

    report = build_maze_dataset(args.out, train_size=args.train_size, test_size=args.test_size,
                                min_path=args.min_path, aug=args.aug, seed=args.seed, size=args.size,
                                loop_prob=args.loop_prob)
    print(json.dumps(report, indent=1))
    print(f"built {args.out} in {report['seconds']:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    common.print_run_summary(common.train_from_args(args, TASK, args.data), NO_COPY_BASELINE)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hrm_jax.checkpoint import load_params_for_eval  # noqa: PLC0415
    from hrm_jax.data.format import load_split  # noqa: PLC0415
    from hrm_jax.evaluate import difficulty_bands, evaluate  # noqa: PLC0415

    params, config = load_params_for_eval(args.checkpoint)
    split = load_split(args.data, args.split)
    results, predictions = evaluate(params, config, split, args.batch_size, group_by=difficulty_bands(split),
                                    return_predictions=True)
    common.print_eval_table(results, f"{args.checkpoint} on {args.data}/{args.split} (groups: shortest-path length)")
    results["all"]["optimal_path_rate"] = _show(predictions, args.show)
    print(f"predictions that mark a shortest S-G path (checked by BFS): {results['all']['optimal_path_rate']:.2%}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Generate small mazes, train the quick-start model for a few minutes on the CPU, evaluate."""
    from hrm_jax.data.maze import build_maze_dataset  # noqa: PLC0415

    data = args.data or common.RUNS_DIR / "data" / f"maze-quickstart-{args.size}x{args.size}-{args.min_path}"
    if not (pathlib.Path(data) / "train" / "dataset.json").exists():
        print(f"generating {args.size}x{args.size} mazes (shortest path > {args.min_path} steps) into {data} ...")
        build_maze_dataset(data, train_size=1000, test_size=200, min_path=args.min_path, aug=True,
                           seed=args.quickstart_seed, size=args.size)
    start = time.perf_counter()
    summary = common.quickstart(args, TASK, data, evaluations=4)
    print(f"trained and evaluated in {time.perf_counter() - start:.0f} s")
    common.print_run_summary(summary, NO_COPY_BASELINE)
    print(f"\nlook at its answers: python -m experiments.maze eval --checkpoint {summary['paths']['best']} "
          f"--data {data} --show 2")
    return 0


# Helpers ---------------------------------------------------------------------------------------


def _show(predictions: dict, count: int) -> float:
    """Prints `count` mazes beside the model's answer; returns the fraction of answers that mark a
    shortest path (equal to exact accuracy here, since every label is the unique shortest path)."""
    from hrm_jax.data.maze import MazeDataError, check_label, to_text  # noqa: PLC0415

    inputs, preds = predictions["inputs"], predictions["predictions"]
    optimal = 0
    for k in range(len(inputs)):
        side = int(round(inputs.shape[1] ** 0.5))
        try:
            check_label(inputs[k].reshape(side, side), preds[k].reshape(side, side))
            verdict, optimal = "a shortest path", optimal + 1
        except MazeDataError as error:
            verdict = f"not a shortest path ({error})"
        if k < count:
            left, right = to_text(inputs[k]).splitlines(), to_text(preds[k]).splitlines()
            print(f"\nmaze {k}: model's answer is {verdict}")
            print("\n".join(f"{a}   {b}" for a, b in zip(left, right)))
    return optimal / max(1, len(inputs))




def build_parser() -> argparse.ArgumentParser:
    parser, sub = common.task_parser(TASK, __doc__)
    parser.add_argument("--size", type=int, default=QUICKSTART_SIZE,
                        help=f"quick start: grid side (default {QUICKSTART_SIZE})")
    parser.add_argument("--min-path", type=int, default=QUICKSTART_MIN_PATH,
                        help=f"quick start: shortest paths longer than this (default {QUICKSTART_MIN_PATH})")

    build = sub.add_parser("build", help="generate a maze dataset (default: the paper's Maze-Hard sizes)")
    build.add_argument("--out", type=pathlib.Path, required=True)
    build.add_argument("--size", type=int, default=30, help="grid side (paper: 30)")
    build.add_argument("--min-path", type=int, default=110,
                       help="keep mazes whose shortest path is longer (paper: 110)")
    build.add_argument("--train-size", type=cli.positive_int, default=1000, help="training mazes (paper: 1000)")
    build.add_argument("--test-size", type=cli.positive_int, default=1000, help="test mazes (paper: 1000)")
    build.add_argument("--aug", action="store_true",
                       help="add the 8 dihedral transforms of each training maze (the reference's --aug, "
                            "off there too)")
    build.add_argument("--loop-prob", type=float, default=0.05, help="chance to open each remaining inner wall (loops)")
    build.add_argument("--seed", type=int, default=0)

    common.add_train_command(sub, TASK, default_preset="maze_hard")
    evaluate = common.add_eval_command(sub, "evaluate a checkpoint on a split (with per-path-length results)")
    evaluate.add_argument("--show", type=int, default=0, metavar="N",
                          help="print the first N mazes with the model's answer")
    return parser


@cli.cli_main
def main(argv: list[str] | None = None) -> int:
    commands = {"build": cmd_build, "train": cmd_train, "eval": cmd_eval, None: cmd_quickstart}
    return common.run_main(build_parser(), commands, argv)


if __name__ == "__main__":
    sys.exit(main())
