"""Does sleep help? A server-free simulation of SAGE's learning loop on Sudoku.

A model meets a stream of puzzles from a distribution it is weaker on. Each cycle it answers
`--per-cycle` new stream puzzles; every answer is verified, scored for salience (sage.salience,
features: the one-hot puzzle; the model's report: Q-head halt logit and steps; outcome: whether
the answer verified) and offered to the experience store (sage.experience, adaptive admission);
then the model sleeps (sage.sleep: draw, label by verification or the exact solver, augment,
fine-tune, validate, publish or reject). After each
cycle the published weights are scored on a fixed set of fresh stream puzzles (never served) and
on the original held-out set. Three arms share the stream and the seeds:

    sleep            the full cycle (--augmentations symmetric variants per experience)
    no_augmentation  the same with 0 augmentations (the ablation)
    no_sleep         the model never trains (the baseline)

Writes <out>/sleep_curve.json (every cycle of every arm, the settings, the machine) and
<out>/sleep_curve.png (exact and token accuracy against cycles, stream and held-out).

With the shipped model (flags as examples):
    python -m benchmarks.sleep_curve --checkpoint RUN/best --heldout data/sudoku-extreme --max-heldout 1000 \\
        --stream ../shared/data/sudoku/17_clue.txt --cycles 10 --per-cycle 256 --steps 200 --lr 1e-5
On a CPU, with a tiny model trained from scratch on easy puzzles (a smoke run, not a result):
    python -m benchmarks.sleep_curve --tiny --cycles 2 --per-cycle 32 --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import hrm_jax as H
from hrm_jax.checkpoint import load_params_for_eval, save_params
from hrm_jax.data.format import load_split
from hrm_jax.data.sudoku import reveal_givens
from hrm_jax.data.sudoku_solver import is_valid_solution, read_collection, solve_many
from hrm_jax.evaluate import evaluate
from hrm_jax.train import init_train_state
from sage import replay, weights
from sage.experience import ExperienceStore, StoreConfig
from sage.salience import ModelReport, SalienceScorer
from sage.sleep import SleepConfig, SleepError, fine_tune, publish, sleep_cycle

DEFAULT_STREAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                              "sudoku", "17_clue.txt")
ARMS = ("sleep", "no_augmentation", "no_sleep")


def solved_puzzles(path: str, n: int, max_blanks: int | None, seed: int, skip: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n uniquely solvable puzzles of a collection and their solutions (digits), taken in the order of a
    seeded shuffle after its first `skip` puzzles (so calls with disjoint ranges never share a puzzle);
    max_blanks reveals solution cells down to that many blanks (an easier band)."""
    grids = read_collection(path).grids
    order = np.random.default_rng(seed).permutation(len(grids))[skip:]
    picked, solutions = [], []
    for start in range(0, len(order), 4 * n):
        chunk = grids[order[start:start + 4 * n]]
        counts, sols, _, _ = solve_many(chunk)
        picked += list(chunk[counts == 1])
        solutions += list(sols[counts == 1])
        if len(picked) >= n:
            break
    if len(picked) < n:
        raise SleepError(f"{path}: only {len(picked)} uniquely solvable puzzles, {n} needed")
    puzzles, solutions = np.stack(picked[:n]), np.stack(solutions[:n])
    if max_blanks is not None:
        puzzles = reveal_givens(puzzles, solutions, max_blanks, np.random.default_rng([seed, skip]))
    return puzzles, solutions


def answer(params, config, puzzles: np.ndarray, solutions: np.ndarray, batch_size: int
           ) -> tuple[np.ndarray, list[ModelReport]]:
    """The model's answers (digits [n, 81]) after a full rollout, and its report on each (the Q-head's
    last halt logit and the step it would have halted at; no token entropy: evaluate keeps no logits)."""
    _, rows = evaluate(params, config, replay.sudoku_split(puzzles, solutions), batch_size, early_halt_stats=False,
                       return_predictions=True)
    reports = [ModelReport(q_halt_logit=float(q), steps=float(s), max_steps=config.halt_max_steps,
                           vocab_size=config.vocab_size) for q, s in zip(rows["q_halt_logits"], rows["early_steps"])]
    return np.clip(rows["predictions"] - 1, 0, 9).astype(np.int8), reports


def score(params, config, split, batch_size: int) -> dict[str, float]:
    metrics = evaluate(params, config, split, batch_size, early_halt_stats=False)["all"]
    return {"exact_accuracy": metrics["exact_accuracy"], "accuracy": metrics["accuracy"]}


