"""Training sampler and evaluation batches with the reference's epoch semantics.

The reference (sapientinc/HRM puzzle_dataset.py, `_iter_train` / `_sample_batch` / `_iter_test`):

- Training runs in *iterations* of `epochs_per_iter` epochs (pretrain.py passes eval_interval).
  For each set, an iteration seeds a fresh `Generator(Philox(seed + k))`, k counting set-passes
  from 1, and concatenates `epochs_per_iter` permutations of the set's groups.
- Batches walk that group order: each group contributes one uniformly drawn puzzle (one
  augmentation), and the puzzle contributes min(its examples, room left in the batch) distinct
  examples in random order; a puzzle cut at the batch end loses the rest of its examples.
- The last batch of an iteration, if short, is dropped and the next iteration begins; so with
  one-example puzzles an iteration yields floor(epochs_per_iter * groups / batch) batches.
- Labels equal to ignore_label_id become -100; everything is int32.

Deviations, both invisible in distribution: the reference draws the examples of a puzzle with the
*global* `np.random.choice` (unseeded, so not reproducible); here every draw comes from the
seeded generator, so runs are reproducible and resumable. And the draws of one batch are
vectorised (one `integers` call for the puzzles, one `random` call for the example order) instead
of one pair of calls per group, so only the group order is bit-identical to the reference's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from hrm_jax.data.format import PuzzleDatasetMetadata, PuzzleSet, PuzzleSplit

IGNORE_LABEL_ID = -100  # the loss's ignore id (reference models/losses.py)
_STATE_VERSION = 1


class SamplerError(ValueError):
    """Bad sampler arguments or a sampler state that does not fit this sampler."""


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise SamplerError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _select_sets(split: PuzzleSplit, set_name: str | None) -> list[PuzzleSet]:
    return [split[set_name]] if set_name is not None else [split.sets[n] for n in split.metadata.sets]


def collate(pset: PuzzleSet, meta: PuzzleDatasetMetadata, examples: np.ndarray | slice,
            puzzles: np.ndarray) -> dict[str, np.ndarray]:
    """Gathers rows into an int32 batch and maps ignore_label_id to -100 (reference _collate_batch).

    examples: example rows (indices or a slice), puzzles: [n] the puzzle of each row.
    Returns {"inputs": [n, seq_len], "labels": [n, seq_len], "puzzle_identifiers": [n]}.
    """
    labels = np.array(pset.labels[examples], dtype=np.int32)
    if meta.ignore_label_id is not None:
        labels[labels == meta.ignore_label_id] = IGNORE_LABEL_ID
    return {"inputs": np.array(pset.inputs[examples], dtype=np.int32),
            "labels": labels,
            "puzzle_identifiers": np.asarray(pset.puzzle_identifiers[puzzles], dtype=np.int32)}


def sample_batch(rng: np.random.Generator, group_order: np.ndarray, puzzle_indices: np.ndarray,
                 group_indices: np.ndarray, start: int, batch_size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Packs groups from group_order[start:] into at most batch_size examples.

    Returns (next_start, examples [n], puzzles [n]) with n <= batch_size (n < batch_size only when
    the group order runs out).
    """
    # Every group gives at least one example, so batch_size groups always suffice.
    groups = np.asarray(group_order[start:start + batch_size], dtype=np.int64)
    if groups.size == 0:
        return start, np.zeros(0, np.int64), np.zeros(0, np.int64)
    group_indices = np.asarray(group_indices, dtype=np.int64)
    puzzle_indices = np.asarray(puzzle_indices, dtype=np.int64)
    puzzles = rng.integers(group_indices[groups], group_indices[groups + 1])  # one augmentation per group
    sizes = puzzle_indices[puzzles + 1] - puzzle_indices[puzzles]
    ends = np.cumsum(sizes)
    used = min(int(np.searchsorted(ends, batch_size, side="left")) + 1, groups.size)
    puzzles, sizes, ends = puzzles[:used], sizes[:used], ends[:used]
    take = sizes.copy()
    take[-1] -= max(int(ends[-1]) - batch_size, 0)  # the last puzzle is cut at the batch end

    # A uniform random order of each puzzle's examples (sort random keys within each puzzle); keep
    # the first `take` of each: `take` distinct examples, as np.random.choice(size, take, replace=False).
    owner = np.repeat(np.arange(used), sizes)
    offset = np.repeat(ends - sizes, sizes)
    order = np.lexsort((rng.random(owner.size), owner))
    keep = np.arange(owner.size) - offset < take[owner]
    examples = puzzle_indices[puzzles][owner] + (order - offset)
    return start + used, examples[keep], puzzles[owner][keep]


