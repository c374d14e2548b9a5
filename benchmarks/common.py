"""Shared pieces of the benchmark scripts: timing, the analytic FLOP count, device facts, results.

Timing: warm-up (compilation) excluded, every timed call
synchronised (`block_until_ready` / `torch.cuda.synchronize`), medians reported, inputs rotated.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from hrm_jax.config import HRMConfig

# Dense bf16 tensor-core peaks (datasheet, SXM parts, no sparsity) used for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def layer_flops_per_token(config: HRMConfig) -> float:
    """Forward FLOPs of one transformer block per token (multiply-add = 2 FLOPs).

    qkv (h x 3h) + o (h x h) + gate_up (h x 2i) + down (i x h) matmuls: 2 (4h^2 + 3hi);
    attention scores and weighted sum over T = total_seq_len keys: 2 * 2 T h.
    """
    h, i, t = config.hidden_size, config.intermediate_size, config.total_seq_len
    return 2 * (4 * h * h + 3 * h * i) + 4 * t * h


def forward_block_applications(config: HRMConfig) -> int:
    """Blocks run by one inner forward: H*L L-updates of L_layers and H H-updates of H_layers."""
    return config.H_cycles * (config.L_cycles * config.L_layers + config.H_layers)


def train_flops_per_example(config: HRMConfig) -> float:
    """One training step per example: the segment's forward, the target-Q forward (a second full
    inner forward), and the backward of the 1-step-gradient part (one L and one H update, at 2x its
    forward). Heads and embeddings are < 0.1% and left out. Sudoku-Extreme: 36.65 GFLOP."""
    per_block = layer_flops_per_token(config) * config.total_seq_len
    forward = forward_block_applications(config)
    backward = 2 * (config.L_layers + config.H_layers)
    return per_block * (2 * forward + backward)


def rollout_flops_per_example(config: HRMConfig) -> float:
    """halt_max_steps inner forwards (evaluation runs every segment)."""
    return (layer_flops_per_token(config) * config.total_seq_len * forward_block_applications(config)
            * config.halt_max_steps)


def share_gpu_with_torch() -> None:
    """JAX would grab 75% of GPU memory when its backend starts; the harness also runs torch in the
    same process, so JAX allocates on demand instead. Call before the first JAX computation."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    return {"platform": device.platform, "device_kind": kind, "peak_bf16_tflops": peak,
            "jax": jax.__version__, "python": platform.python_version()}


def gpu_name(info: dict[str, Any]) -> str:
    kind = info["device_kind"]
    for name in PEAK_BF16_TFLOPS:
        if name in kind:
            return name.lower()
    return info["platform"]


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def time_calls(call: Callable[[int], Any], sync: Callable[[Any], Any], *, warmup: int, iters: int) -> dict[str, float]:
    """Times `call(i)` one call at a time (synchronised) and as a back-to-back window.

    Returns median/min seconds per call and the window's mean seconds per call (dispatch
    overlapped with device work, as in a training loop).
    """
    for i in range(warmup):
        sync(call(i))
    times = []
    for i in range(iters):
        start = time.perf_counter()
        sync(call(i))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = None
    for i in range(iters):
        out = call(i)
    sync(out)
    window = (time.perf_counter() - start) / iters
    return {"median_s": statistics.median(times), "min_s": min(times), "window_s": window, "iters": iters}


def save_results(name: str, results: dict[str, Any], out_dir: str | None = None) -> str:
    """Merges `results` under key `name` into results/<gpu>-<date>.json (and $OUT if set)."""
    info = device_info()
    folder = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{gpu_name(info)}-{datetime.date.today().isoformat()}.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data["device"] = info
    data[name] = results
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path
