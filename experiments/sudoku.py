"""Sudoku with HRM: build the data, train, evaluate, solve.

    python -m experiments.sudoku                      # quick start: small data, small model, CPU, minutes
    python -m experiments.sudoku build --out data/sudoku-extreme-1k-aug-1000
    python -m experiments.sudoku train --data data/sudoku-extreme-1k-aug-1000 --preset sudoku_extreme
    python -m experiments.sudoku eval --checkpoint runs/sudoku-.../best --data DIR
    python -m experiments.sudoku solve 4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np

from experiments import common
from hrm_jax import cli, pretrained
from hrm_jax.data.sudoku_solver import SudokuFormatError, format_puzzle, is_valid_solution, parse_puzzle

TASK = "sudoku"
QUICKSTART_DATA = common.RUNS_DIR / "data" / "sudoku-quickstart"
SOLVE_BATCH = 64  # puzzles of a file solved per call


# Commands ---------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from hrm_jax.data.sudoku import build_sudoku_dataset  # noqa: PLC0415

    start = time.perf_counter()
    report = build_sudoku_dataset(args.out, source_dir=args.source, train_size=args.train_size,
                                  num_aug=args.num_aug, test_size=args.test_size, seed=args.seed,
                                  workers=args.workers, max_blanks=args.max_blanks)
    print(json.dumps({k: report[k] for k in report if k != "rejected_lines"}, indent=1, default=str)[:4000])
    print(f"built {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_build_mixed(args: argparse.Namespace) -> int:
    from hrm_jax.data import sudoku_mix  # noqa: PLC0415
    from hrm_jax.data.sudoku import default_source_dir  # noqa: PLC0415

    start = time.perf_counter()
    if args.bases is not None:
        bases = sudoku_mix.load_bases(args.bases)
    else:
        sizes = sudoku_mix.BaseSizes(train_hard=args.train_hard)
        bases = sudoku_mix.select_bases(args.source or default_source_dir(), sizes, seed=args.seed,
                                        workers=args.workers)
        if args.bases_out is not None:
            sudoku_mix.save_bases(args.bases_out, bases)
    report = sudoku_mix.build_mixed_dataset(args.out, bases, variants=args.variants, seed=args.seed,
                                            workers=args.workers)
    print(json.dumps(report, indent=1))
    print(f"built {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    common.print_run_summary(common.train_from_args(args, TASK, args.data))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hrm_jax.data.format import load_split  # noqa: PLC0415
    from hrm_jax.evaluate import difficulty_bands, evaluate  # noqa: PLC0415
    from hrm_jax.pretrained import load_model  # noqa: PLC0415

    params, config = load_model(args.checkpoint)
    split = load_split(args.data, args.split)
    results = evaluate(params, config, split, args.batch_size, group_by=difficulty_bands(split))
    common.print_eval_table(results, f"{args.checkpoint} on {args.data}/{args.split}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    """Solve one puzzle given on the command line, or every puzzle of a file (one per line)."""
    puzzles, bad = _read_puzzles(args.puzzle)
    for line, error in bad:
        print(f"{args.puzzle}:{line}: skipped: {error}", file=sys.stderr)
    if not puzzles:
        raise cli.CLIError(f"{args.puzzle}: no puzzle to solve ({len(bad)} bad lines); write one puzzle of 81 "
                           "characters per line, '1'-'9' for givens and '.' or '0' for blanks")
    model = args.model or args.checkpoint or pretrained.PRETRAINED
    solver = _load_solver(args.backend, None if args.backend == "onnx" and args.onnx else model, args.onnx,
                          args.engine, args.early_halt)
    if (solver.config.seq_len, solver.config.vocab_size) != (81, 11):
        raise cli.CLIError(f"the model has seq_len {solver.config.seq_len} and vocab {solver.config.vocab_size}; "
                           "a Sudoku model has 81 and 11: pass a checkpoint or export of a Sudoku run")
    invalid = 0
    for start in range(0, len(puzzles), SOLVE_BATCH):
        chunk = puzzles[start:start + SOLVE_BATCH]
        grids = np.stack([grid for _, grid in chunk])
        inputs = grids.astype(np.int32) + 1  # the reference's encoding: blank 1, digit d -> d + 1
        result = solver.solve(inputs, np.zeros(len(chunk), np.int32))
        for (line, grid), prediction, steps, q_halt in zip(chunk, result.predictions, result.steps, result.q_halt):
            solution = np.clip(np.asarray(prediction) - 1, 0, 9).astype(np.int8)  # pad/blank tokens -> 0
            valid = bool(np.all(solution >= 1)) and is_valid_solution(grid, solution)
            invalid += not valid
            _report(args, line, grid, solution, int(steps), float(q_halt), valid, solver.name)
    if len(puzzles) > 1 and not args.json:
        print(f"{len(puzzles) - invalid} of {len(puzzles)} puzzles solved with a valid grid"
              f"{f'; {len(bad)} bad lines skipped' if bad else ''}")
    if args.bench:
        _bench(solver, puzzles[0][1].astype(np.int32)[None] + 1, np.zeros(1, np.int32), args.bench)
    return 0 if invalid == 0 else 1


def _read_puzzles(text: str) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int, str]]]:
    """([(line number, grid)], [(line number, what is wrong)]) of a puzzle file, or of one puzzle (line 1) when
    `text` is not a file. Blank lines and lines starting with '#' are skipped silently."""
    if not os.path.isfile(text):
        return [(1, parse_puzzle(text))], []  # one puzzle: a bad one is an error (SudokuFormatError)
    try:
        lines = pathlib.Path(text).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise cli.CLIError(f"{text}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    puzzles, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            puzzles.append((number, parse_puzzle(line)))
        except SudokuFormatError as error:
            bad.append((number, str(error)))
    return puzzles, bad


def _report(args, line: int, grid: np.ndarray, solution: np.ndarray, steps: int, q_halt: float, valid: bool,
            backend: str) -> None:
    if args.json:
        print(json.dumps({"line": line, "puzzle": format_puzzle(grid), "solution": "".join(map(str, solution)),
                          "steps": steps, "valid": valid, "q_halt": round(q_halt, 4), "backend": backend}))
        return
    if os.path.isfile(args.puzzle):
        print(f"\nline {line}:")
    print(_grid(solution))
    print(f"backend {backend}, ACT steps {steps}, "
          f"{'a valid solution' if valid else 'NOT a valid solution'} of the given puzzle")


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Show the shipped model on held-out puzzles, then build a small set, train the quickstart model for a few
    minutes on the CPU and evaluate it."""
    from hrm_jax.data.sudoku import build_quickstart_dataset, default_source_dir  # noqa: PLC0415

    if not args.skip_shipped:
        show_shipped_model(args.shipped_puzzles)
        print("\nNow training a small model from scratch on the CPU (the shipped one took 14 minutes on a GPU):")
    data = args.data or QUICKSTART_DATA
    if not (pathlib.Path(data) / "train" / "dataset.json").exists():
        source = default_source_dir()
        print(f"building a quick-start dataset from {source} into {data} ...")
        build_quickstart_dataset(data, source_dir=source, seed=args.quickstart_seed, max_blanks=args.max_blanks)
    summary = common.quickstart(args, TASK, data, evaluations=4)
    common.print_run_summary(summary)
    print("\nsolve a puzzle with it: python -m experiments.sudoku solve --checkpoint "
          f"{summary['paths']['best']} PUZZLE")
    return 0


