"""Sleep: turn salient experiences into new served weights, or keep the old ones.

One cycle (`sleep_cycle`):
1. Snapshot. The weights being served are the published version in the weights directory
   (sage.weights); `import_weights` publishes an existing checkpoint as version 0 first, so the
   weights a cycle started from always stay on disk.
2. Draw. `experiences` rows from the store, P proportional to decayed salience^alpha
   (sage.experience), labelled by sage.replay (verified answer, else the exact solver); the
   provenance is written back to each stored row.
3. Dream. Each labelled experience plus `augmentations` random symmetric variants of it (Sudoku's
   symmetry group, dihedral maps for mazes and ARC), optionally mixed with a `rehearsal_fraction`
   of rows from the original training split.
   Every row trains with puzzle identifier 0, so only one-identifier tasks (Sudoku, mazes) can sleep;
   a model with per-task embeddings (ARC) is refused.
4. Fine-tune, `steps` steps at a constant learning rate, with one of two trainers (`--trainer`):
   jax   the library's own step (sage/sleep_jax.py: hrm_jax.train.train_step, AdamATan2, the ACT
         carry across batches, the reference's loss);
   torch the same step transcribed to torch on export/torch_model.py (sage/sleep_torch.py,
         export/torch_train.py), for a device without JAX;
   auto  jax when it imports, else torch (BUILD_NOTES.md "Memory and sleep" has the measurement).
   Both draw the same batches from the same generator (`batches`).
5. Validate on a held-out split (full halt_max_steps rollouts; hrm_jax.evaluate, or its torch twin)
   before and after, and reject the new weights when `metric` fell by more than `tolerance`
   (absolute; default 0.01, one point of exact accuracy) or is not finite.
6. Publish. Accepted weights become version N+1: the weights first (the jax trainer writes an
   hrm_jax checkpoint, the torch trainer a model folder, model.safetensors + config.json, that
   needs no JAX to read), then the atomic pointer a server polls (sage.weights); the trained-on
   experiences move to the store's consolidated tier.

This module imports neither JAX nor torch; the chosen trainer imports its framework, and a missing one
is reported in one line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from hrm_jax.config import ConfigError, HRMConfig, TrainConfig
from hrm_jax.data.format import DatasetFormatError, PuzzleSplit, load_split
from hrm_jax.data.sampler import IGNORE_LABEL_ID
from hrm_jax.pretrained import PretrainedError, save_pretrained
from sage import replay, weights
from sage.experience import ExperienceStore, ExperienceStoreError

logger = logging.getLogger(__name__)

Params = dict[str, Any]


class SleepError(ValueError):
    """A sleep that cannot run: nothing published, no labelled experience, bad settings."""


TRAINERS = ("auto", "jax", "torch")


@dataclasses.dataclass(frozen=True)
class SleepConfig:
    """Settings of one cycle (see the module docstring for each step)."""

    task: str = "sudoku"
    experiences: int = 256
    alpha: float = 1.0
    augmentations: int = 8
    rehearsal_fraction: float = 0.0
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.1
    metric: str = "exact_accuracy"
    tolerance: float = 0.01
    eval_batch_size: int = 64
    max_eval_batches: int | None = None
    keep_versions: int = 3
    seed: int = 0
    trainer: str = "auto"

    def __post_init__(self) -> None:
        if self.task not in replay.TASKS:
            raise SleepError(f"task must be one of {replay.TASKS}, got {self.task!r}")
        if self.trainer not in TRAINERS:
            raise SleepError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        for name in ("experiences", "steps", "batch_size", "eval_batch_size", "keep_versions"):
            if getattr(self, name) < 1:
                raise SleepError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.augmentations < 0 or self.alpha < 0 or self.lr < 0 or self.weight_decay < 0 or self.tolerance < 0:
            raise SleepError("augmentations, alpha, lr, weight_decay and tolerance must be >= 0")
        if not 0 <= self.rehearsal_fraction < 1:
            raise SleepError(f"rehearsal_fraction must be in [0, 1), got {self.rehearsal_fraction}")

    def train_config(self) -> TrainConfig:
        """The fine-tune's TrainConfig: constant lr (no warm-up, no decay), one optimizer for both parts."""
        return TrainConfig(global_batch_size=self.batch_size, epochs=1, eval_interval=None, lr=self.lr,
                           lr_min_ratio=1.0, lr_warmup_steps=0, weight_decay=self.weight_decay, puzzle_emb_lr=self.lr,
                           puzzle_emb_weight_decay=self.weight_decay, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class SleepReport:
    """What one cycle did. before/after: held-out metrics; replay_before/after: the same metrics on the
    drawn experiences themselves (un-augmented)."""

    accepted: bool
    reason: str
    serving_version: int
    published_version: int | None
    experiences: int
    provenance: dict[str, int]
    train_examples: int
    steps: int
    train_loss: tuple[float, float]  # lm_loss of the first and last step
    before: dict[str, float]
    after: dict[str, float]
    replay_before: dict[str, float]
    replay_after: dict[str, float]
    seconds: float
    trainer: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Batch = dict[str, np.ndarray]


class Trainer(Protocol):
    """What a cycle needs from a framework. Params are hrm_jax's params tree (JAX or NumPy arrays) on
    both sides, so versions move between trainers; `weights_format` is how `publish` writes them."""

    name: str
    weights_format: str  # one of FORMATS

    def load(self, path: str) -> tuple[Params, HRMConfig]: ...

    def fine_tune(self, params: Params, model_config: HRMConfig, batches: Iterator[Batch], train_config: TrainConfig,
                  steps: int) -> tuple[Params, list[float]]: ...

    def validate(self, params: Params, model_config: HRMConfig, split: PuzzleSplit, batch_size: int,
                 max_batches: int | None = None) -> dict[str, float]: ...


def select_trainer(name: str) -> Trainer:
    """The trainer called `name`; "auto": jax when it imports, else torch. A framework that does not import
    is one SleepError line."""
    if name not in TRAINERS:
        raise SleepError(f"trainer must be one of {TRAINERS}, got {name!r}")
    if name == "auto":
        try:
            return select_trainer("jax")
        except SleepError:
            return select_trainer("torch")
    try:
        return importlib.import_module(f"sage.sleep_{name}").TRAINER
    except ImportError as err:
        needs, other = ("JAX and hrm_jax", "torch") if name == "jax" else ("torch", "jax")
        raise SleepError(f"the {name} trainer needs {needs}, which do not import here ({err}); install it or "
                         f"pass --trainer {other}") from None


# -- the steps of a cycle ------------------------------------------------------------------------
FORMATS = ("checkpoint", "folder")


def import_weights(weights_dir: str, checkpoint: str, trainer: Trainer | None = None) -> int:
    """Publishes a model (an hrm_jax checkpoint, a model folder, "pretrained") as version 0, in the format
    of `trainer` (default: auto)."""
    if weights.read_current(weights_dir) is not None:
        raise SleepError(f"{weights_dir} already publishes weights; import only into an empty weights directory")
    trainer = trainer or select_trainer("auto")
    params, config = trainer.load(checkpoint)
    return publish(weights_dir, params, config, {"source": str(checkpoint)}, version=0, fmt=trainer.weights_format)


def publish(weights_dir: str, params: Params, model_config: HRMConfig, info: dict[str, Any],
            version: int | None = None, *, fmt: str = "checkpoint") -> int:
    """Writes params as the next version (or `version`) and then points CURRENT.json at it.

    fmt "checkpoint": a params-only hrm_jax checkpoint (orbax; needs JAX); "folder": model.safetensors
    (float32) + config.json, each file flushed to disk (readable without JAX: export/params_folder.py)."""
    if fmt not in FORMATS:
        raise SleepError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    os.makedirs(weights_dir, exist_ok=True)
    current = weights.read_current(weights_dir)
    version = (0 if current is None else current["version"] + 1) if version is None else version
    path = weights.version_dir(weights_dir, version)
    if fmt == "checkpoint":
        from hrm_jax import checkpoint as ckpt  # noqa: PLC0415  (orbax and JAX: only the jax trainer writes these)

        ckpt.save_params(path, params, model_config, step=version, **info)
    else:
        _write_folder(path, params, model_config)
    weights.write_current(weights_dir, {"version": version, "path": path, "created": time.time(),
                                        "model_config": model_config.to_dict(), **info})
    return version


def _write_folder(path: str, params: Params, model_config: HRMConfig) -> None:
    folder = save_pretrained(path, params, model_config, dtype="float32")
    for name in ("model.safetensors", "config.json", ""):  # the files, then their directory entries
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def draw(store: ExperienceStore, config: SleepConfig, rng: np.random.Generator
         ) -> tuple[list[int], np.ndarray, np.ndarray, dict[str, int]]:
    """(ids, input tokens [n, S], label tokens [n, S], provenance counts) of the drawn, labelled experiences."""
    ids, inputs, labels = [], [], []
    provenance: collections.Counter = collections.Counter()
    for experience in store.sample(config.experiences, rng, alpha=config.alpha):
        pair = replay.training_pair(config.task, experience)
        if pair is None:
            provenance["unlabelled"] += 1
            if experience.provenance != "unlabelled":
                store.relabel(experience.id, "unlabelled")
            continue
        x, y, source = pair
        provenance[source] += 1
        if config.task == "sudoku" and (experience.provenance != source or "label" not in experience.payload):
            store.relabel(experience.id, source, label=(y - 1).astype(np.int8))
        ids.append(experience.id)
        inputs.append(x)
        labels.append(y)
    if not ids:
        return [], np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32), dict(provenance)
    return ids, np.stack(inputs).astype(np.int32), np.stack(labels).astype(np.int32), dict(provenance)


