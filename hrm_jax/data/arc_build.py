"""The ARC dataset builder: the reference's protocol (sapientinc/HRM dataset/build_arc_dataset.py).

- Every task becomes one group of the train split: the task itself and up to `num_aug` distinct
  augmentations (dihedral transform x colour permutation keeping 0; duplicates of the whole task
  are dropped, at most 5 * num_aug tries), each one puzzle with its own puzzle identifier.
- Train puzzles hold all demonstration pairs; tasks of "train" sources add their test pairs too
  (the reference's `_default` mapping). Tasks of "eval" sources send their test pairs to the test
  split instead, one group per task with the same augmentations and identifiers as in train.
- Train examples sit at a random offset on the 30x30 canvas (translation), except one random
  example per puzzle; test examples sit at the top-left corner (the notebook's crop needs that).
- Identifier 0 is blank; identifiers.json at the root names every identifier, as the reference.

The paper's ARC-AGI-1 run uses train sources ARC-AGI-1 training + ConceptARC and eval source
ARC-AGI-1 evaluation (`ARC1_SOURCES`); its ARC-AGI-2 run uses ARC-AGI-2 training and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from hrm_jax.data.arc import (
    GRID_SIZE,
    IDENTITY,
    PAD_ID,
    VOCAB_SIZE,
    ARCDataError,
    ARCTask,
    Augmentation,
    canvas_size,
    encode_grid,
    load_tasks,
    random_augmentation,
)
from hrm_jax.data.format import PuzzleDatasetMetadata, write_split
from hrm_jax.data.samples import sample_path

log = logging.getLogger(__name__)

RETRIES_FACTOR = 5  # reference ARCAugmentRetriesFactor
ROLES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Source:
    """A task file or folder and its role: "train" (all pairs train) or "eval" (test pairs are the test split)."""

    path: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ARCDataError(f"source {self.path}: role must be one of {ROLES}, got {self.role!r}")


# The full collections beside a checkout (the repository cloned next to a `shared/` folder), looked
# up from the working directory; HRM_ARC_DATA points anywhere else.
SHARED_DIR = pathlib.Path("..") / "shared" / "data" / "arc"


def default_data_dir() -> pathlib.Path:
    """The full ARC collections: $HRM_ARC_DATA, else ../shared/data/arc relative to the working
    directory (the quick start reads the bundled sample instead: `sample_data_dir`)."""
    env = os.environ.get("HRM_ARC_DATA")
    return pathlib.Path(env) if env else SHARED_DIR.resolve()


def sample_data_dir() -> pathlib.Path:
    """The bundled sample: the 16 smallest tasks of ARC-AGI-1 training/evaluation and ConceptARC."""
    return sample_path("arc")


def arc1_sources(data_dir: str | os.PathLike | None = None) -> list[Source]:
    """The paper's ARC-AGI-1 protocol (reference DataProcessConfig default)."""
    d = pathlib.Path(data_dir or default_data_dir())
    return [Source(str(d / "arc-agi-1_training.json"), "train"), Source(str(d / "conceptarc.json"), "train"),
            Source(str(d / "arc-agi-1_evaluation.json"), "eval")]


