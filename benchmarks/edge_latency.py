"""Per-puzzle latency, peak memory, exact accuracy and ACT steps of a trained Sudoku model on real puzzles.

    python -m benchmarks.edge_latency --checkpoint RUN_OR_CKPT --data DIR --split test_news \\
        [--backend onnx --backend torch --backend jax] [--batch 1 --batch 1024] [--puzzles 200] [--out FILE.json]

Each (backend, early halting) pair runs in a child process of its own, so its peak resident memory
(ru_maxrss) is its own. Batch 1: the latency of each puzzle solved alone (p50/p95 over --puzzles
puzzles, after one warm-up solve). Larger batches: the time of each batch divided by its size.
"all 16" runs every ACT segment (the paper's evaluation); "early halt" stops a row at the first
segment whose q_halt > q_continue. torch stops computing once every row of the batch has stopped and
onnx-loop (the segment graph driven from the host, export/onnx_runtime.py OnnxLoopSolver) drops each
row as it halts; the JAX rollout and the ONNX solve graph compute every segment and pick the early
answer, so their time does not fall with early halting (reported as measured). Validity is checked against the
Sudoku rules and the given clues, not against the label.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from export.onnx_runtime import OnnxLoopSolver
from export.solvers import TorchSolver, export_checkpoint_to_onnx, load_solver
from hrm_jax.data.format import load_split
from hrm_jax.data.sudoku_solver import is_valid_solution

BACKENDS = ("onnx", "onnx-loop", "torch", "jax")


def _solver(backend: str, checkpoint: str, onnx_path: str | None, early_halt: bool, device: str | None,
            segment_path: str | None = None, threads: int | None = None):
    if backend == "onnx-loop":
        return OnnxLoopSolver(segment_path, early_halt=early_halt, threads=threads)
    if backend == "torch" and device:
        return TorchSolver(checkpoint, early_halt=early_halt, device=device)
    return load_solver(backend, checkpoint, onnx_path=onnx_path, early_halt=early_halt)


def _puzzles(data: str, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    pset = load_split(data, split).sets["all"]
    take = np.arange(count) % len(pset.inputs)  # repeats the split when a batch is larger than it
    return np.asarray(pset.inputs, np.int32)[take], np.asarray(pset.labels, np.int32)[take]


def child(args: argparse.Namespace, backend: str, batches: list[int]) -> list[dict]:
    """Every (batch, early halting) row of one backend, loaded once."""
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    solver = _solver(backend, args.checkpoint, args.onnx, False, args.device, args.onnx_segment, args.threads)
    rows = []
    for batch in batches:
        for early in (False, True):
            solver.early_halt = early  # every solver reads it at solve time
            rows.append({"backend": backend, "early_halt": early, "batch": batch, **_measure(solver, args, batch)})
    return rows


def _measure(solver, args: argparse.Namespace, batch: int) -> dict:
    count = args.puzzles if batch == 1 else max(args.puzzles, batch)
    inputs, labels = _puzzles(args.data, args.split, count)
    ids = np.zeros(batch, np.int32)
    solver.solve(inputs[:batch], ids)  # warm-up: compilation or session set-up
    times, predictions, steps = [], [], []
    for start in range(0, len(inputs) - batch + 1, batch):
        t0 = time.perf_counter()
        result = solver.solve(inputs[start:start + batch], ids)
        predictions.append(np.asarray(result.predictions))  # on the host: the solve is finished
        times.append((time.perf_counter() - t0) / batch)
        steps.append(np.asarray(result.steps))
    predictions, steps = np.concatenate(predictions), np.concatenate(steps)
    solved = labels[: len(predictions)]
    valid = [p.min() >= 2 and is_valid_solution((x - 1).clip(0).astype(np.int8), (p - 1).astype(np.int8))
             for x, p in zip(inputs, predictions)]
    return {"puzzles": int(len(predictions)), "p50_ms": 1e3 * float(np.percentile(times, 50)),
            "p95_ms": 1e3 * float(np.percentile(times, 95)),
            "exact": float(np.mean(np.all(predictions == solved, axis=1))), "valid": float(np.mean(valid)),
            "mean_steps": float(steps.mean()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edge_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder or checkpoint of a Sudoku model")
    parser.add_argument("--data", required=True, help="a dataset folder with the split to solve")
    parser.add_argument("--split", default="test_news")
    parser.add_argument("--backend", action="append", choices=BACKENDS, default=None)
    parser.add_argument("--batch", action="append", type=int, default=None, help="batch sizes (default 1)")
    parser.add_argument("--puzzles", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (OMP_NUM_THREADS) for the children")
    parser.add_argument("--device", default=None, help="torch device (default: cuda where present)")
    parser.add_argument("--onnx", default=None, help="an exported solve graph (default: exported once into a temp dir)")
    parser.add_argument("--onnx-segment", default=None,
                        help="an exported segment graph for onnx-loop (default: exported once into a temp dir)")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        backend, *batches = args.child.split(",")
        print(json.dumps(child(args, backend, [int(b) for b in batches])))
        return 0
    backends, batches = args.backend or list(BACKENDS), args.batch or [1]
    if "onnx" in backends and args.onnx is None:
        args.onnx = str(export_checkpoint_to_onnx(args.checkpoint, os.path.join(tempfile.mkdtemp(), "model.onnx")))
    if "onnx-loop" in backends and args.onnx_segment is None:
        segment = os.path.join(tempfile.mkdtemp(), "model.segment.onnx")
        args.onnx_segment = str(export_checkpoint_to_onnx(args.checkpoint, segment, graph="segment"))
    rows = []
    for backend in backends:
        command = [sys.executable, "-m", "benchmarks.edge_latency", *_forward(args), "--child",
                   ",".join(map(str, [backend, *batches]))]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{backend}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.append(r)
            print(f"{backend:<6} batch {r['batch']:>5} {'early halt' if r['early_halt'] else 'all 16    '}  "
                  f"p50 {r['p50_ms']:8.2f} ms  p95 {r['p95_ms']:8.2f} ms  exact {r['exact']:.1%}  "
                  f"valid {r['valid']:.1%}  steps {r['mean_steps']:.2f}  peak RSS {r['peak_rss_mib']:.0f} MiB",
                  flush=True)
    if args.out:
        machine = {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count()}
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "split": args.split, "rows": rows}, f, indent=1)
    return 0


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--checkpoint", args.checkpoint, "--data", args.data, "--split", args.split, "--puzzles", str(args.puzzles)]
    for flag in ("threads", "device", "onnx", "onnx_segment"):
        if getattr(args, flag):
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
