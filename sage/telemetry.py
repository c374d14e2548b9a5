"""Counters, histograms and gauges of a serving process, as Prometheus metrics and a JSON snapshot.

The server rewrites two files in its state directory (atomically: temporary file + rename), which
`python -m sage stats` reads without talking to the server:

* `stats.json`: counters, gauges, latency / queue-wait / batch-size / steps quantiles over the last
  `window` answers, the server's pid and a heartbeat time;
* `metrics.prom`: the Prometheus text exposition format (prometheus-client's `generate_latest`),
  for node_exporter's textfile collector or `--metrics-port` (an HTTP endpoint to scrape).
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
QUANTILES = (50, 95, 99)
GAUGES = ("queue_depth", "active_rows", "live_streams", "inbox_depth", "journal_pending")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def quantiles(values) -> dict[str, float]:
    if not len(values):
        return {f"p{q}": float("nan") for q in QUANTILES}
    got = np.percentile(np.asarray(values, np.float64), QUANTILES)
    return {f"p{q}": float(v) for q, v in zip(QUANTILES, got)}


class Telemetry:
    def __init__(self, window: int = 10000) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.answered = Counter("sage_answers", "Answers sent, by status", ["status"], registry=r)
        self.received = Counter("sage_requests_received", "Requests taken from the inbox", registry=r)
        self.segments = Counter("sage_row_segments", "ACT segments run, summed over rows", registry=r)
        self.batches = Counter("sage_batches", "Backend calls (one segment on a batch)", registry=r)
        self.drops = Counter("sage_answers_undelivered", "Answers that could not be delivered, by reason",
                             ["reason"], registry=r)
        self.latency = Histogram("sage_latency_seconds", "Pop-to-answer time", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("sage_queue_wait_seconds", "Pop-to-first-segment time",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sage_batch_size", "Rows per backend call", buckets=BATCH_BUCKETS, registry=r)
        self.steps = Histogram("sage_act_steps", "ACT segments per answered request", buckets=STEP_BUCKETS,
                               registry=r)
        self.swaps = Counter("sage_weight_swaps", "Published weight versions swapped in", registry=r)
        self.weights_version = Gauge("sage_weights_version", "Published weights version served", registry=r)
        self.sleep_cycles = Counter("sage_sleep_cycles", "Idle-triggered sleep cycles, by event", ["event"],
                                    registry=r)
        self.gauges = {name: Gauge(f"sage_{name}", name.replace("_", " "), registry=r) for name in GAUGES}
        # Plain copies for stats.json (prometheus-client exposes no public getter for a value).
        self.counts: collections.Counter[str] = collections.Counter()
        self.windows = {name: collections.deque(maxlen=window) for name in ("latency", "queue_wait", "batch", "steps")}
        self.started = time.time()

    def count(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount

    def on_answer(self, status: str, latency: float, queue_wait: float, steps: int) -> None:
        self.answered.labels(status).inc()
        self.count(f"answers_{status}")
        self.latency.observe(latency)
        self.windows["latency"].append(latency)
        if steps:
            self.steps.observe(steps)
            self.windows["steps"].append(steps)
            self.queue_wait.observe(queue_wait)
            self.windows["queue_wait"].append(queue_wait)

    def on_batch(self, rows: int) -> None:
        self.batches.inc()
        self.segments.inc(rows)
        self.batch_size.observe(rows)
        self.windows["batch"].append(rows)
        self.count("batches")
        self.count("row_segments", rows)

    def on_received(self) -> None:
        self.received.inc()
        self.count("received")

    def on_drop(self, reason: str) -> None:
        self.drops.labels(reason).inc()
        self.count(f"undelivered_{reason}")

    def on_weight_swap(self, version: int) -> None:
        self.swaps.inc()
        self.weights_version.set(version)
        self.count("weight_swaps")

    def on_sleep_cycle(self, event: str) -> None:
        self.sleep_cycles.labels(event).inc()
        self.count(f"sleep_cycles_{event}")

    def set_gauges(self, **values: float) -> None:
        for name, value in values.items():
            self.gauges[name].set(value)
            self.counts[name] = value

    def snapshot(self, **extra) -> dict:
        now = time.time()
        return {"time": now, "uptime_s": now - self.started, "pid": os.getpid(), **extra,
                "counts": dict(self.counts),
                "latency_s": quantiles(self.windows["latency"]), "queue_wait_s": quantiles(self.windows["queue_wait"]),
                "batch_size": {**quantiles(self.windows["batch"]),
                               "mean": float(np.mean(self.windows["batch"])) if self.windows["batch"] else 0.0},
                "act_steps": {**quantiles(self.windows["steps"]),
                              "mean": float(np.mean(self.windows["steps"])) if self.windows["steps"] else 0.0}}

    def write(self, directory: Path, **extra) -> None:
        atomic_write(directory / "stats.json", json.dumps(self.snapshot(**extra), indent=1).encode())
        atomic_write(directory / "metrics.prom", generate_latest(self.registry))
