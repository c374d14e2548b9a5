"""What a run folder already holds, and moving an old run aside: nothing a run wrote is deleted
or overwritten unless the user asks for it (`restart`)."""

from __future__ import annotations

import datetime
import logging
import os

from hrm_jax import checkpoint as ckpt
from hrm_jax.logging_utils import METRICS_FILE, PLOT_FILE, read_metrics

logger = logging.getLogger(__name__)


def describe(out_dir: str) -> list[str]:
    """Phrases naming what a previous run left in out_dir (empty for a missing or empty folder)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    metrics = os.path.join(out_dir, METRICS_FILE)
    if os.path.exists(metrics):
        try:
            found.append(f"{METRICS_FILE} ({len(read_metrics(metrics))} records)")
        except ValueError:
            found.append(f"{METRICS_FILE} (unreadable)")
    for name in (ckpt.PERIODIC_DIR, ckpt.BEST_DIR):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and os.listdir(path):
            found.append(f"{name}/ ({', '.join(sorted(os.listdir(path)))})")
    if os.path.exists(os.path.join(out_dir, PLOT_FILE)):
        found.append(PLOT_FILE)
    known = {METRICS_FILE, PLOT_FILE, ckpt.PERIODIC_DIR, ckpt.BEST_DIR}
    others = sorted(set(os.listdir(out_dir)) - known)
    if others:
        found.append(f"{len(others)} other entries ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    return found


def move_aside(out_dir: str) -> str:
    """Renames out_dir to `<out_dir>.old-<time>` and returns the new name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{out_dir.rstrip(os.sep)}.old-{stamp}"
    suffix = 1
    while os.path.exists(target):
        target, suffix = f"{out_dir.rstrip(os.sep)}.old-{stamp}-{suffix}", suffix + 1
    os.rename(out_dir, target)
    logger.warning("moved the previous run %s aside to %s", out_dir, target)
    return target