def show_shipped_model(per_band: int) -> None:
    """The shipped model on held-out puzzles: three solved on screen, then exact accuracy per band."""
    backend = "torch" if importlib.util.find_spec("torch") else "jax"  # torch's eager loop stops at the halt
    solver = _load_solver(backend, pretrained.PRETRAINED, None, None, early_halt=True)
    sample = pretrained.heldout_sample()
    print(f"The shipped Sudoku model ({pretrained.model_dir()}/MODEL_CARD.md) on held-out puzzles it never saw, "
          f"backend {backend}, halting when its Q head says so:")
    for band, index in (("news", 0), ("news", 1), ("17clue", 0)):
        puzzle, _ = sample[band][index]
        answer, steps, valid, seconds = _solve_one(solver, puzzle)
        print(f"\n{band} puzzle ({int((puzzle > 0).sum())} clues)   ->   answer: {steps} ACT steps, "
              f"{'valid' if valid else 'NOT valid'}, {1e3 * seconds:.0f} ms")
        print("\n".join(f"{a}      {b}" for a, b in zip(_grid(puzzle).splitlines(), _grid(answer).splitlines())))
    print(f"\nexact accuracy on the first {per_band} held-out puzzles of two bands, solved as one batch each "
          "(the model card has 1,000 per band, and the hardest band, which it does not solve):")
    print(f"{'band':<10} {'puzzles':>7} {'exact':>7} {'valid':>7} {'mean steps':>11} {'seconds':>8}")
    for band in ("news", "17clue"):
        puzzles, solutions = (np.stack(grids) for grids in zip(*sample[band][:per_band]))
        start = time.perf_counter()
        result = solver.solve(puzzles.astype(np.int32) + 1, np.zeros(len(puzzles), np.int32))
        seconds = time.perf_counter() - start
        answers = np.clip(np.asarray(result.predictions) - 1, 0, 9).astype(np.int8)
        valid = [bool(np.all(a >= 1)) and is_valid_solution(p, a) for p, a in zip(puzzles, answers)]
        print(f"{band:<10} {len(puzzles):>7} {np.mean(np.all(answers == solutions, axis=1)):>7.0%} "
              f"{np.mean(valid):>7.0%} {np.mean(result.steps):>11.1f} {seconds:>8.1f}")


