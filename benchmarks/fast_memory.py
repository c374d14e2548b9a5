"""Capacity of the fast-weight memory: recall against the number of stored associations.

Random Gaussian keys and values (d = --dim), one association per episode, gate 1; an association
counts as recalled when the read-out of its key is more cosine-similar to its own value than to
every other stored value. Prints a table and writes benchmarks/results/fast_memory_capacity.{json,png}.

    python -m benchmarks.fast_memory [--dim 64] [--slots 64] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sage.fast_memory import FastMemory, FastMemoryConfig, recall_accuracy

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def capacity_curve(dim: int, slots: int, counts: list[int], seeds: int) -> dict[str, list[float]]:
    """Mean recall of all n stored items, and of the newest and oldest quarters, per n."""
    rows = {"stored": counts, "recall": [], "recall_newest_quarter": [], "recall_oldest_quarter": []}
    for n in counts:
        per_seed = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            keys, values = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
            memory = FastMemory(FastMemoryConfig(dim=dim, slots=slots, gate_warmup=10**9, seed=seed))
            for k, v in zip(keys, values):
                memory.begin_episode()
                memory.write(k, v, 1.0)
            quarter = max(n // 4, 1)
            newest = np.concatenate([values[-quarter:], values[:-quarter]])
            per_seed.append((recall_accuracy(memory, keys, values),
                             recall_accuracy(memory, keys[-quarter:], newest),
                             recall_accuracy(memory, keys[:quarter], values)))
        mean = np.mean(per_seed, axis=0)
        for name, value in zip(list(rows)[1:], mean):
            rows[name].append(float(value))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=RESULTS, help="directory for the JSON and PNG")
    args = parser.parse_args(argv)
    if min(args.dim, args.slots, args.seeds) < 1:
        parser.error("--dim, --slots and --seeds must be >= 1")
    counts = sorted({max(1, int(args.slots * f)) for f in (0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)})
    rows = capacity_curve(args.dim, args.slots, counts, args.seeds)
    print(f"fast-weight memory capacity, d={args.dim}, r={args.slots}, {args.seeds} seeds")
    print(f"{'stored':>7} {'recall':>7} {'newest 1/4':>11} {'oldest 1/4':>11} {'min(1, r/n)':>12}")
    for i, n in enumerate(counts):
        print(f"{n:>7} {rows['recall'][i]:>7.3f} {rows['recall_newest_quarter'][i]:>11.3f} "
              f"{rows['recall_oldest_quarter'][i]:>11.3f} {min(1.0, args.slots / n):>12.3f}")
    os.makedirs(args.out, exist_ok=True)
    record = {"dim": args.dim, "slots": args.slots, "seeds": args.seeds, "machine": platform.processor() or
              platform.machine(), **rows}
    with open(os.path.join(args.out, "fast_memory_capacity.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, rows["recall"], "o-", label="all stored")
    ax.plot(counts, rows["recall_newest_quarter"], "s--", label="newest quarter")
    ax.plot(counts, rows["recall_oldest_quarter"], "^--", label="oldest quarter")
    ax.plot(counts, [min(1.0, args.slots / n) for n in counts], ":", color="gray", label="min(1, r/n)")
    ax.axvline(args.slots, color="gray", lw=0.5)
    ax.set(xlabel="associations stored", ylabel="recall", title=f"fast-weight memory, d={args.dim}, r={args.slots}",
           ylim=(-0.02, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fast_memory_capacity.png"), dpi=120)
    print(f"wrote {os.path.join(args.out, 'fast_memory_capacity.png')}")


if __name__ == "__main__":
    main()