def _split_rows(split: PuzzleSplit) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a split as int32 (inputs, labels with the ignore id mapped to -100)."""
    inputs = np.concatenate([np.asarray(s.inputs) for s in split.sets.values()]).astype(np.int32)
    labels = np.concatenate([np.asarray(s.labels) for s in split.sets.values()]).astype(np.int32)
    if split.metadata.ignore_label_id is not None:
        labels[labels == split.metadata.ignore_label_id] = IGNORE_LABEL_ID
    return inputs, labels


def batches(inputs: np.ndarray, labels: np.ndarray, config: SleepConfig, rng: np.random.Generator,
            rehearsal: PuzzleSplit | None = None) -> Iterator[Batch]:
    """`config.steps` batches of rows drawn uniformly from (inputs, labels) (label tokens; puzzle
    identifier 0), a rehearsal_fraction of each from `rehearsal`'s examples."""
    n_rehearse = round(config.batch_size * config.rehearsal_fraction) if rehearsal is not None else 0
    old_inputs, old_labels = _split_rows(rehearsal) if n_rehearse else (None, None)
    for _ in range(config.steps):
        rows = rng.integers(0, len(inputs), config.batch_size - n_rehearse)
        batch_inputs, batch_labels = inputs[rows], labels[rows]
        if n_rehearse:
            old = rng.integers(0, len(old_inputs), n_rehearse)
            batch_inputs = np.concatenate([batch_inputs, old_inputs[old]])
            batch_labels = np.concatenate([batch_labels, old_labels[old]])
        yield {"inputs": batch_inputs, "labels": batch_labels, "puzzle_identifiers": np.zeros(config.batch_size,
                                                                                              np.int32)}


