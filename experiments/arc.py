"""ARC-AGI with HRM: build the augmented data, train, score by voting over augmentations.

    python -m experiments.arc                         # quick start: a handful of small tasks, CPU, minutes
    python -m experiments.arc build --out data/arc-aug-1000                       # ARC-AGI-1 (paper)
    python -m experiments.arc build --dataset arc2 --eval PATH --out data/arc-2-aug-1000
    python -m experiments.arc train --preset arc1     # data/arc-aug-1000 unless --data
    python -m experiments.arc eval --checkpoint runs/arc-.../best --data data/arc-aug-1000
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from experiments import common
from hrm_jax import cli
from hrm_jax.presets import ARC_QUICKSTART_GRID

TASK = "arc"
# The reference's output folders (dataset/build_arc_dataset.py).
DEFAULT_DATA = {"arc1": pathlib.Path("data/arc-aug-1000"), "arc2": pathlib.Path("data/arc-2-aug-1000")}
QUICKSTART_DATA = common.RUNS_DIR / "data" / "arc-quickstart"
SAMPLE_TASKS = 16  # per source in hrm_jax/data/samples/arc


# Commands ---------------------------------------------------------------------------------------
def _sources(args: argparse.Namespace):
    from hrm_jax.data.arc_build import Source, arc1_sources, arc2_sources  # noqa: PLC0415

    if args.dataset == "arc2":
        if args.eval is None:
            raise cli.CLIError("--dataset arc2 needs --eval PATH: the ARC-AGI-2 evaluation tasks are not bundled "
                                  "(a JSON file of tasks or a folder such as ARC-AGI-2/data/evaluation)")
        return arc2_sources(args.eval, args.source_dir)
    sources = arc1_sources(args.source_dir)
    if args.eval is not None:
        sources = sources[:-1] + [Source(str(args.eval), "eval")]
    return sources


def cmd_build(args: argparse.Namespace) -> int:
    from hrm_jax.data.arc_build import build_arc_dataset  # noqa: PLC0415

    report = build_arc_dataset(args.out, _sources(args), num_aug=args.num_aug, seed=args.seed,
                               max_tasks=args.max_tasks, grid_size=args.grid_size)
    print(json.dumps(report, indent=1))
    print(f"built {args.out} in {report['seconds']['total']:.1f} s")
    return 0


def _data_for(args: argparse.Namespace) -> pathlib.Path:
    data = args.data or DEFAULT_DATA.get(args.preset)
    if data is None:
        raise cli.CLIError(f"--preset {args.preset} needs --data DIR (a dataset built with `build`)")
    return data


def cmd_train(args: argparse.Namespace) -> int:
    data = _data_for(args)
    summary = common.train_from_args(args, TASK, data)
    _print_summary(summary)
    print(f"\nscore by voting: python -m experiments.arc eval --checkpoint {summary['paths']['best']} --data {data}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hrm_jax.checkpoint import load_params_for_eval  # noqa: PLC0415

    params, config = load_params_for_eval(args.checkpoint)
    scores = _score(params, config, args.data, args.split, args.batch_size, not args.keep_empty)
    _write_outputs(scores, args.json, args.attempts)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Build a few small tasks, train the quick-start model on the CPU, score by voting."""
    from hrm_jax.data.arc_build import arc1_sources, build_arc_dataset, sample_data_dir  # noqa: PLC0415

    data = args.data or QUICKSTART_DATA
    if args.tasks > SAMPLE_TASKS:
        raise cli.CLIError(f"--tasks {args.tasks}: the bundled sample holds {SAMPLE_TASKS} tasks per source; "
                           "for more, build a dataset from the full collections (`build`) and train on it")
    if not (pathlib.Path(data) / "train" / "dataset.json").exists():
        print(f"building a quick-start dataset ({args.tasks} smallest tasks per source, {args.num_aug} "
              f"augmentations each, {ARC_QUICKSTART_GRID}x{ARC_QUICKSTART_GRID} canvas) into {data} ...")
        build_arc_dataset(data, arc1_sources(sample_data_dir()), num_aug=args.num_aug, seed=args.quickstart_seed,
                          max_tasks=args.tasks, grid_size=ARC_QUICKSTART_GRID)
    start = time.perf_counter()
    summary = common.quickstart(args, TASK, data, evaluations=1)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    _print_summary(summary)
    run = summary["config"]
    _score(summary["state"].params, run.model, data, "test", run.optim.global_batch_size, True)
    return 0


