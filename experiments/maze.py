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
from hrm_jax.trm_config import TRM_MODEL_PRESETS, TRM_TRAIN_PRESETS
from hrm_jax.config import TRAIN_PRESETS, TrainConfig, maze_hard

TASK = "maze"
PRESETS = ("maze_hard", "trm_maze", "quickstart")  # trm_maze: the Tiny Recursive Model
# Quick-start mazes: 8x8 (64 tokens, a 4x4 lattice) with paths over 10 steps, the same
# generator as the paper-sized set at a size that a small model learns on 2 CPU cores.
QUICKSTART_SIZE, QUICKSTART_MIN_PATH = 8, 10


quickstart_model = common.cpu_quickstart_model
quickstart_train = common.cpu_quickstart_train


def model_for(preset: str):
    if preset in TRM_MODEL_PRESETS:
        return TRM_MODEL_PRESETS[preset]()
    return quickstart_model() if preset == "quickstart" else maze_hard()


def train_for(preset: str) -> TrainConfig:
    if preset in TRM_TRAIN_PRESETS:
        return TRM_TRAIN_PRESETS[preset]
    return quickstart_train() if preset == "quickstart" else TRAIN_PRESETS[preset]


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
    summary = common.train_from_args(args, model_for(args.preset), train_for(args.preset), args.data, TASK)
    common.print_run_summary(summary, " (copy-the-input baseline: 0%: the input marks no path)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hrm_jax.checkpoint import load_params_for_eval  # noqa: PLC0415
    from hrm_jax.data.format import load_split  # noqa: PLC0415
    from hrm_jax.evaluate import check_model_fits_data, difficulty_bands, evaluate  # noqa: PLC0415

    params, config = load_params_for_eval(args.checkpoint)
    split = load_split(args.data, args.split)
    check_model_fits_data(config, split)
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
    from hrm_jax.data.format import load_metadata  # noqa: PLC0415
    from hrm_jax.data.maze import build_maze_dataset  # noqa: PLC0415
    from hrm_jax.train import train  # noqa: PLC0415

    data = args.data or common.RUNS_DIR / "data" / f"maze-quickstart-{args.size}x{args.size}-{args.min_path}"
    if not (pathlib.Path(data) / "train" / "dataset.json").exists():
        print(f"generating {args.size}x{args.size} mazes (shortest path > {args.min_path} steps) into {data} ...")
        build_maze_dataset(data, train_size=1000, test_size=200, min_path=args.min_path, aug=True,
                           seed=args.seed, size=args.size)
    meta = load_metadata(data, "train")
    model_config = common.model_config_for_data(quickstart_model(), data)
    train_config = quickstart_train().replace(seed=args.seed)
    out = common.new_run_dir(f"{TASK}-quickstart", args.out)
    print(f"training {common.format_config(model_config)}\n  for {args.steps} steps at batch "
          f"{train_config.global_batch_size} on {meta.total_groups} training mazes -> {out}")
    start = time.perf_counter()
    summary = train(model_config, train_config, data, out, total_steps=args.steps,
                    eval_every=max(1, args.steps // 4), checkpoint_every=max(1, args.steps // 4), log_every=10,
                    progress=not args.no_progress)
    print(f"trained and evaluated in {time.perf_counter() - start:.0f} s")
    common.print_run_summary(summary, " (copy-the-input baseline: 0%: the input marks no path)")
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
    parser = argparse.ArgumentParser(prog="python -m experiments.maze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", type=pathlib.Path, default=None, help="quick start: dataset folder (built if missing)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="quick start: run folder")
    parser.add_argument("--steps", type=common.positive_int, default=300, help="quick start: optimizer steps (default 300)")
    parser.add_argument("--size", type=int, default=QUICKSTART_SIZE, help=f"quick start: grid side (default {QUICKSTART_SIZE})")
    parser.add_argument("--min-path", type=int, default=QUICKSTART_MIN_PATH,
                        help=f"quick start: shortest paths longer than this (default {QUICKSTART_MIN_PATH})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="{build,train,eval}")

    build = sub.add_parser("build", help="generate a maze dataset (default: the paper's Maze-Hard sizes)")
    build.add_argument("--out", type=pathlib.Path, required=True)
    build.add_argument("--size", type=int, default=30, help="grid side (paper: 30)")
    build.add_argument("--min-path", type=int, default=110, help="keep mazes whose shortest path is longer (paper: 110)")
    build.add_argument("--train-size", type=common.positive_int, default=1000, help="training mazes (paper: 1000)")
    build.add_argument("--test-size", type=common.positive_int, default=1000, help="test mazes (paper: 1000)")
    build.add_argument("--aug", action="store_true",
                       help="add the 8 dihedral transforms of each training maze (the reference's --aug, off there too)")
    build.add_argument("--loop-prob", type=float, default=0.05, help="chance to open each remaining inner wall (loops)")
    build.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="train on a built dataset")
    train.add_argument("--data", type=pathlib.Path, required=True)
    train.add_argument("--preset", choices=PRESETS, default="maze_hard")
    common.add_kernel_flags(train)
    common.add_train_flags(train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on a split (with per-path-length results)")
    evaluate.add_argument("--checkpoint", type=pathlib.Path, required=True)
    evaluate.add_argument("--data", type=pathlib.Path, required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--batch-size", type=common.positive_int, default=256)
    evaluate.add_argument("--show", type=int, default=0, metavar="N", help="print the first N mazes with the model's answer")
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


@common.cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    commands = {"build": cmd_build, "train": cmd_train, "eval": cmd_eval, None: cmd_quickstart}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