def fine_tune(params: Params, model_config: HRMConfig, inputs: np.ndarray, labels: np.ndarray, config: SleepConfig,
              rng: np.random.Generator, rehearsal: PuzzleSplit | None = None, *,
              trainer: Trainer | None = None) -> tuple[Params, list[float]]:
    """`config.steps` train steps from `params` on `batches(...)` with `trainer` (default config.trainer).
    Returns the new params (the given ones stay valid) and the lm_loss of every step."""
    trainer = trainer or select_trainer(config.trainer)
    return trainer.fine_tune(params, model_config, batches(inputs, labels, config, rng, rehearsal),
                             config.train_config(), config.steps)


def validate(trainer: Trainer, params: Params, model_config: HRMConfig, split: PuzzleSplit | None,
             config: SleepConfig) -> dict[str, float]:
    """The trainer's whole-split metrics ({} without a split)."""
    if split is None:
        return {}
    return trainer.validate(params, model_config, split, config.eval_batch_size, config.max_eval_batches)


def gate(before: dict[str, float], after: dict[str, float], metric: str, tolerance: float) -> tuple[bool, str]:
    """Accept unless `metric` dropped by more than `tolerance` or is not finite; returns (accept, reason)."""
    if metric not in after:
        raise SleepError(f"metric {metric!r} is not an evaluation metric; choose one of {sorted(after)}")
    old, new = before[metric], after[metric]
    if not math.isfinite(new):
        return False, f"held-out {metric} is {new}"
    if new < old - tolerance:
        return False, f"held-out {metric} fell from {old:.4f} to {new:.4f} (tolerance {tolerance})"
    return True, f"held-out {metric} {old:.4f} -> {new:.4f} (tolerance {tolerance})"