def arc2_sources(eval_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[Source]:
    """ARC-AGI-2: its training set; its evaluation set is not bundled, so the caller names it."""
    d = pathlib.Path(data_dir or default_data_dir())
    return [Source(str(d / "arc-agi-2_training.json"), "train"), Source(str(eval_path), "eval")]


# Planning ---------------------------------------------------------------------------------------
def _task_key(task: ARCTask, aug: Augmentation) -> tuple:
    """Equal for two augmentations that give the same task (the reference's puzzle_hash: the sorted
    multiset of (input, output) pairs with their shapes, over train and test pairs)."""
    pairs = []
    for inp, out in task.train + task.test:
        a, b = aug.apply(inp), aug.apply(out)
        pairs.append((a.shape, a.tobytes(), b.shape, b.tobytes()))
    return tuple(sorted(pairs))


def plan_augmentations(task: ARCTask, num_aug: int, rng: np.random.Generator) -> list[Augmentation]:
    """[IDENTITY] + up to num_aug augmentations giving distinct tasks, drawn as the reference does."""
    plan, seen = [IDENTITY], {_task_key(task, IDENTITY)}
    for _ in range(RETRIES_FACTOR * num_aug):
        if len(plan) > num_aug:
            break
        aug = random_augmentation(rng)
        key = _task_key(task, aug)
        if key not in seen:
            seen.add(key)
            plan.append(aug)
    if len(plan) < num_aug + 1:
        log.info("task %s: only %d distinct augmentations of %d asked", task.name, len(plan) - 1, num_aug)
    return plan


def _largest_side(task: ARCTask) -> int:
    return max(max(g.shape) for pair in task.train + task.test for g in pair)


def load_sources(sources: Sequence[Source], rng: np.random.Generator, max_tasks: int | None = None,
                 grid_size: int = GRID_SIZE) -> list[tuple[ARCTask, str]]:
    """(task, role) in source order, shuffled within each source (as the reference shuffles each
    folder). Tasks with a grid larger than grid_size are left out (only with a canvas under 30);
    max_tasks keeps that many of the smallest tasks per source (largest side, then name).
    Duplicate names are an error: the name is the puzzle identifier's key."""
    out, seen = [], {}
    for source in sources:
        tasks = [t for t in load_tasks(source.path) if _largest_side(t) <= grid_size]
        if max_tasks is not None:
            tasks = sorted(tasks, key=lambda t: (_largest_side(t), t.name))[:max_tasks]
        if not tasks:
            raise ARCDataError(f"{source.path}: no task fits a {grid_size}x{grid_size} canvas")
        for index in rng.permutation(len(tasks)):
            task = tasks[index]
            if task.name in seen:
                raise ARCDataError(f"task {task.name!r} is in both {seen[task.name]} and {source.path}; "
                                   "remove one source or rename the task")
            seen[task.name] = source.path
            out.append((task, source.role))
    return out


# Encoding ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _SplitArrays:
    """Preallocated token arrays and growing index lists of one split."""

    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: list[int] = dataclasses.field(default_factory=list)
    puzzle_indices: list[int] = dataclasses.field(default_factory=lambda: [0])
    group_indices: list[int] = dataclasses.field(default_factory=lambda: [0])
    filled: int = 0

    @classmethod
    def allocate(cls, num_examples: int, grid_size: int) -> _SplitArrays:
        shape = (num_examples, grid_size * grid_size)
        return cls(np.empty(shape, np.uint8), np.empty(shape, np.uint8))

    @property
    def grid_size(self) -> int:
        return canvas_size(self.inputs.shape[1])

    def add_puzzle(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], identifier: int,
                   rng: np.random.Generator, translate: bool) -> None:
        # Reference: one random example per puzzle keeps offset (0, 0); the draw happens in both splits.
        keep = int(rng.integers(0, len(pairs)))
        for index, (inp, out) in enumerate(pairs):
            row = col = 0
            if translate and index != keep:
                row = int(rng.integers(0, self.grid_size - max(inp.shape[0], out.shape[0]) + 1))
                col = int(rng.integers(0, self.grid_size - max(inp.shape[1], out.shape[1]) + 1))
            self.inputs[self.filled] = encode_grid(inp, row, col, self.grid_size)
            self.labels[self.filled] = encode_grid(out, row, col, self.grid_size)
            self.filled += 1
        self.puzzle_indices.append(self.filled)
        self.puzzle_identifiers.append(identifier)

    def end_group(self) -> None:
        self.group_indices.append(len(self.puzzle_identifiers))

    def write(self, out_dir: str, split: str, num_identifiers: int, extra: dict) -> dict:
        index = lambda v: np.asarray(v, np.int32)  # noqa: E731
        puzzles, groups = len(self.puzzle_identifiers), len(self.group_indices) - 1
        meta = PuzzleDatasetMetadata(seq_len=self.inputs.shape[1], vocab_size=VOCAB_SIZE, pad_id=PAD_ID,
                                     ignore_label_id=PAD_ID,
                                     blank_identifier_id=0, num_puzzle_identifiers=num_identifiers,
                                     total_groups=groups, mean_puzzle_examples=self.filled / puzzles,
                                     sets=("all",), extra=extra)
        write_split(out_dir, split, meta, {"all": {
            "inputs": self.inputs, "labels": self.labels, "puzzle_identifiers": index(self.puzzle_identifiers),
            "puzzle_indices": index(self.puzzle_indices), "group_indices": index(self.group_indices)}})
        return {"groups": groups, "puzzles": puzzles, "examples": self.filled}


