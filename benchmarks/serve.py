"""Requests/s and latency of `python -m sage serve` through the mailboxes, against the solver called directly.

    python -m benchmarks.serve [--preset tiny] [--clients 1 8 64] [--seconds 10] [--out FILE.json]
    python -m benchmarks.serve --backend torch --device cuda --preset sudoku_extreme   # on a GPU machine
    python -m benchmarks.serve --backend torch --device cuda --preset pretrained       # the shipped model

The model is the preset (float32 on CPU) with random weights; random inputs halt after 1 to
halt_max_steps segments (the mean is reported). `--preset pretrained` serves the shipped Sudoku model
instead, on the held-out puzzles shipped beside it (every band), so halting is the trained Q head's. The
server runs as a child process (`python -m sage serve`, max batch --max-batch, max wait --max-wait-ms);
N closed-loop clients are threads of this process, each with its own `sage.client.Client` (submit, wait,
repeat) for --seconds. Latency is the client's submit-to-answer time. "direct" is the same segment
backend driven by a plain in-process ACT loop with the same early-halting rule, no mailbox, protocol,
queue or journal: at batch 1 (the floor of one client's latency) and at batch --max-batch (the floor of
throughput). The runtime's overhead is the served p50 at one client minus the direct p50 at batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_model(preset: str, backend: str, workdir: Path) -> Path:
    """Random-weight model files for the preset: a safetensors state dict + its config JSON, and for
    onnx/tensorrt the exported segment graph in float32 (cached in workdir)."""
    import torch
    from safetensors.torch import save_file

    from export.onnx import export_onnx
    from export.torch_model import HRMTorch
    from hrm_jax.presets import MODEL_PRESETS, tiny

    if preset == "pretrained":
        return Path("pretrained")  # sage.backends resolves the shipped folder; nothing to build
    config = tiny() if preset == "tiny" else MODEL_PRESETS[preset]()  # torch on CUDA runs its forward dtype
    weights, segment = workdir / f"{preset}.safetensors", workdir / f"{preset}.segment.onnx"
    if not weights.exists() or (backend in ("onnx", "tensorrt") and not segment.exists()):
        model = HRMTorch(config, "float32")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.dtype.is_floating_point:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) / max(1, tensor.shape[-1]) ** 0.5)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        (workdir / f"{preset}.json").write_text(json.dumps(config.to_dict()))
        if backend in ("onnx", "tensorrt"):
            print(f"exporting the segment graph of {preset} to {segment} ...", flush=True)
            export_onnx(model, segment, "segment")
    return segment if backend in ("onnx", "tensorrt") else weights


def direct(backend, inputs: np.ndarray, batch: int, seconds: float) -> dict:
    """The segment backend in a bare ACT loop: fresh rows, step until every row's Q head halts."""
    from sage.backends import carry_shape

    cfg = backend.config
    zeros = np.zeros((batch, *carry_shape(cfg)), backend.carry_dtype)
    ids = np.zeros(batch, np.int32)
    times, steps = [], []
    rng = np.random.default_rng(batch)  # rows drawn like the clients draw theirs: the same mix of difficulties
    give_up = time.perf_counter() + seconds
    while time.perf_counter() < give_up or len(times) < 4:
        rows = inputs[rng.integers(len(inputs), size=batch)]
        start = time.perf_counter()
        z_H, z_L, fresh = zeros, zeros, np.ones(batch, bool)
        done, used = np.zeros(batch, bool), np.zeros(batch, int)
        for _ in range(cfg.halt_max_steps):
            out = backend.step(z_H, z_L, fresh, rows, ids)
            z_H, z_L, fresh = out.z_H, out.z_L, np.zeros(batch, bool)
            used += ~done
            done |= out.q_halt > out.q_continue
            if done.all():
                break
        times.append(time.perf_counter() - start)
        steps.extend(used.tolist())
    times, steps = np.asarray(times[1:]), steps[batch:]  # the first solve warms the backend up: not counted
    return {"mode": f"direct batch {batch}", "requests": int(len(times) * batch),
            "requests_per_s": float(len(times) * batch / times.sum()), **_quantiles_ms(times),
            "mean_batch": float(batch), "mean_steps": float(np.mean(steps))}


def request_inputs(preset: str, config) -> np.ndarray:
    """The token rows the clients send: the shipped held-out puzzles for the shipped model, else random tokens."""
    if preset == "pretrained":
        from hrm_jax.pretrained import heldout_sample

        puzzles = [puzzle for band in heldout_sample().values() for puzzle, _ in band]
        return (np.stack(puzzles).astype(np.int32) + 1)  # blank 1, digit d -> d + 1 (the training encoding)
    return np.random.default_rng(0).integers(1, config.vocab_size, (256, config.seq_len)).astype(np.int32)