def _encode(value: Any) -> Any:
    """bit_generator.state -> JSON-able (uint64 arrays become tagged lists of Python ints)."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"])
        return {k: _decode(v) for k, v in value.items()}
    return value


class TrainSampler:
    """Endless training batches; `state()`/`restore()` resume bit-exactly mid-epoch.

    Batches are {"inputs": int32 [B, seq_len], "labels": int32 [B, seq_len] (ignored = -100),
    "puzzle_identifiers": int32 [B]}. The next batch is drawn one step ahead, so `epoch` (epochs
    completed before the next batch) advances as soon as the last batch of an epoch is taken.
    With several sets, an iteration passes over each set in metadata order.

    rows: the rows of every global batch to collate (a multi-process run: this process's block,
    hrm_jax.parallel.process_rows). Every draw is still made for the whole global batch, so the
    generator, `state()` and each row's content are the same in every process and for any `rows`.
    """

    def __init__(self, split: PuzzleSplit, global_batch_size: int, seed: int, set_name: str | None = None,
                 *, epochs_per_iter: int = 1, rows: slice = slice(None)):
        self._rows = rows
        self._batch_size = _positive_int(global_batch_size, "global_batch_size")
        self._epochs_per_iter = _positive_int(epochs_per_iter, "epochs_per_iter")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise SamplerError(f"seed must be a non-negative integer, got {seed!r}")
        self._seed = int(seed)
        self._meta = split.metadata
        self._sets = _select_sets(split, set_name)
        self._check_fillable(split.path)
        self._begin_pass(1)
        self._prepare()

    def _check_fillable(self, where: str) -> None:
        """Fails fast where no iteration could ever fill a batch (the sampler would spin forever)."""
        best = 0
        for pset in self._sets:
            sizes = np.diff(np.asarray(pset.puzzle_indices, dtype=np.int64))
            largest = np.maximum.reduceat(sizes, np.asarray(pset.group_indices[:-1], dtype=np.int64))
            best = max(best, int(largest.sum()) * self._epochs_per_iter)
        if best < self._batch_size:
            raise SamplerError(
                f"{where}: global_batch_size={self._batch_size} exceeds the most examples one iteration "
                f"can give ({best}); lower global_batch_size or raise epochs_per_iter")

    def _begin_pass(self, pass_index: int) -> None:
        # Reference _iter_train: a fresh Philox generator per set-pass, seeded seed + pass count.
        self._pass = pass_index
        self._set = self._sets[(pass_index - 1) % len(self._sets)]
        self._rng = np.random.Generator(np.random.Philox(seed=self._seed + pass_index))
        self._group_order = np.concatenate(
            [self._rng.permutation(self._set.num_groups) for _ in range(self._epochs_per_iter)])
        self._start = 0

    def _prepare(self) -> None:
        """Draws the next full batch; a short batch is dropped and the next pass begins."""
        while True:
            cursor = {"pass": self._pass, "start": self._start, "rng": _encode(self._rng.bit_generator.state)}
            self._start, examples, puzzles = sample_batch(
                self._rng, self._group_order, self._set.puzzle_indices, self._set.group_indices,
                self._start, self._batch_size)
            if examples.size == self._batch_size:
                self._pending = (cursor, self._set, examples, puzzles)
                return
            self._begin_pass(self._pass + 1)

    @property
    def epoch(self) -> int:
        """Epochs completed before the next batch."""
        cursor, pset = self._pending[0], self._pending[1]
        iteration = (cursor["pass"] - 1) // len(self._sets)
        return iteration * self._epochs_per_iter + cursor["start"] // pset.num_groups

    def next_batch(self) -> dict[str, np.ndarray]:
        _, pset, examples, puzzles = self._pending
        batch = collate(pset, self._meta, examples[self._rows], puzzles[self._rows])
        self._prepare()
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def _identity(self) -> dict[str, Any]:
        return {"seed": self._seed, "global_batch_size": self._batch_size,
                "epochs_per_iter": self._epochs_per_iter, "sets": [s.name for s in self._sets],
                "num_groups": [s.num_groups for s in self._sets]}

    def state(self) -> dict[str, Any]:
        """JSON-able position: the generator state and cursor from which the next batch is drawn."""
        return {"version": _STATE_VERSION, **self._identity(), **self._pending[0], "epoch": self.epoch}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from `state()`: the following batches equal those an uninterrupted run gives."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise SamplerError(f"sampler state must be a dict from TrainSampler.state() "
                               f"(version {_STATE_VERSION}), got {state!r:.200}")
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise SamplerError(f"sampler state was saved with different settings or data "
                               f"(field: (saved, now)) {mismatched}; resume with the same dataset and config")
        try:
            pass_index, start, rng_state = int(state["pass"]), int(state["start"]), _decode(state["rng"])
            self._begin_pass(pass_index)  # regenerates the group order of that pass
            self._rng.bit_generator.state = rng_state
        except (KeyError, TypeError, ValueError) as err:
            raise SamplerError(f"sampler state is incomplete or corrupt ({err!r}); "
                               f"pass a dict from TrainSampler.state()") from None
        self._start = start
        self._prepare()


class EvalBatch(NamedTuple):
    """One evaluation batch. `valid` (bool [B]) marks real rows; rows from num_valid on are padding
    (inputs pad_id, labels -100, identifier blank_identifier_id) that metrics must exclude."""

    set_name: str
    batch: dict[str, np.ndarray]
    num_valid: int
    valid: np.ndarray


def eval_batches(split: PuzzleSplit, batch_size: int, set_name: str | None = None) -> Iterator[EvalBatch]:
    """Every example once, in order, set by set (reference _iter_test); the last batch of a set is
    padded to batch_size. Yields EvalBatch(set_name, batch, num_valid, valid)."""
    batch_size = _positive_int(batch_size, "batch_size")
    meta = split.metadata
    pad_values = {"inputs": meta.pad_id, "labels": IGNORE_LABEL_ID,
                  "puzzle_identifiers": meta.blank_identifier_id}
    for pset in _select_sets(split, set_name):
        for start in range(0, pset.num_examples, batch_size):
            end = min(start + batch_size, pset.num_examples)
            puzzles = np.searchsorted(pset.puzzle_indices, np.arange(start, end), side="right") - 1
            batch = collate(pset, meta, slice(start, end), puzzles)
            pad = batch_size - (end - start)
            if pad:
                batch = {k: np.pad(v, ((0, pad),) + ((0, 0),) * (v.ndim - 1), constant_values=pad_values[k])
                         for k, v in batch.items()}
            yield EvalBatch(pset.name, batch, end - start, np.arange(batch_size) < end - start)