def _split_pairs(task: ARCTask, role: str) -> dict[str, tuple]:
    if role == "eval":
        return {"train": task.train, "test": task.test}
    return {"train": task.train + task.test}


# Building ---------------------------------------------------------------------------------------
def build_arc_dataset(out_dir: str | os.PathLike, sources: Sequence[Source], *, num_aug: int = 1000,
                      seed: int = 42, max_tasks: int | None = None, grid_size: int = GRID_SIZE) -> dict:
    """Builds `<out_dir>/{train,test}` and identifiers.json; returns a report (also build_report.json).

    num_aug: augmented versions per task (paper 1000; 0 = none). seed: the reference's default 42
    (the exact draws differ: a numpy Generator, not the legacy global RNG). max_tasks: keep only
    that many of the smallest tasks per source (quick starts and tests). grid_size: the canvas side
    (30 = the reference's 900 tokens; smaller canvases, with the tasks that fit, are for CPU quick
    starts: attention cost grows with the square of the sequence).
    """
    if not isinstance(num_aug, int) or num_aug < 0:
        raise ARCDataError(f"num_aug must be an integer >= 0, got {num_aug!r}")
    if max_tasks is not None and max_tasks < 1:
        raise ARCDataError(f"max_tasks must be >= 1, got {max_tasks!r}")
    if not isinstance(grid_size, int) or not 1 <= grid_size <= GRID_SIZE:
        raise ARCDataError(f"grid_size must be an integer in 1..{GRID_SIZE}, got {grid_size!r}")
    if not any(s.role == "eval" for s in sources):
        raise ARCDataError("no source has role 'eval': the test split would be empty; add an evaluation task file")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    tasks = load_sources(sources, rng, max_tasks, grid_size)
    plans = [plan_augmentations(task, num_aug, rng) for task, _ in tasks]
    # Identifiers in train order (every puzzle is in train); 0 stays blank.
    names = ["<blank>"] + [task.name if aug.is_identity else f"{task.name}_{aug.suffix}"
                           for (task, _), plan in zip(tasks, plans) for aug in plan]
    planned = time.perf_counter()
    report = {"sources": [dataclasses.asdict(s) for s in sources], "num_aug": num_aug, "seed": seed,
              "max_tasks": max_tasks, "grid_size": grid_size, "tasks": len(tasks), "num_puzzle_identifiers": len(names),
              "tasks_not_full": sum(len(p) < num_aug + 1 for p in plans)}
    extra = {"task": "arc", "num_aug": num_aug, "seed": seed, "grid_size": grid_size}
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "test"):
        report[split] = _build_split(os.fspath(out_dir), split, tasks, plans, rng, len(names), extra, grid_size)
    with open(os.path.join(out_dir, "identifiers.json"), "w", encoding="utf-8") as f:
        json.dump(names, f)
    report["seconds"] = {"plan": round(planned - start, 2), "total": round(time.perf_counter() - start, 2)}
    with open(os.path.join(out_dir, "build_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


def _build_split(out_dir: str, split: str, tasks, plans, rng: np.random.Generator, num_identifiers: int,
                 extra: dict, grid_size: int) -> dict:
    members = [(i, _split_pairs(task, role).get(split, ())) for i, (task, role) in enumerate(tasks)]
    members = [(i, pairs) for i, pairs in members if pairs]
    arrays = _SplitArrays.allocate(sum(len(plans[i]) * len(pairs) for i, pairs in members), grid_size)
    first_id = np.cumsum([1] + [len(p) for p in plans])  # identifier of each task's first puzzle
    for i, pairs in members:
        for offset, aug in enumerate(plans[i]):
            augmented = [(aug.apply(inp), aug.apply(out)) for inp, out in pairs]
            arrays.add_puzzle(augmented, int(first_id[i]) + offset, rng, translate=split == "train")
        arrays.end_group()
    return arrays.write(out_dir, split, num_identifiers, extra)
