"""ARC-AGI grids: reading task files, the reference's token encoding, augmentations and their inverses.

Encoding as the reference (sapientinc/HRM dataset/build_arc_dataset.py): every grid (at most 30x30)
is placed on a 30x30 canvas flattened row-major to 900 tokens: 0 pad, 1 end-of-row/end-of-grid
marker, 2..11 the colours 0..9. The marker fills the column right of the grid (over the grid's
rows) and the row below it (over the grid's columns), where they fit; the corner cell stays pad.
Training examples may sit at a random offset on the canvas (translation); their input and output
share the offset.

Augmentations are the reference's: one of the 8 dihedral transforms (dataset/common.py ids) after
a permutation of the colours 1..9 (0, the background, stays). The puzzle name of an augmented task
is `<task>_t<id>_<colours>` where `<colours>` lists the new colour of each old colour 0..9, as the
reference writes it and its arc_eval notebook parses it.

The builder is in arc_build.py; voting and scoring in hrm_jax/arc_eval.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from hrm_jax.data.dihedral import DIHEDRAL_INVERSE, NUM_DIHEDRAL, dihedral_transform  # noqa: F401 (re-exported)

GRID_SIZE = 30
SEQ_LEN = GRID_SIZE * GRID_SIZE
PAD_ID, EOS_ID, COLOUR_OFFSET = 0, 1, 2
VOCAB_SIZE = 10 + COLOUR_OFFSET
_AUG_NAME = re.compile(r"^(?P<task>.+)_t(?P<tid>[0-7])_(?P<colours>[0-9]{10})$")


class ARCDataError(ValueError):
    """An ARC task file or grid is malformed, or a build request cannot be met; the message says where."""


Grid = np.ndarray  # uint8[rows, cols], colours 0..9, 1 <= rows, cols <= 30


@dataclasses.dataclass(frozen=True)
class ARCTask:
    """One task: demonstration pairs ("train") and test pairs, each (input, output) grids."""

    name: str
    train: tuple[tuple[Grid, Grid], ...]
    test: tuple[tuple[Grid, Grid], ...]


# Reading ----------------------------------------------------------------------------------------
def grid_from_json(value: Any, where: str) -> Grid:
    """A JSON grid (list of equal-length rows of ints 0..9, at most 30x30) -> uint8[rows, cols]."""
    if not (isinstance(value, list) and value and all(isinstance(r, list) for r in value)):
        raise ARCDataError(f"{where}: a grid must be a non-empty list of rows, got {str(value)[:60]}")
    widths = {len(r) for r in value}
    if len(widths) != 1 or 0 in widths:
        raise ARCDataError(f"{where}: rows must be non-empty and of equal length, got lengths {sorted(widths)}")
    if not all(isinstance(c, int) and not isinstance(c, bool) for r in value for c in r):
        raise ARCDataError(f"{where}: cells must be integers 0..9")
    arr = np.asarray(value, dtype=np.int64)
    if arr.shape[0] > GRID_SIZE or arr.shape[1] > GRID_SIZE:
        raise ARCDataError(f"{where}: grid is {arr.shape[0]}x{arr.shape[1]}, larger than {GRID_SIZE}x{GRID_SIZE}")
    if arr.min() < 0 or arr.max() > 9:
        raise ARCDataError(f"{where}: colours must lie in 0..9, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def _pairs(task: dict, kind: str, where: str) -> tuple[tuple[Grid, Grid], ...]:
    examples = task.get(kind)
    if not isinstance(examples, list) or (kind == "train" and not examples):
        raise ARCDataError(f"{where}: '{kind}' must be a list of {{'input', 'output'}} pairs"
                           f"{' (at least one)' if kind == 'train' else ''}")
    pairs = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict) or "input" not in example or "output" not in example:
            raise ARCDataError(f"{where}: {kind}[{i}] needs 'input' and 'output' grids (test outputs are "
                               "needed to score; use a task file that includes them)")
        pairs.append((grid_from_json(example["input"], f"{where} {kind}[{i}].input"),
                      grid_from_json(example["output"], f"{where} {kind}[{i}].output")))
    return tuple(pairs)


def parse_task(name: str, task: Any, where: str) -> ARCTask:
    """A task's JSON object {"train": [...], "test": [...], optional "name"} -> ARCTask."""
    if not isinstance(task, dict):
        raise ARCDataError(f"{where}: a task must be a JSON object with 'train' and 'test', got {type(task).__name__}")
    # The reference prefers a "name" field (some ARC-AGI-1 files carry one) over the file stem.
    name = str(task.get("name", name))
    if _AUG_NAME.match(name):
        raise ARCDataError(f"{where}: task name {name!r} looks like an augmented name (<task>_t<k>_<colours>); "
                           "rename it")
    return ARCTask(name, _pairs(task, "train", where), _pairs(task, "test", where))