def _quantiles_ms(seconds) -> dict:
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def served(inbox: str, inputs: np.ndarray, clients: int, seconds: float) -> dict:
    from sage.client import Client

    latencies: list[list[float]] = [[] for _ in range(clients)]
    steps: list[list[int]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_gate = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client_loop(k: int) -> None:
        with Client(inbox) as client:
            rng = np.random.default_rng(k)
            start_gate.wait()
            while time.perf_counter() < stop_at[0]:
                row = inputs[rng.integers(len(inputs))]
                t0 = time.perf_counter()
                try:
                    answer = client.solve(row, wait=60)
                except ValueError as err:  # a ClientError (timeout, full inbox): reported, the others go on
                    errors.append(f"{type(err).__name__}: {err}")
                    return
                latencies[k].append(time.perf_counter() - t0)
                steps[k].append(answer.steps)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds  # before the gate opens: the clients read it at once
    start_gate.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    flat = [x for per in latencies for x in per]
    if not flat:
        raise SystemExit(f"no request was answered with {clients} clients: {errors[:1]}")
    return {"mode": f"served, {clients} clients", "clients": clients, "requests": len(flat),
            "requests_per_s": len(flat) / elapsed, **_quantiles_ms(flat),
            "mean_steps": float(np.mean([s for per in steps for s in per])), "errors": errors[:3]}


def server_stats(state_dir: Path) -> dict:
    return json.loads((state_dir / "stats.json").read_text())


def start_server(args, model: Path, inbox: str, state_dir: Path) -> subprocess.Popen:
    from sage.mailbox import Mailbox, MailboxNotFoundError

    cmd = [sys.executable, "-m", "sage", "serve", "--model", str(model), "--backend", args.backend, "--device",
           args.device, "--inbox", inbox, "--outbox", inbox + "-out", "--state-dir", str(state_dir),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--capacity", "4096"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    give_up = time.monotonic() + 600
    while time.monotonic() < give_up and proc.poll() is None:
        try:
            box = Mailbox.attach(inbox)
        except MailboxNotFoundError:
            time.sleep(0.2)
            continue
        ready = box.creator.pid == proc.pid
        box.close()
        if ready:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':<22} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'steps':>6}")
    for r in rows:
        print(f"{r['mode']:<22} {r['requests']:>8d} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.2f} "
              f"{r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f} {r.get('mean_batch', float('nan')):>6.1f} "
              f"{r['mean_steps']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny",
                        help="tiny (hidden 64), a preset of hrm_jax.config, or pretrained (the shipped model)")
    parser.add_argument("--backend", choices=("onnx", "torch", "tensorrt"), default="onnx")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="per client count")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads of the server")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sage-bench")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/serve-...)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()  # the machine may be shared: the load says how much

    from sage.backends import load_backend

    model = build_model(args.preset, args.backend, args.workdir)
    backend = load_backend(model, args.backend, device=args.device, threads=args.threads)
    inputs = request_inputs(args.preset, backend.config)
    rows = [direct(backend, inputs, 1, args.seconds / 2), direct(backend, inputs, args.max_batch, args.seconds / 2)]
    del backend

    inbox = f"bench-{os.getpid()}"
    state_dir = Path(tempfile.mkdtemp(prefix="sage-bench-state-"))
    proc = start_server(args, model, inbox, state_dir)
    try:
        for clients in args.clients:
            before = server_stats(state_dir)["counts"] if (state_dir / "stats.json").exists() else {}
            row = served(inbox, inputs, clients, args.seconds)
            time.sleep(0.6)  # one stats period, so the server's counters include this run
            after = server_stats(state_dir)["counts"]
            batches = after.get("batches", 0) - before.get("batches", 0)
            row["mean_batch"] = (after.get("row_segments", 0) - before.get("row_segments", 0)) / max(1, batches)
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(60)
        from sage.mailbox import Mailbox

        logging.getLogger("sage.mailbox").setLevel(logging.ERROR)  # "its creator is gone": we stopped it
        for name in (inbox, inbox + "-out"):
            Mailbox.attach(name).unlink()
    overhead = rows[2]["p50_ms"] - rows[0]["p50_ms"] if len(rows) > 2 and rows[2]["clients"] == 1 else None
    print_table(rows)
    if overhead is not None:
        print(f"runtime overhead at 1 client (served p50 - direct batch-1 p50): {overhead:.2f} ms")
    result = {"preset": args.preset, "backend": args.backend, "device": args.device, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "seconds": args.seconds, "threads": args.threads,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": _cpu_model(),
                          "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "rows": rows, "overhead_p50_ms": overhead,
              "command": "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{args.preset}-{args.backend}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
