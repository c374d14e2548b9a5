"""The on-disk puzzle dataset format (the reference's layout), its writer and its validating loader.

Layout (identical to sapientinc/HRM's dataset/build_*_dataset.py, so datasets built by either
project load in both)::

    <root>/<split>/dataset.json                  metadata (PuzzleDatasetMetadata as a JSON object)
    <root>/<split>/<set>__inputs.npy             [num_examples, seq_len] integer token ids
    <root>/<split>/<set>__labels.npy             [num_examples, seq_len] integer target ids
    <root>/<split>/<set>__puzzle_identifiers.npy [num_puzzles] int32/int64 puzzle-embedding row
    <root>/<split>/<set>__puzzle_indices.npy     [num_puzzles + 1] int32/int64 example offsets
    <root>/<split>/<set>__group_indices.npy      [num_groups + 1] int32/int64 puzzle offsets
    <root>/<split>/<set>__<name>.npy             optional task-specific arrays (e.g. difficulty)

`<split>` is "train" or "test"; `<set>` is one of `metadata.sets` (usually just "all"; ARC may
split a split into several sets). Three levels of nesting:

- An *example* is one (input, label) pair of token sequences, a row of inputs/labels. Tokens lie
  in [0, vocab_size); `pad_id` fills unused cells. A label equal to `ignore_label_id` is not
  supervised: loaders map it to -100 (the loss's ignore id).
- A *puzzle* is a run of consecutive examples sharing one puzzle identifier (one ARC task under
  one augmentation, or one Sudoku/maze instance): puzzle p owns examples
  `puzzle_indices[p] : puzzle_indices[p + 1]`, and `puzzle_identifiers[p]` is its row in the
  puzzle-embedding table, in [0, num_puzzle_identifiers). `blank_identifier_id` is the row used
  for padding.
- A *group* is a run of consecutive puzzles that are augmentations of one original: group g owns
  puzzles `group_indices[g] : group_indices[g + 1]`. Training draws one puzzle per group per
  epoch, so an epoch is `total_groups` draws whatever the number of augmentations.

Both index arrays start at 0, strictly increase (no empty puzzle or group) and end at the count
of the level below. `total_groups` is the number of groups summed over sets and
`mean_puzzle_examples` = examples / puzzles over all sets; the trainer derives the step count
from them (see TrainConfig.total_steps). `extra` in dataset.json is a free JSON object for
task-specific additions; the reference's loader ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tokenize
from collections.abc import Mapping
from typing import Any

import numpy as np

INDEX_FIELDS = ("puzzle_identifiers", "puzzle_indices", "group_indices")
TOKEN_FIELDS = ("inputs", "labels")
FIELDS = TOKEN_FIELDS + INDEX_FIELDS
METADATA_FILE = "dataset.json"
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_BUILD_HINT = "build the dataset first (see hrm_jax.data.sudoku / maze / arc)"


class DatasetFormatError(ValueError):
    """A dataset on disk (or about to be written) breaks the format; the message names the file."""


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise DatasetFormatError(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PuzzleDatasetMetadata:
    """Contents of dataset.json (field names as the reference's dataset/common.py)."""

    seq_len: int
    vocab_size: int
    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    sets: tuple[str, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = METADATA_FILE
        for name in ("seq_len", "vocab_size", "num_puzzle_identifiers", "total_groups"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, where, f"{name} must be a positive integer, got {value!r}")
        _check(_is_int(self.pad_id) and 0 <= self.pad_id < self.vocab_size, where,
               f"pad_id must be an integer in [0, vocab_size={self.vocab_size}), got {self.pad_id!r}")
        _check(self.ignore_label_id is None or _is_int(self.ignore_label_id), where,
               f"ignore_label_id must be an integer or null, got {self.ignore_label_id!r}")
        _check(_is_int(self.blank_identifier_id)
               and 0 <= self.blank_identifier_id < self.num_puzzle_identifiers, where,
               f"blank_identifier_id must be an integer in [0, num_puzzle_identifiers="
               f"{self.num_puzzle_identifiers}), got {self.blank_identifier_id!r}")
        mean = self.mean_puzzle_examples
        _check(isinstance(mean, (int, float)) and not isinstance(mean, bool) and math.isfinite(mean)
               and mean >= 1, where, f"mean_puzzle_examples must be a number >= 1, got {mean!r}")
        self._check_sets(where)
        _check(isinstance(self.extra, dict), where, f"extra must be a JSON object, got {self.extra!r}")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as err:
            raise DatasetFormatError(f"{where}: extra must be JSON-serialisable ({err})") from None
        # Normalise (frozen dataclass): sets to a tuple, numbers to Python types for JSON.
        object.__setattr__(self, "sets", tuple(self.sets))
        object.__setattr__(self, "mean_puzzle_examples", float(mean))
        for name in ("seq_len", "vocab_size", "pad_id", "blank_identifier_id", "num_puzzle_identifiers",
                     "total_groups"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.ignore_label_id is not None:
            object.__setattr__(self, "ignore_label_id", int(self.ignore_label_id))

    def _check_sets(self, where: str) -> None:
        sets = self.sets
        _check(isinstance(sets, (list, tuple)) and len(sets) > 0, where,
               f"sets must be a non-empty list of set names, got {sets!r}")
        for name in sets:
            # "__" separates set and field in file names; a separator would leave the split directory.
            _check(isinstance(name, str) and name != "" and "__" not in name and "/" not in name
                   and os.sep not in name and name not in (".", ".."), where,
                   f"set name {name!r} is invalid: use a non-empty name without '__' or path separators")
        _check(len(set(sets)) == len(sets), where, f"sets has duplicates: {list(sets)}")

    def to_json_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sets"] = list(self.sets)
        return out

    @classmethod
    def from_json_dict(cls, data: Any, where: str = METADATA_FILE) -> PuzzleDatasetMetadata:
        """Builds metadata from a parsed dataset.json; `where` (the file path) prefixes errors."""
        _check(isinstance(data, dict), where, f"must hold a JSON object, got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in fields if name != "extra" and name not in data]
        _check(not missing, where, f"missing keys {missing}; rebuild the dataset or add them")
        # Unknown keys are ignored as the reference's pydantic model does.
        kwargs = {name: data[name] for name in fields if name in data}
        if kwargs.get("extra") is None:
            kwargs["extra"] = {}
        try:
            return cls(**kwargs)
        except DatasetFormatError as err:
            raise DatasetFormatError(str(err).replace(METADATA_FILE, where, 1)) from None


@dataclasses.dataclass(frozen=True)
class PuzzleSet:
    """The arrays of one set (shapes in the module docstring); inputs/labels may be memory-mapped."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_puzzles(self) -> int:
        return int(self.puzzle_indices.shape[0]) - 1

    @property
    def num_groups(self) -> int:
        return int(self.group_indices.shape[0]) - 1


@dataclasses.dataclass(frozen=True)
class PuzzleSplit:
    """One split (e.g. "train"): metadata and its sets in metadata order."""

    metadata: PuzzleDatasetMetadata
    sets: dict[str, PuzzleSet]
    path: str

    def __getitem__(self, set_name: str) -> PuzzleSet:
        if set_name not in self.sets:
            raise DatasetFormatError(f"{self.path}: no set {set_name!r}; the sets are {list(self.sets)}")
        return self.sets[set_name]


# Validation --------------------------------------------------------------------------------------
def _value_range(arr: np.ndarray, rows_per_chunk: int = 1 << 16) -> tuple[int, int]:
    """(min, max) of a possibly memory-mapped array, read in chunks to bound memory."""
    lo, hi = None, None
    for start in range(0, arr.shape[0], rows_per_chunk):
        chunk = np.asarray(arr[start:start + rows_per_chunk])
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    return lo, hi


def _check_offsets(arr: np.ndarray, end: int, where: str, what: str) -> None:
    """Offsets [count + 1]: 0, strictly increasing, ending at `end` (the size of the level below)."""
    _check(arr.ndim == 1 and arr.shape[0] >= 2, where,
           f"must be 1-D with at least 2 entries (0 and the end), got shape {arr.shape}")
    _check(int(arr[0]) == 0, where, f"must start at 0, got {int(arr[0])}")
    _check(bool(np.all(np.diff(arr) > 0)), where,
           f"must strictly increase (every {what} non-empty); first bad position "
           f"{int(np.argmax(np.diff(arr) <= 0)) + 1}")
    _check(int(arr[-1]) == end, where, f"must end at {end} (the number of rows it indexes), got {int(arr[-1])}")


def _check_set(meta: PuzzleDatasetMetadata, arrays: Mapping[str, np.ndarray], path_of, check_values: bool) -> None:
    """Validates one set's five arrays; path_of(field) names the file in messages."""
    for field in TOKEN_FIELDS:
        _check(arrays[field].dtype.kind in "iu", path_of(field),
               f"dtype must be integer, got {arrays[field].dtype}")
    for field in INDEX_FIELDS:
        _check(arrays[field].dtype in _INDEX_DTYPES, path_of(field),
               f"dtype must be int32 or int64, got {arrays[field].dtype}")
    inputs, labels = arrays["inputs"], arrays["labels"]
    _check(inputs.ndim == 2 and inputs.shape[1] == meta.seq_len and inputs.shape[0] >= 1, path_of("inputs"),
           f"shape must be [num_examples >= 1, seq_len={meta.seq_len}], got {inputs.shape}")
    _check(labels.shape == inputs.shape, path_of("labels"),
           f"shape must equal inputs' {inputs.shape}, got {labels.shape}")
    _check_offsets(arrays["puzzle_indices"], inputs.shape[0], path_of("puzzle_indices"), "puzzle")
    num_puzzles = arrays["puzzle_indices"].shape[0] - 1
    _check_offsets(arrays["group_indices"], num_puzzles, path_of("group_indices"), "group")
    ids = arrays["puzzle_identifiers"]
    _check(ids.shape == (num_puzzles,), path_of("puzzle_identifiers"),
           f"shape must be [num_puzzles={num_puzzles}], got {ids.shape}")
    if num_puzzles:
        lo, hi = int(ids.min()), int(ids.max())
        _check(lo >= 0 and hi < meta.num_puzzle_identifiers, path_of("puzzle_identifiers"),
               f"values must lie in [0, num_puzzle_identifiers={meta.num_puzzle_identifiers}), got [{lo}, {hi}]")
    if check_values:
        _check_tokens(meta, inputs, labels, path_of)


def _check_tokens(meta: PuzzleDatasetMetadata, inputs: np.ndarray, labels: np.ndarray, path_of) -> None:
    lo, hi = _value_range(inputs)
    _check(lo >= 0 and hi < meta.vocab_size, path_of("inputs"),
           f"token ids must lie in [0, vocab_size={meta.vocab_size}), got [{lo}, {hi}]")
    lo, hi = _value_range(labels)
    if lo >= 0 and hi < meta.vocab_size:
        return
    # Out-of-vocabulary labels are allowed only where they equal ignore_label_id.
    ignore = meta.ignore_label_id
    bad = 0
    for start in range(0, labels.shape[0], 1 << 16):
        chunk = np.asarray(labels[start:start + (1 << 16)]).astype(np.int64)
        out = (chunk < 0) | (chunk >= meta.vocab_size)
        if ignore is not None:
            out &= chunk != ignore
        bad += int(out.sum())
    _check(bad == 0, path_of("labels"),
           f"{bad} label ids lie outside [0, vocab_size={meta.vocab_size}) and are not "
           f"ignore_label_id={ignore!r}")


def _check_totals(meta: PuzzleDatasetMetadata, sets: Mapping[str, PuzzleSet], where: str) -> None:
    """total_groups and mean_puzzle_examples must match the arrays (they set the step count)."""
    groups = sum(s.num_groups for s in sets.values())
    _check(groups == meta.total_groups, where,
           f"total_groups={meta.total_groups} but the sets hold {groups} groups; fix the metadata")
    examples = sum(s.num_examples for s in sets.values())
    puzzles = sum(s.num_puzzles for s in sets.values())
    mean = examples / puzzles
    _check(math.isclose(mean, meta.mean_puzzle_examples, rel_tol=1e-6), where,
           f"mean_puzzle_examples={meta.mean_puzzle_examples} but the sets hold {examples} examples "
           f"in {puzzles} puzzles ({mean:.6g}); fix the metadata")


# Reading and writing --------------------------------------------------------------------------------
def _split_dir(root: str | os.PathLike, split: str) -> str:
    return os.path.join(os.fspath(root), split)


def load_metadata(root: str | os.PathLike, split: str) -> PuzzleDatasetMetadata:
    """Reads and validates `<root>/<split>/dataset.json`."""
    directory = _split_dir(root, split)
    _check(os.path.isdir(directory), directory, f"split directory not found; {_BUILD_HINT}")
    path = os.path.join(directory, METADATA_FILE)
    _check(os.path.isfile(path), path, f"metadata file not found; {_BUILD_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: malformed JSON ({err}); rebuild the dataset") from None
    return PuzzleDatasetMetadata.from_json_dict(data, where=path)


def _load_array(path: str, mmap_mode: str | None) -> np.ndarray:
    _check(os.path.isfile(path), path, f"array file not found; {_BUILD_HINT}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    # A damaged header fails numpy's literal_eval with SyntaxError or tokenize.TokenError.
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as err:
        reason = " ".join(str(err).split())
        raise DatasetFormatError(f"{path}: not a readable .npy array ({reason}); rebuild the dataset") from None


def load_split(root: str | os.PathLike, split: str, *, check_values: bool = True) -> PuzzleSplit:
    """Loads and validates one split.

    inputs, labels and extra arrays are memory-mapped (read-only); the small index arrays are read
    into memory, as the reference's puzzle_dataset.py does. check_values=False skips the token-range
    scan, which reads every token (seconds for the largest ARC builds).
    Raises DatasetFormatError naming the offending file.
    """
    meta = load_metadata(root, split)
    directory = _split_dir(root, split)
    sets = {}
    for name in meta.sets:
        path_of = lambda field, name=name: os.path.join(directory, f"{name}__{field}.npy")  # noqa: E731
        arrays = {field: _load_array(path_of(field), "r" if field in TOKEN_FIELDS else None)
                  for field in FIELDS}
        _check_set(meta, arrays, path_of, check_values)
        extra = {}
        for file in sorted(os.listdir(directory)):
            stem, ext = os.path.splitext(file)
            if ext == ".npy" and stem.startswith(f"{name}__") and stem[len(name) + 2:] not in FIELDS:
                extra[stem[len(name) + 2:]] = _load_array(os.path.join(directory, file), "r")
        sets[name] = PuzzleSet(name=name, extra=extra, **arrays)
    _check_totals(meta, sets, os.path.join(directory, METADATA_FILE))
    return PuzzleSplit(metadata=meta, sets=sets, path=directory)


def write_split(root: str | os.PathLike, split: str, metadata: PuzzleDatasetMetadata,
                sets: Mapping[str, Mapping[str, np.ndarray]],
                extra_arrays: Mapping[str, np.ndarray] | None = None) -> str:
    """Validates and writes one split; returns its directory.

    sets: {set_name: {"inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices"}},
      exactly the sets of metadata.sets. extra_arrays: {"<set>__<name>": array}, written as
      `<set>__<name>.npy` (e.g. "all__difficulty"). Existing files of the same names are
      overwritten; dataset.json is written last so an interrupted write fails to load.
    """
    directory = _split_dir(root, split)
    path_for = lambda stem: os.path.join(directory, f"{stem}.npy")  # noqa: E731
    _check(set(sets) == set(metadata.sets), directory,
           f"sets {sorted(sets)} differ from metadata.sets {list(metadata.sets)}")
    checked = {}
    for name in metadata.sets:
        arrays = {k: np.asarray(v) for k, v in sets[name].items()}
        keys = set(arrays)
        _check(keys == set(FIELDS), path_for(f"{name}__*"),
               f"set {name!r} needs exactly the arrays {list(FIELDS)}, got {sorted(keys)}; pass other "
               f"arrays through extra_arrays")
        _check_set(metadata, arrays, lambda field, name=name: path_for(f"{name}__{field}"), True)
        checked[name] = PuzzleSet(name=name, **arrays)
    _check_totals(metadata, checked, os.path.join(directory, METADATA_FILE))
    extra_arrays = {k: np.asarray(v) for k, v in (extra_arrays or {}).items()}
    for stem, arr in extra_arrays.items():
        set_name, sep, field = stem.partition("__")
        _check(sep == "__" and set_name in metadata.sets and field and field not in FIELDS
               and "/" not in field and os.sep not in field, path_for(stem),
               f"extra array names must be '<set>__<name>' with <set> in {list(metadata.sets)} and "
               f"<name> not one of {list(FIELDS)}")
        _check(arr.dtype != object, path_for(stem), "object arrays cannot be stored; use a numeric dtype")

    os.makedirs(directory, exist_ok=True)
    for name, pset in checked.items():
        for field in FIELDS:
            np.save(path_for(f"{name}__{field}"), getattr(pset, field), allow_pickle=False)
    for stem, arr in extra_arrays.items():
        np.save(path_for(stem), arr, allow_pickle=False)
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata.to_json_dict(), f, indent=1)
    return directory