def _solve_one(solver, puzzle: np.ndarray) -> tuple[np.ndarray, int, bool, float]:
    start = time.perf_counter()
    result = solver.solve(puzzle.astype(np.int32)[None] + 1, np.zeros(1, np.int32))
    seconds = time.perf_counter() - start
    answer = np.clip(np.asarray(result.predictions[0]) - 1, 0, 9).astype(np.int8)
    return answer, int(result.steps[0]), bool(np.all(answer >= 1)) and is_valid_solution(puzzle, answer), seconds


# Helpers ---------------------------------------------------------------------------------------


def _load_solver(backend: str, checkpoint, onnx_path, engine_path, early_halt: bool):
    from export.solvers import load_solver  # noqa: PLC0415  (imports each runtime only when chosen)

    if backend == "onnx" and onnx_path is None:
        print(f"exporting {checkpoint} to ONNX first (minutes for the paper's model; pass --onnx FILE to reuse "
              "an export "
              "from `python -m export onnx`)")
    return load_solver(backend, checkpoint, onnx_path=onnx_path, engine_path=engine_path, early_halt=early_halt)


def _bench(solver, inputs, ids, repeats: int) -> None:
    """Latency per puzzle (median of `repeats` after one warm-up) and peak resident memory."""
    import resource  # noqa: PLC0415
    import statistics  # noqa: PLC0415

    solver.solve(inputs, ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solver.solve(inputs, ids)
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"latency per puzzle: median {1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f} ms "
          f"over {repeats} runs; peak RSS {peak_mib:.0f} MiB (whole process)")


def _grid(cells: np.ndarray) -> str:
    rows = []
    for r in range(9):
        row = " ".join(str(int(c)) if 1 <= c <= 9 else "?" for c in cells[9 * r: 9 * r + 9])
        rows.append(" | ".join([row[0:5], row[6:11], row[12:17]]))
        if r in (2, 5):
            rows.append("------+-------+------")
    return "\n".join(rows)