def load_tasks(path: str | os.PathLike) -> list[ARCTask]:
    """Tasks of one source: a JSON file {task_id: task} (the packed form the
    default source directory holds)
    or a directory of one-task JSON files (the ARC-AGI repositories' layout, searched recursively).
    Task names are the last path component of the key (ConceptARC's 'Concept/Task' -> 'Task') or the
    file stem, as the reference names them."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise ARCDataError(f"{path}: no .json task files in this directory")
        return [parse_task(f.stem, _read_json(f), str(f)) for f in files]
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise ARCDataError(f"{path}: expected a non-empty JSON object {{task_id: task}}")
    return [parse_task(key.rsplit("/", 1)[-1], task, f"{path}[{key}]") for key, task in data.items()]


def _read_json(path: pathlib.Path) -> Any:
    if not path.is_file():
        raise ARCDataError(f"{path}: file not found; pass an ARC task file (JSON) or a folder of them")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ARCDataError(f"{path}: not valid JSON ({err})") from None


# Augmentation -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Augmentation:
    """Recolour by `colours` (uint8[10], colours[old] = new, colours[0] == 0), then dihedral `tid`."""

    tid: int
    colours: np.ndarray

    def apply(self, grid: Grid) -> Grid:
        return np.ascontiguousarray(dihedral_transform(self.colours[grid], self.tid))

    def invert(self, grid: Grid) -> Grid:
        """Exact inverse of `apply` (arc_eval notebook `inverse_aug`): undo the transform, then the colours."""
        return np.argsort(self.colours).astype(np.uint8)[dihedral_transform(grid, DIHEDRAL_INVERSE[self.tid])]

    @property
    def suffix(self) -> str:
        return f"t{self.tid}_{''.join(str(int(c)) for c in self.colours)}"

    @property
    def is_identity(self) -> bool:
        return self.tid == 0 and bool(np.all(self.colours == np.arange(10)))


IDENTITY = Augmentation(0, np.arange(10, dtype=np.uint8))


def random_augmentation(rng: np.random.Generator) -> Augmentation:
    """A uniform dihedral id and a uniform permutation of colours 1..9 (the reference's plan)."""
    tid = int(rng.integers(0, NUM_DIHEDRAL))
    colours = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
    return Augmentation(tid, colours)


def parse_puzzle_name(name: str) -> tuple[str, Augmentation]:
    """'<task>_t<k>_<colours>' -> (task, its Augmentation); a plain task name -> (name, IDENTITY)."""
    match = _AUG_NAME.match(name)
    if match is None:
        return name, IDENTITY
    colours = np.array([int(c) for c in match["colours"]], dtype=np.uint8)
    if colours[0] != 0 or sorted(colours.tolist()) != list(range(10)):
        raise ARCDataError(f"puzzle name {name!r}: the colour map must be a permutation of 0..9 keeping 0")
    return match["task"], Augmentation(int(match["tid"]), colours)


# Encoding ---------------------------------------------------------------------------------------
def encode_grid(grid: Grid, row: int = 0, col: int = 0, size: int = GRID_SIZE) -> np.ndarray:
    """Grid uint8[r, c] at offset (row, col) of the size x size canvas -> uint8[size * size] tokens.

    size is 30 in the reference protocol; smaller canvases serve CPU quick starts only.
    """
    rows, cols = grid.shape
    if not (0 <= row <= size - rows and 0 <= col <= size - cols):
        raise ARCDataError(f"a {rows}x{cols} grid does not fit the {size}x{size} canvas at ({row}, {col})")
    canvas = np.full((size, size), PAD_ID, np.uint8)
    canvas[row:row + rows, col:col + cols] = grid + COLOUR_OFFSET
    if row + rows < size:
        canvas[row + rows, col:col + cols] = EOS_ID
    if col + cols < size:
        canvas[row:row + rows, col + cols] = EOS_ID
    return canvas.reshape(size * size)


def canvas_size(seq_len: int) -> int:
    """The canvas side of a token sequence (900 -> 30)."""
    size = int(round(seq_len ** 0.5))
    if size * size != seq_len:
        raise ARCDataError(f"ARC token sequences hold a square canvas; length {seq_len} is not a square")
    return size


def crop_sizes(tokens: np.ndarray) -> np.ndarray:
    """(rows, cols) int64[..., 2] of the grids the arc_eval notebook's `crop` reads from tokens [..., size**2].

    The crop is the largest-area rectangle anchored at the top-left corner holding only colour
    tokens (2..11): column widths shrink row by row to the first non-colour token, and the first
    row count reaching the largest area wins. (0, 0) when the top-left token is not a colour.
    """
    tokens = np.asarray(tokens)
    size = canvas_size(tokens.shape[-1])
    tokens = tokens.reshape(*tokens.shape[:-1], size, size)
    bad = (tokens < COLOUR_OFFSET) | (tokens >= VOCAB_SIZE)
    first_bad = np.where(bad.any(-1), bad.argmax(-1), size)         # [..., size] width of each row's run
    widths = np.minimum.accumulate(first_bad, axis=-1)              # [..., size] width with all rows above
    areas = widths * np.arange(1, size + 1)
    best = areas.argmax(-1)                                          # first maximum, as the notebook
    cols = np.take_along_axis(widths, best[..., None], -1)[..., 0]
    rows = np.where(cols > 0, best + 1, 0)
    return np.stack([rows, cols], -1)


def crop(tokens: np.ndarray) -> Grid:
    """Tokens [size**2] -> the grid at the top-left (colours 0..9, uint8[r, c], possibly 0x0)."""
    tokens = np.asarray(tokens)
    rows, cols = crop_sizes(tokens)
    size = canvas_size(tokens.shape[-1])
    return (tokens.reshape(size, size)[:rows, :cols] - COLOUR_OFFSET).astype(np.uint8)