def run_arm(arm: str, out_dir: str, params, config, stream, stream_eval, heldout, sleep_config: SleepConfig,
            args) -> list[dict]:
    """Cycle 0 (before any sleep) and `args.cycles` cycles of serving + (for the sleeping arms) sleep."""
    weights_dir = os.path.join(out_dir, arm, "weights")
    publish(weights_dir, params, config, {"source": "sleep_curve"}, version=0)
    store = ExperienceStore(os.path.join(out_dir, arm, "store.db"),
                            StoreConfig(recent_capacity=4 * args.per_cycle, warmup=args.per_cycle // 2))
    scorer = SalienceScorer()
    current = params
    records = [{"cycle": 0, "stream": score(current, config, stream_eval, args.eval_batch_size),
                "heldout": score(current, config, heldout, args.eval_batch_size)}]
    puzzles, solutions = stream
    for cycle in range(1, args.cycles + 1):
        start = time.perf_counter()
        chunk = slice((cycle - 1) * args.per_cycle, cycle * args.per_cycle)
        answers, reports = answer(current, config, puzzles[chunk], solutions[chunk], args.eval_batch_size)
        served_exact = []
        for puzzle, reply, report in zip(puzzles[chunk], answers, reports):
            solved = is_valid_solution(puzzle, reply)
            served_exact.append(solved)
            features = np.eye(10)[puzzle].reshape(-1)
            salience = scorer.score({"sudoku": features}, reports={"sudoku": report},
                                    outcomes={"sudoku": float(solved)})["sudoku"]
            scorer.learn(salience, useful=float(not solved))  # a failed puzzle is what sleep learns from
            store.offer("sudoku", replay.sudoku_payload(puzzle, reply), salience.total)
        record = {"cycle": cycle, "served_exact": float(np.mean(served_exact)), "store": store.counts()}
        if arm != "no_sleep":
            report = sleep_cycle(weights_dir, store, heldout, sleep_config)
            record["sleep"] = {k: v for k, v in report.to_dict().items() if k in
                               ("accepted", "reason", "provenance", "train_examples", "train_loss", "seconds")}
            current, _ = load_params_for_eval(weights.read_current(weights_dir)["path"])
        record["stream"] = score(current, config, stream_eval, args.eval_batch_size)
        record["heldout"] = score(current, config, heldout, args.eval_batch_size)
        record["seconds"] = time.perf_counter() - start
        records.append(record)
        print(f"{arm:>16} cycle {cycle}: stream exact {record['stream']['exact_accuracy']:.4f} "
              f"token {record['stream']['accuracy']:.4f} | held-out exact {record['heldout']['exact_accuracy']:.4f} "
              f"token {record['heldout']['accuracy']:.4f} | {record.get('sleep', {}).get('reason', 'no sleep')}",
              flush=True)
    store.close()
    return records


def tiny_model(args, rng: np.random.Generator, sleep_config: SleepConfig):
    """A tiny HRM trained from scratch on easy puzzles (the 'original distribution') and their held-out split."""
    config = H.tiny(hidden_size=64, num_heads=2, H_layers=1, L_layers=1, H_cycles=1, L_cycles=1, halt_max_steps=2,
                    expansion=2.0)
    # The puzzles after the stream's in the same shuffle: the two never share a puzzle (solve_many may
    # skip non-unique ones, hence the margin).
    skip = 2 * (args.cycles * args.per_cycle + args.stream_eval)
    puzzles, solutions = solved_puzzles(args.stream, args.tiny_train + 64, args.tiny_blanks, args.seed, skip=skip)
    init_dir = os.path.join(args.out, "tiny_init")
    save_params(init_dir, init_train_state(config, sleep_config.train_config(), sleep_config.steps).params, config)
    params, _ = load_params_for_eval(init_dir)
    pretrain = dataclasses.replace(sleep_config, lr=1e-3)
    for _ in range(max(1, args.tiny_pretrain_steps // sleep_config.steps)):
        params, _ = fine_tune(params, config, puzzles[64:] + 1, solutions[64:] + 1, pretrain, rng)
    return params, config, replay.sudoku_split(puzzles[:64], solutions[:64], path="<tiny held-out>")


def heldout_split(args):
    split = load_split(args.heldout, args.heldout_split)
    inputs = np.concatenate([s.inputs for s in split.sets.values()])[: args.max_heldout]
    labels = np.concatenate([s.labels for s in split.sets.values()])[: args.max_heldout]
    return replay.sudoku_split(inputs.astype(np.int16) - 1, labels.astype(np.int16) - 1, path=split.path)


def plot(results: dict, path: str) -> None:
    """A 2x2 grid: exact (top) and token accuracy (bottom) on the stream (left) and held-out set (right)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for col, where in enumerate(("stream", "heldout")):
        for row, metric in enumerate(("exact_accuracy", "accuracy")):
            ax = axes[row, col]
            for arm, records in results.items():
                ax.plot([r["cycle"] for r in records], [r[where][metric] for r in records], "o-", label=arm)
            ax.set(ylabel=metric.replace("_", " "),
                   title="new stream puzzles" if where == "stream" else "original held-out set")
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("sleep cycle")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="the served model (an hrm_jax checkpoint); or --tiny")
    p.add_argument("--tiny", action="store_true", help="train a tiny model on easy puzzles instead (CPU smoke run)")
    p.add_argument("--heldout", help="dataset directory of the original held-out set (with --checkpoint)")
    p.add_argument("--heldout-split", default="test")
    p.add_argument("--max-heldout", type=int, default=1000)
    p.add_argument("--stream", default=DEFAULT_STREAM, help="collection file the stream is drawn from")
    p.add_argument("--stream-blanks", type=int, default=None, help="reveal stream puzzles down to this many blanks")
    p.add_argument("--stream-eval", type=int, default=64, help="fresh stream puzzles scored after each cycle")
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--per-cycle", type=int, default=64, help="stream puzzles served per cycle")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--tiny-train", type=int, default=256)
    p.add_argument("--tiny-blanks", type=int, default=6)
    p.add_argument("--tiny-pretrain-steps", type=int, default=300)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "sleep_curve"))
    p.add_argument("--seed", type=int, default=0)
    for name in ("experiences", "augmentations", "steps", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(SleepConfig(), name))
    for name in ("lr", "tolerance", "rehearsal_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(SleepConfig(), name))
    p.add_argument("--metric", default="exact_accuracy")
    args = p.parse_args(argv)
    if bool(args.tiny) == bool(args.checkpoint) or (args.checkpoint and not args.heldout):
        p.error("pass --checkpoint with --heldout, or --tiny")
    if not set(args.arms.split(",")) <= set(ARMS):
        p.error(f"--arms must be a subset of {ARMS}")
    if args.rehearsal_fraction:
        p.error("--rehearsal-fraction needs a rehearsal split, which this simulation does not load; leave it 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    taken = [arm for arm in args.arms.split(",") if os.path.exists(os.path.join(args.out, arm))]
    if taken:
        print(f"sleep_curve: {args.out} already holds runs of {taken}; choose a new --out", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    base = SleepConfig(experiences=args.experiences, augmentations=args.augmentations, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, tolerance=args.tolerance, metric=args.metric,
                       eval_batch_size=args.eval_batch_size, seed=args.seed)
    try:
        stream = solved_puzzles(args.stream, args.cycles * args.per_cycle + args.stream_eval, args.stream_blanks,
                                args.seed)
        if args.tiny:
            params, config, heldout = tiny_model(args, rng, base)
        else:
            params, config = load_params_for_eval(args.checkpoint)
            heldout = heldout_split(args)
    except (SleepError, OSError, ValueError) as err:
        print(f"sleep_curve: {err}", file=sys.stderr)
        return 2
    stream_eval = replay.sudoku_split(stream[0][-args.stream_eval:], stream[1][-args.stream_eval:],
                                      path="<fresh stream puzzles>")
    served = (stream[0][:-args.stream_eval], stream[1][:-args.stream_eval])
    results = {}
    for arm in args.arms.split(","):
        config_arm = dataclasses.replace(base, augmentations=0) if arm == "no_augmentation" else base
        results[arm] = run_arm(arm, args.out, params, config, served, stream_eval, heldout, config_arm, args)
    record = {"settings": {k: v for k, v in vars(args).items()}, "model_config": config.to_dict(),
              "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} CPUs)", "arms": results}
    with open(os.path.join(args.out, "sleep_curve.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    plot(results, os.path.join(args.out, "sleep_curve.png"))
    print(f"wrote {os.path.join(args.out, 'sleep_curve.json')} and sleep_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
