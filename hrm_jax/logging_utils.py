"""Run logs people can open: metrics.jsonl (one JSON object per record), a PNG of the curves, and
optionally TensorBoard scalars.

A record is `{"step": int, "split": str, "metrics": {name: float}}`; `split` is "train" for
training logs and e.g. "eval" or "eval/<set>" for evaluations. The plot is drawn with
matplotlib's Agg canvas directly (no global backend switch, so importing this module never changes
the backend of a notebook that uses it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"

# Panels of the plot: (title, metric names drawn in it, y-axis scale).
_PANELS = (
    ("loss", ("lm_loss", "q_halt_loss", "q_continue_loss"), "log"),
    ("token accuracy", ("accuracy", "copy_accuracy"), "linear"),
    ("exact accuracy", ("exact_accuracy", "early_exact_accuracy", "copy_exact_accuracy"), "linear"),
    ("ACT steps", ("steps", "early_steps"), "linear"),
)


def _to_float(value: Any) -> float:
    return float(value)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in file order ([] if it does not exist)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err}); delete or fix the line") from None
    return records


def truncate_metrics(path: str | os.PathLike, after_step: int) -> int:
    """Drops records with step > after_step (a resumed run rewrites what the crashed run logged past
    its last checkpoint) and a last line cut short by a kill mid-write. The file is replaced
    atomically. Returns the number of records dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    torn = 0
    if lines and not lines[-1].endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            logger.warning("%s: dropping a last line cut short (the process was killed while writing it)", path)
            lines, torn = lines[:-1], 1
    records = [json.loads(line) for line in lines if line.strip()]
    kept = [r for r in records if int(r["step"]) <= after_step]
    if len(kept) != len(records) or torn:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(tmp, path)
    return len(records) - len(kept) + torn


class MetricsLogger:
    """Appends records to `<out_dir>/metrics.jsonl` (flushed per record) and mirrors them to
    TensorBoard when asked. `plot()` redraws `<out_dir>/curves.png` from the whole file.

    active=False: writes nothing (the processes other than process 0 of a multi-process run, which
    compute the same records)."""

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = False, active: bool = True) -> None:
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(self.out_dir, METRICS_FILE)
        self.plot_path = os.path.join(self.out_dir, PLOT_FILE)
        self.active = active
        self._file, self._writer = None, None
        if active:
            os.makedirs(self.out_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            self._writer = _tensorboard_writer(os.path.join(self.out_dir, "tensorboard")) if tensorboard else None

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one record; metric values are converted to Python floats. Returns the record."""
        record = {"step": int(step), "split": split, "metrics": {k: _to_float(v) for k, v in metrics.items()}}
        if not self.active:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record["metrics"].items():
                self._writer.add_scalar(f"{split}/{name}", value, record["step"])
            self._writer.flush()
        return record

    def plot(self) -> str:
        """Redraws the PNG from metrics.jsonl; returns its path."""
        if self.active:
            plot_curves(read_metrics(self.path), self.plot_path)
        return self.plot_path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tensorboard_writer(log_dir: str):
    """A SummaryWriter from torch or tensorboardX, whichever is installed (both need `tensorboard`
    or `tensorboardX`, an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError:
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
        except ImportError:
            raise ImportError("tensorboard=True needs the `tensorboard` (with torch) or `tensorboardX` package; "
                              "install one (`pip install tensorboard`) or pass tensorboard=False") from None
    return SummaryWriter(log_dir=log_dir)


def _series(records: Iterable[Mapping[str, Any]], split: str, name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record["metrics"].get(name)
        if record["split"] == split and value is not None and math.isfinite(value):
            steps.append(record["step"])
            values.append(value)
    return steps, values


def plot_curves(records: list[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Draws one panel per metric family, one line per (split, metric) that has data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    # Per-set and per-difficulty-band records (eval/set/..., eval/group/...) stay in metrics.jsonl;
    # drawn too they bury the two curves people look for.
    splits = sorted({r["split"] for r in records if r["split"].count("/") == 0},
                    key=lambda s: (s != "train", s))
    fig = Figure(figsize=(6 * len(_PANELS) / 2, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(_PANELS) // 2).ravel()
    for ax, (title, names, scale) in zip(axes, _PANELS):
        drawn = False
        for split in splits:
            for name in names:
                steps, values = _series(records, split, name)
                if not steps:
                    continue
                style = "-" if split == "train" else "o-"
                alpha = 0.6 if split == "train" else 1.0
                ax.plot(steps, values, style, label=f"{split}/{name}", alpha=alpha, markersize=3)
                drawn = True
        if drawn:
            if scale == "log" and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    # Drawn to a temporary name and renamed: a kill mid-draw never leaves a half-written PNG.
    tmp = f"{os.fspath(path)}.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    logger.debug("wrote %s", path)