def _replay_split(inputs: np.ndarray, labels: np.ndarray) -> PuzzleSplit:
    return replay.sudoku_split(inputs - 1, labels - 1, path="<replayed experiences>")


# -- the cycle -----------------------------------------------------------------------------------
def sleep_cycle(weights_dir: str, store: ExperienceStore, heldout: PuzzleSplit, config: SleepConfig, *,
                rehearsal: PuzzleSplit | None = None, trainer: Trainer | None = None) -> SleepReport:
    """One sleep (module docstring) with `trainer` (default config.trainer): returns what it did; publishes
    only accepted weights."""
    start = time.perf_counter()
    trainer = trainer or select_trainer(config.trainer)
    current = weights.read_current(weights_dir)
    if current is None:
        raise SleepError(f"{weights_dir}: no published weights; import the serving checkpoint first "
                         "(python -m sage sleep --init-from CHECKPOINT ...)")
    params, model_config = trainer.load(current["path"])
    if model_config.num_puzzle_identifiers > 1:
        raise SleepError(f"the served model has {model_config.num_puzzle_identifiers} puzzle identifiers (per-task "
                         "embeddings, as ARC); sleep trains every row with identifier 0 and supports one-identifier "
                         "tasks (Sudoku, mazes) only")
    rng = np.random.default_rng([config.seed, current["version"]])
    ids, inputs, labels, provenance = draw(store, config, rng)
    if not ids:
        raise SleepError(f"no labelled experience among those drawn from {store.path} ({provenance}); "
                         "serve more puzzles before sleeping")
    train_inputs, train_labels = replay.augment(config.task, inputs, labels, rng, config.augmentations)
    if heldout.metadata.ignore_label_id is not None:  # unsupervised cells (e.g. a maze's padding), as the loader
        train_labels = np.where(train_labels == heldout.metadata.ignore_label_id, IGNORE_LABEL_ID, train_labels)
    before = validate(trainer, params, model_config, heldout, config)
    replay_split = _replay_split(inputs, labels) if config.task == "sudoku" else None
    replay_before = validate(trainer, params, model_config, replay_split, config)
    new_params, losses = fine_tune(params, model_config, train_inputs, train_labels, config, rng, rehearsal,
                                   trainer=trainer)
    after = validate(trainer, new_params, model_config, heldout, config)
    replay_after = validate(trainer, new_params, model_config, replay_split, config)
    accepted, reason = gate(before, after, config.metric, config.tolerance)
    published = None
    if accepted:
        published = publish(weights_dir, new_params, model_config,
                             {"parent": current["version"], "validation": after, "experiences": len(ids),
                              "trainer": trainer.name}, fmt=trainer.weights_format)
        store.consolidate(ids)
        weights.prune(weights_dir, config.keep_versions)
    logger.info("sleep from version %d (%s trainer): %s; %s", current["version"], trainer.name,
                f"published version {published}" if accepted else "rejected", reason)
    return SleepReport(accepted, reason, current["version"], published, len(ids), provenance, len(train_inputs),
                       config.steps, (losses[0], losses[-1]), before, after, replay_before, replay_after,
                       time.perf_counter() - start, trainer.name)