def build_parser() -> argparse.ArgumentParser:
    parser, sub = common.task_parser(TASK, __doc__)
    parser.add_argument("--max-blanks", type=int, default=None,
                        help="quick start: reveal solution cells until at most this many blanks remain")
    parser.add_argument("--shipped-puzzles", type=cli.positive_int, default=8,
                        help="quick start: held-out puzzles per band the shipped model solves first (default 8)")
    parser.add_argument("--skip-shipped", action="store_true", help="quick start: skip the shipped model's demo")

    build = sub.add_parser("build", help="build a dataset from the puzzle collections")
    build.add_argument("--out", type=pathlib.Path, required=True)
    build.add_argument("--source", type=pathlib.Path, default=None,
                       help="puzzle collections (default $HRM_SUDOKU_DATA or ../shared/data/sudoku)")
    build.add_argument("--train-size", type=cli.positive_int, default=1000, help="training puzzles (paper: 1000)")
    build.add_argument("--num-aug", type=int, default=1000, help="augmentations per training puzzle (paper: 1000)")
    build.add_argument("--test-size", type=int, default=None,
                       help="test puzzles (default: every remaining hard puzzle)")
    build.add_argument("--max-blanks", type=int, default=None,
                       help="reveal solution cells until at most this many blanks remain (easier puzzles)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--workers", type=int, default=None, help="solver processes (default: all CPUs)")

    mixed = sub.add_parser("build-mixed", help="build a mixed-difficulty set (17-clue, newspaper-style, hardest)")
    mixed.add_argument("--out", type=pathlib.Path, required=True)
    mixed.add_argument("--bases", type=pathlib.Path, default=None,
                       help="base puzzles saved by --bases-out (skips solving)")
    mixed.add_argument("--bases-out", type=pathlib.Path, default=None, help="also save the solved base puzzles here")
    mixed.add_argument("--source", type=pathlib.Path, default=None, help="puzzle collections (default as build)")
    mixed.add_argument("--train-hard", type=cli.positive_int, default=12000, help="forum-hardest training bases")
    mixed.add_argument("--variants", type=cli.positive_int, default=32, help="examples per training base")
    mixed.add_argument("--seed", type=int, default=0)
    mixed.add_argument("--workers", type=int, default=None, help="solver processes (default: all CPUs)")

    common.add_train_command(sub, TASK, default_preset="sudoku_extreme")
    common.add_eval_command(sub, "evaluate a checkpoint on a split (with per-difficulty results)")

    solve = sub.add_parser("solve", help="solve a puzzle (81 chars, '.' or '0' for blanks) or a file of them")
    solve.add_argument("puzzle", metavar="PUZZLE_OR_FILE",
                       help="81 characters row by row, or a file with one puzzle per line (# comments allowed)")
    solve.add_argument("--model", default=None,
                       help="'pretrained' (the shipped model, the default), 'pretrained:NAME', or a checkpoint dir")
    solve.add_argument("--checkpoint", type=pathlib.Path, default=None, help="a run's checkpoint (same as --model)")
    solve.add_argument("--json", action="store_true",
                       help="one JSON object per puzzle per line: line, puzzle, solution, steps, valid, q_halt")
    solve.add_argument("--backend", choices=("jax", "torch", "onnx", "tensorrt"), default="jax")
    solve.add_argument("--onnx", type=pathlib.Path, default=None,
                       help="ONNX file (backend onnx; exported on the fly if omitted)")
    solve.add_argument("--engine", type=pathlib.Path, default=None, help="TensorRT engine (backend tensorrt)")
    solve.add_argument("--early-halt", action="store_true",
                       help="stop when the Q head says halt (default: all segments, as the paper's evaluation)")
    solve.add_argument("--bench", type=int, nargs="?", const=20, default=0, metavar="N",
                       help="also time N solves (default 20): latency per puzzle and peak memory")
    return parser


@cli.cli_main
def main(argv: list[str] | None = None) -> int:
    commands = {"build": cmd_build, "build-mixed": cmd_build_mixed, "train": cmd_train, "eval": cmd_eval,
                "solve": cmd_solve, None: cmd_quickstart}
    return common.run_main(build_parser(), commands, argv)


if __name__ == "__main__":
    sys.exit(main())
