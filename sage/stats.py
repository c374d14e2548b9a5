"""`python -m sage stats`: what a server reports about itself (its stats.json and metrics.prom).

    python -m sage stats --inbox hrm               # a table
    python -m sage stats --inbox hrm --json        # the raw snapshot
    python -m sage stats --inbox hrm --prometheus  # the Prometheus text format
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sage.serve import default_state_dir


class StatsError(ValueError):
    """No readable stats where the command looked."""


def read_stats(state_dir: Path) -> dict:
    path = state_dir / "stats.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StatsError(f"no {path}: no server has run with state dir {state_dir} (pass --state-dir or the "
                         "server's --inbox)") from None
    except ValueError as err:
        raise StatsError(f"{path}: not readable JSON ({err})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_stats(stats: dict) -> str:
    counts = stats["counts"]
    state = "stopped" if stats.get("stopped") else "running" if _alive(stats["pid"]) else "dead (no clean stop)"
    answers = {k.removeprefix("answers_"): int(v) for k, v in counts.items() if k.startswith("answers_")}
    undelivered = {k.removeprefix("undelivered_"): int(v) for k, v in counts.items() if k.startswith("undelivered_")}
    lat, wait, batch, steps = stats["latency_s"], stats["queue_wait_s"], stats["batch_size"], stats["act_steps"]

    def ms(q: dict) -> str:
        return " / ".join(f"{1e3 * q[k]:.2f}" for k in ("p50", "p95", "p99")) + " ms"

    lines = [
        (f"server pid {stats['pid']} ({state}), backend {stats.get('backend')}, inbox {stats.get('inbox')!r}, "
        f"up {stats['uptime_s']:.0f} s"),
        f"requests received {int(counts.get('received', 0))}; answers " + (", ".join(
            f"{k} {v}" for k, v in sorted(answers.items())) or "none"),
        "undelivered answers: " + (", ".join(f"{k} {v}" for k, v in sorted(undelivered.items())) or "none"),
        f"latency p50/p95/p99 {ms(lat)}; queue wait {ms(wait)}",
        (f"batches {int(counts.get('batches', 0))}, rows per batch mean {batch['mean']:.1f} (p50 {batch['p50']:.0f}, "
        f"p99 {batch['p99']:.0f}); ACT steps per answer mean {steps['mean']:.2f}"),
        (f"queue {int(counts.get('queue_depth', 0))}, in flight {int(counts.get('active_rows', 0))}, inbox depth "
        f"{int(counts.get('inbox_depth', 0))} (full {stats.get('inbox_full', 0)}, "
        f"expired {stats.get('inbox_expired', 0)}), "
        f"journal pending {int(counts.get('journal_pending', 0))}"),
        (f"streams live {int(counts.get('live_streams', 0))}, on disk {stats.get('carries_on_disk', 0)}, "
        f"evicted {stats.get('carry_evictions', 0)}"),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--inbox", help="the server's inbox (its state dir is found as the server finds it)")
    where.add_argument("--state-dir", type=Path, help="the server's --state-dir")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the raw stats.json")
    form.add_argument("--prometheus", action="store_true", help="print the Prometheus text format")


def main(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir(args.inbox)
    stats = read_stats(state_dir)
    if args.prometheus:
        print((state_dir / "metrics.prom").read_text(), end="")
    elif args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(format_stats(stats))
    return 0