# -- python -m sage sleep --------------------------------------------------------------------------
_FLAG_HELP = {
    "task": f"one of {replay.TASKS}", "experiences": "experiences drawn from the store",
    "alpha": "sampling exponent of the decayed salience (0: uniform)",
    "augmentations": "symmetric variants per experience", "rehearsal_fraction": "share of each batch from --rehearsal",
    "steps": "fine-tune steps", "batch_size": "rows per step", "lr": "constant learning rate (AdamATan2)",
    "weight_decay": "weight decay", "metric": "held-out metric that gates the new weights",
    "tolerance": "largest accepted drop of the metric (absolute)", "eval_batch_size": "evaluation batch",
    "max_eval_batches": "evaluate only this many held-out batches", "keep_versions": "published versions kept",
    "seed": "seed of sampling, augmentation and the ACT exploration",
    "trainer": "jax (hrm_jax's train step), torch (the same step in torch, no JAX needed) or auto (jax where it "
               "imports, else torch)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sleep` subcommand's flags (SleepConfig fields keep their names)."""
    parser.add_argument("--weights", required=True, help="published-weights directory (CURRENT.json + versions)")
    parser.add_argument("--init-from", help="publish this model first (empty --weights): an hrm_jax checkpoint, "
                        "a model folder (model.safetensors + config.json) or 'pretrained'")
    parser.add_argument("--store", required=True, help="experience store (SQLite file written by the server)")
    parser.add_argument("--heldout", required=True, help="dataset directory holding the held-out split")
    parser.add_argument("--heldout-split", default="test", help="split of --heldout to validate on (default: test)")
    parser.add_argument("--rehearsal", help="dataset directory whose 'train' split is mixed into each batch")
    defaults = SleepConfig()
    for field in dataclasses.fields(SleepConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = float if isinstance(default, float) else str if isinstance(default, str) else int
        choices = TRAINERS if field.name == "trainer" else None
        parser.add_argument(flag, type=kind, default=default, choices=choices,
                            help=f"{_FLAG_HELP[field.name]} (default: {default})")


def _load_errors() -> tuple[type[Exception], ...]:
    """Bad-input errors of the modules a cycle reads through (those whose framework imported)."""
    errors: list[type[Exception]] = [SleepError, ExperienceStoreError, weights.WeightsError, DatasetFormatError,
                                     ConfigError, replay.ReplayError, PretrainedError]
    for module, names in (("hrm_jax.checkpoint", ("CheckpointError",)), ("hrm_jax.evaluate", ("EvaluationError",)),
                          ("export.convert", ("CheckpointMismatchError", "CheckpointFormatError")),
                          ("sage.sleep_torch", ("TorchTrainerError",))):
        if module in sys.modules:
            errors += [getattr(sys.modules[module], name) for name in names]
    return tuple(errors)


def main(args: argparse.Namespace) -> int:
    """Runs one cycle and prints its report as one JSON line; bad input: one line on stderr, exit 2."""
    try:
        config = SleepConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SleepConfig)})
        trainer = select_trainer(config.trainer)
        if args.init_from and weights.read_current(args.weights) is None:
            import_weights(args.weights, args.init_from, trainer)
        heldout = load_split(args.heldout, args.heldout_split)
        rehearsal = load_split(args.rehearsal, "train") if args.rehearsal else None
        with ExperienceStore(args.store) as store:
            report = sleep_cycle(args.weights, store, heldout, config, rehearsal=rehearsal, trainer=trainer)
    except _load_errors() as err:  # evaluated when an error is raised: includes the trainer's modules by then
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"sage sleep: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()))
    return 0
