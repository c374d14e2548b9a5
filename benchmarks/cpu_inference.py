"""Time solving one puzzle on the CPU with each deployable backend: ONNX Runtime, torch eager, JAX.

    python -m benchmarks.cpu_inference [--preset sudoku_extreme] [--repeats 5] [--threads N]
                                       [--backend onnx --backend torch --backend jax] [--out FILE.json]

The model is the preset at float32 with random weights (latency does not depend on the values:
every backend runs all halt_max_steps segments, the paper's evaluation). Each backend runs in a
child process of its own, so its peak resident memory (ru_maxrss) is its own; the child also
reports its RSS once the model is loaded (imports included: every backend imports hrm_jax's config,
which imports jax). Time per puzzle is the median of
--repeats solves at batch 1 after one warm-up solve (which includes jit / session set-up). The
ONNX file is exported once (minutes for the 16-segment graph) and cached under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BACKENDS = ("onnx", "torch", "jax")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(preset: str, workdir: pathlib.Path) -> dict[str, str]:
    """A params-only checkpoint, a safetensors file and the ONNX solve graph of random weights."""
    import jax  # noqa: PLC0415

    from export.convert import save_state_dict, to_torch_state_dict  # noqa: PLC0415
    from export.solvers import export_checkpoint_to_onnx  # noqa: PLC0415
    from hrm_jax.checkpoint import save_params  # noqa: PLC0415
    from hrm_jax.model import init_params  # noqa: PLC0415
    from hrm_jax.presets import MODEL_PRESETS  # noqa: PLC0415

    config = MODEL_PRESETS[preset](forward_dtype="float32")
    paths = {"checkpoint": workdir / f"{preset}-ckpt", "safetensors": workdir / f"{preset}.safetensors",
             "onnx": workdir / f"{preset}.onnx"}
    if not paths["checkpoint"].exists():
        params = jax.device_get(init_params(config, jax.random.key(0)))
        rng = np.random.default_rng(0)  # a non-zero Q head, so halting logic sees real values
        q_kernel = params["dense"]["q_head"]["kernel"]
        params["dense"]["q_head"]["kernel"] = rng.normal(0, 0.02, q_kernel.shape).astype(np.float32)
        save_params(paths["checkpoint"], params, config)
        save_state_dict(to_torch_state_dict(params, config), paths["safetensors"])
    if not paths["onnx"].exists():
        start = time.perf_counter()
        print(f"exporting the {preset} solve graph to {paths['onnx']} ...", flush=True)
        export_checkpoint_to_onnx(paths["checkpoint"], paths["onnx"])
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return {k: str(v) for k, v in paths.items()}


def _load(backend: str, paths: dict[str, str], threads: int):
    """(solve function, config) with only the backend's own runtime doing the work."""
    if backend == "onnx":
        from export.onnx import OnnxSolver  # noqa: PLC0415

        solver = OnnxSolver(paths["onnx"], threads=threads)
        return (lambda x, ids: solver.solve(x, ids).predictions), solver.config
    if backend == "torch":
        import torch  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        from export.onnx import read_metadata  # noqa: PLC0415
        from export.torch_model import HRMTorch  # noqa: PLC0415

        torch.set_num_threads(threads)
        config = read_metadata(paths["onnx"])[0]
        model = HRMTorch(config, "float32")
        model.load_state_dict(load_file(paths["safetensors"]), strict=True)
        def solve(x, ids):
            return model.solve(torch.from_numpy(x), torch.from_numpy(ids)).logits.argmax(-1).numpy()

        return solve, config
    from export.solvers import JaxSolver  # noqa: PLC0415

    solver = JaxSolver(paths["checkpoint"])
    return (lambda x, ids: solver.solve(x, ids).predictions), solver.config


def child(backend: str, paths: dict[str, str], repeats: int, threads: int) -> dict:
    rss_at_start = _rss_mib()
    solve, config = _load(backend, paths, threads)
    rss_after_load = _rss_mib()
    rng = np.random.default_rng(0)
    puzzles = [(rng.integers(1, config.vocab_size, (1, config.seq_len)).astype(np.int32), np.zeros(1, np.int32))
               for _ in range(repeats + 1)]
    start = time.perf_counter()
    solve(*puzzles[0])
    warmup_s = time.perf_counter() - start
    times = []
    for puzzle in puzzles[1:]:
        start = time.perf_counter()
        np.asarray(solve(*puzzle))  # predictions on the host: the solve is finished
        times.append(time.perf_counter() - start)
    return {"backend": backend, "median_s_per_puzzle": statistics.median(times), "min_s": min(times),
            "repeats": repeats, "first_solve_s": warmup_s, "peak_rss_mib": _peak_mib(),
            "rss_at_start_mib": rss_at_start, "rss_after_load_mib": rss_after_load, "segments": config.halt_max_steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sudoku_extreme")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="default: all three")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "hrm-cpu-bench")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(os.environ["HRM_BENCH_PATHS"]), args.repeats, args.threads)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.preset, args.workdir)
    results = []
    for backend in args.backend or BACKENDS:
        print(f"timing {backend} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_inference", "--child", backend,
                               "--repeats", str(args.repeats), "--threads", str(args.threads)],
                              env={**os.environ, "HRM_BENCH_PATHS": json.dumps(paths), "JAX_PLATFORMS": "cpu"},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  {backend} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\n{args.preset}, batch 1, float32, {args.threads} threads on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} CPUs)")
    print(f"{'backend':8} {'s/puzzle':>9} {'min s':>7} {'first':>7} {'peak RSS MiB':>13} {'RSS loaded MiB':>15}")
    for r in results:
        print(f"{r['backend']:8} {r['median_s_per_puzzle']:9.3f} {r['min_s']:7.3f} {r['first_solve_s']:7.2f} "
              f"{r['peak_rss_mib']:13.0f} {r['rss_after_load_mib']:15.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "cpus": os.cpu_count(),
                                        "python": platform.python_version(), "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