# Helpers ---------------------------------------------------------------------------------------
def _score(params, config, data, split_name: str, batch_size: int, drop_invalid: bool) -> dict:
    from hrm_jax.arc_eval import evaluate_arc, load_identifiers  # noqa: PLC0415
    from hrm_jax.data.format import load_split  # noqa: PLC0415

    split = load_split(data, split_name)
    identifiers = load_identifiers(data, split.metadata.num_puzzle_identifiers)
    start = time.perf_counter()
    metrics, scores = evaluate_arc(params, config, split, identifiers, batch_size, drop_invalid=drop_invalid)
    common.print_eval_table(metrics, f"per-example evaluation of {data}/{split_name}")
    print_arc_table(scores, f"ARC scoring by voting ({time.perf_counter() - start:.0f} s)")
    return scores


def print_arc_table(scores: dict, title: str) -> None:
    """pass@k (notebook: all test inputs of a task right) and the ARC Prize fraction, beside copying the input."""
    print(f"\n{title}: {scores['tasks']} tasks, {scores['test_inputs']} test inputs")
    ks = [int(key.split("@")[1]) for key in scores if key.startswith("pass@")]
    header = f"{'':<28}" + "".join(f"{f'pass@{k}':>10}" for k in ks)
    print(header + "\n" + "-" * len(header))
    print(f"{'HRM, all test inputs':<28}" + "".join(f"{scores[f'pass@{k}']:>10.2%}" for k in ks))
    print(f"{'HRM, ARC Prize (fraction)':<28}" + "".join(f"{scores[f'prize_pass@{k}']:>10.2%}" for k in ks))
    print(f"{'copy the input (baseline)':<28}" + "".join(f"{scores['copy_pass']:>10.2%}" for _ in ks))


def _write_outputs(scores: dict, json_path, attempts_path) -> None:
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps({k: v for k, v in scores.items() if k != "attempts"}, indent=1))
        print(f"scores: {json_path}")
    if attempts_path:
        pathlib.Path(attempts_path).write_text(json.dumps(scores["attempts"]))
        print(f"attempts (ARC Prize submission form): {attempts_path}")


def _print_summary(summary: dict) -> None:
    if summary.get("eval"):
        common.print_eval_table({"test (last eval)": summary["eval"]}, "per-example evaluation during training")
    paths = summary["paths"]
    print(f"\nsteps: {summary['step']} of {summary['total_steps']}\nbest checkpoint: {paths['best']}\n"
          f"metrics: {paths['metrics']}\nplot: {paths['plot']}")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = common.task_parser(TASK, __doc__)
    parser.add_argument("--tasks", type=cli.positive_int, default=4,
                        help="quick start: smallest tasks per source (default 4)")
    parser.add_argument("--num-aug", type=cli.non_negative_int, default=16,
                        help="quick start: augmentations per task (default 16)")

    build = sub.add_parser("build", help="build an augmented dataset (the reference's protocol)")
    build.add_argument("--out", type=pathlib.Path, required=True)
    build.add_argument("--dataset", choices=("arc1", "arc2"), default="arc1",
                       help="arc1: ARC-AGI-1 training + ConceptARC, test = ARC-AGI-1 evaluation; arc2: ARC-AGI-2")
    build.add_argument("--eval", type=pathlib.Path, default=None,
                       help="evaluation tasks (JSON file or folder): required for arc2, replaces ARC-AGI-1 "
                            "evaluation for arc1")
    build.add_argument("--source-dir", type=pathlib.Path, default=None,
                       help="folder of the packed task files (default $HRM_ARC_DATA or ../shared/data/arc)")
    build.add_argument("--num-aug", type=cli.non_negative_int, default=1000,
                       help="augmented versions per task (paper: 1000)")
    build.add_argument("--seed", type=int, default=42, help="the reference's default seed")
    build.add_argument("--max-tasks", type=cli.positive_int, default=None,
                       help="keep only this many smallest tasks per source")
    build.add_argument("--grid-size", type=cli.positive_int, default=30,
                       help="canvas side (30 = the paper's 900 tokens; smaller keeps only tasks that fit, "
                            "for CPU trials)")

    common.add_train_command(sub, TASK, default_preset="arc1",
                             data_help="default data/arc-aug-1000 (arc1), data/arc-2-aug-1000 (arc2)",
                             preset_help="arc1/arc2: the paper's hrm_v1 model and ARC training settings; "
                                         "quickstart: CPU-sized")
    evaluate = common.add_eval_command(sub, "score a checkpoint by voting over augmentations (pass@k)")
    evaluate.add_argument("--keep-empty", action="store_true",
                          help="let predictions without a grid vote (as the reference notebook; they are never right)")
    evaluate.add_argument("--attempts", default=None, help="write the top-2 answers per test input (ARC Prize form)")
    return parser


@cli.cli_main
def main(argv: list[str] | None = None) -> int:
    commands = {"build": cmd_build, "train": cmd_train, "eval": cmd_eval, None: cmd_quickstart}
    return common.run_main(build_parser(), commands, argv)


if __name__ == "__main__":
    sys.exit(main())
