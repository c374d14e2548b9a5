"""Evaluation: every example runs exactly halt_max_steps ACT segments, as the reference's eval mode.

The reference (pretrain.py `evaluate`, models/losses.py ACTLossHead) scores the output of the last
segment; on top of that this module reports what the Q-head would have given had it been allowed
to stop early (the prediction at the first segment where the family's halting rule fires, which is the
training-time halting rule without exploration), and two baselines that tell whether a number is
meaningful: copying the input (exact and per-token) — a Sudoku or maze model that has learned
nothing beats neither.

Metric names follow the reference: accuracy (per-row token accuracy averaged over rows),
exact_accuracy, q_halt_accuracy, steps, lm_loss, q_halt_loss; all are means over the counted rows
(real rows with at least one supervised label; padding rows are excluded, see `evaluate`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hrm_jax import parallel
from hrm_jax.config import HRMConfig
from hrm_jax.data.format import PuzzleSplit
from hrm_jax.data.sampler import eval_batches
from hrm_jax.family import family_of
from hrm_jax.losses import IGNORE_LABEL_ID, LOSS_FUNCTIONS, binary_cross_entropy_with_logits
from hrm_jax.types import Params

logger = logging.getLogger(__name__)

# Per-row values averaged into metrics (the rest of a rollout's outputs are predictions).
ROW_METRICS = ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss",
               "early_accuracy", "early_exact_accuracy", "early_steps", "copy_accuracy", "copy_exact_accuracy")
_EARLY_METRICS = ("early_accuracy", "early_exact_accuracy", "early_steps")


class EvaluationError(ValueError):
    """Bad evaluation arguments (batch size, group_by, a model that does not fit the data)."""


def _token_scores(pred: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pred, labels int32[B, S] -> (per-row token accuracy f32[B], per-row exact bool[B])."""
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    correct = (mask & (pred == labels)).sum(-1)
    return correct / jnp.maximum(counts, 1), correct == counts


def _segment_state(config, outputs, segment: jax.Array, early) -> dict[str, jax.Array]:
    """Folds one segment's outputs into the early-halting record: the first segment where the
    family's halting rule fires (HRM: q_halt > q_continue; TRM: q_halt > 0) fixes that row's early
    prediction and step count."""
    pred = jnp.argmax(outputs["logits"], axis=-1).astype(jnp.int32)
    signal = family_of(config).halt_signal(config, outputs["q_halt_logits"], outputs["q_continue_logits"])
    halt_now = signal & ~early["found"]
    return {"pred": jnp.where(halt_now[:, None], pred, early["pred"]),
            "steps": jnp.where(halt_now, segment, early["steps"]),
            "found": early["found"] | halt_now}


def rollout(params: Params, config: HRMConfig, batch: dict[str, jax.Array],
            loss_type: str = "stablemax_cross_entropy") -> dict[str, jax.Array]:
    """Runs halt_max_steps eval segments from a fresh carry; returns per-row results (all [B]):

    the ROW_METRICS values, plus predictions int32[B, S] (last segment), early_predictions
    int32[B, S], q_halt_logits / q_continue_logits f32[B] (last segment) and has_labels bool[B].
    """
    family = family_of(config)
    carry = family.initial_carry(config, batch)
    carry, outputs = family.act_step(params, config, carry, batch, None, train=False)
    early = _segment_state(config, outputs, jnp.int32(1),
                           {"pred": jnp.zeros(batch["labels"].shape, jnp.int32),
                            "steps": jnp.zeros(batch["labels"].shape[:1], jnp.int32),
                            "found": jnp.zeros(batch["labels"].shape[:1], jnp.bool_)})

    def segment(state, index):
        carry, _, early = state
        carry, outputs = family.act_step(params, config, carry, batch, None, train=False)
        return (carry, outputs, _segment_state(config, outputs, index, early)), None

    # Eval mode halts only at halt_max_steps, so every row runs all segments (the reference's
    # models/hrm/hrm_act_v1.py halts early only while training).
    indices = jnp.arange(2, config.halt_max_steps + 1, dtype=jnp.int32)
    (carry, outputs, early), _ = jax.lax.scan(segment, (carry, outputs, early), indices)
    return _row_results(carry, outputs, early, config, loss_type)


def _row_results(carry, outputs, early, config: HRMConfig, loss_type: str) -> dict[str, jax.Array]:
    data = carry.current_data
    labels, inputs = data["labels"], data["inputs"]
    pred = jnp.argmax(outputs["logits"], axis=-1).astype(jnp.int32)
    early_pred = jnp.where(early["found"][:, None], early["pred"], pred)
    counts = (labels != IGNORE_LABEL_ID).sum(-1)
    accuracy, exact = _token_scores(pred, labels)
    early_accuracy, early_exact = _token_scores(early_pred, labels)
    copy_accuracy, copy_exact = _token_scores(inputs, labels)
    q_halt = outputs["q_halt_logits"]
    lm_loss = LOSS_FUNCTIONS[loss_type](outputs["logits"], labels).sum(-1) / jnp.maximum(counts, 1)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return {
        "accuracy": f32(accuracy), "exact_accuracy": f32(exact),
        "q_halt_accuracy": f32((q_halt >= 0) == exact), "steps": f32(carry.steps),
        "lm_loss": lm_loss, "q_halt_loss": binary_cross_entropy_with_logits(q_halt, exact),
        "early_accuracy": f32(early_accuracy), "early_exact_accuracy": f32(early_exact),
        "early_steps": f32(jnp.where(early["found"], early["steps"], config.halt_max_steps)),
        "copy_accuracy": f32(copy_accuracy), "copy_exact_accuracy": f32(copy_exact),
        "predictions": pred, "early_predictions": early_pred, "q_halt_logits": q_halt,
        "q_continue_logits": outputs["q_continue_logits"], "has_labels": counts > 0,
    }


# The one jitted rollout: evaluation here and export/solvers.py's jax backend both call it.
rollout_jit = jax.jit(rollout, static_argnames=("config", "loss_type"))


def check_model_fits_data(config, split: PuzzleSplit) -> None:
    """Raises EvaluationError when the model's sizes disagree with the dataset's metadata."""
    meta = split.metadata
    bad = [f"{name}: model {getattr(config, name)} vs data {getattr(meta, name)}"
           for name in ("seq_len", "vocab_size", "num_puzzle_identifiers")
           if getattr(config, name) != getattr(meta, name)]
    if bad:
        raise EvaluationError(f"model config does not fit the dataset at {split.path} ({'; '.join(bad)}); "
                              "build the model config from the dataset's metadata")


_PREDICTION_KEYS = ("inputs", "labels", "puzzle_identifiers", "predictions", "early_predictions",
                    "early_steps", "q_halt_logits", "q_continue_logits")


@functools.cache
def _parallel_rollout(mesh, config: HRMConfig, loss_type: str):
    """rollout over the devices of `mesh`: params replicated, the batch split (rows are independent)."""
    def local(params, batch):
        return rollout(params, config, batch, loss_type)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), parallel.batch_spec()),
                                 out_specs=parallel.batch_spec(), check_vma=False))


def _rollout_fn(config: HRMConfig, loss_type: str, mesh, batch_size: int):
    """(params, batch) -> per-row results on the device. With a mesh the batch is this process's rows of
    the global batch (parallel.process_rows) and the results span the whole global batch."""
    if mesh is None:
        return lambda params, batch: rollout_jit(params, config, batch, loss_type=loss_type)
    run = _parallel_rollout(mesh, config, loss_type)
    return lambda params, batch: run(params, parallel.put_batch(batch, mesh, batch_size))


def _rows(params: Params, config: HRMConfig, split: PuzzleSplit, batch_size: int, loss_type: str,
          max_batches: int | None, keep_predictions: bool, mesh=None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(set_name, per-row numpy results of the real rows) per batch; padding rows dropped here.
    Without keep_predictions the [B, seq_len] arrays are never fetched (a large test set's
    predictions take hundreds of MB). In a multi-process run every process fetches the rows of all
    processes (parallel.fetch), so that all reduce the same rows to the same metrics."""
    run = _rollout_fn(config, loss_type, mesh, batch_size)
    mine = slice(None) if mesh is None else parallel.process_rows(batch_size, mesh)
    if mesh is not None:  # replicated over the mesh once, not per batch (host or one-device params)
        params = parallel.place(params, NamedSharding(mesh, PartitionSpec()))
    for index, item in enumerate(eval_batches(split, batch_size)):
        if max_batches is not None and index >= max_batches:
            return
        out = run(params, {k: v[mine] for k, v in item.batch.items()})
        wanted = {k: v for k, v in out.items() if keep_predictions or k in ROW_METRICS or k == "has_labels"}
        rows = {k: np.asarray(v)[item.valid] for k, v in parallel.fetch(wanted).items()}
        if keep_predictions:
            for key in ("inputs", "labels", "puzzle_identifiers"):
                rows[key] = item.batch[key][item.valid]
        yield item.set_name, rows


def _mean_metrics(rows: dict[str, np.ndarray], select: np.ndarray, early_halt_stats: bool) -> dict[str, float]:
    """Means over rows in `select` that have labels (the reference's `count`)."""
    counted = select & rows["has_labels"]
    count = int(counted.sum())
    names = [n for n in ROW_METRICS if early_halt_stats or n not in _EARLY_METRICS]
    metrics = {n: float(rows[n][counted].mean()) if count else float("nan") for n in names}
    metrics["count"] = float(count)
    return metrics


def evaluate(params: Params, model_config: HRMConfig, split: PuzzleSplit, batch_size: int, *,
             early_halt_stats: bool = True, group_by: np.ndarray | None = None,
             return_predictions: bool = False, max_batches: int | None = None,
             loss_type: str = "stablemax_cross_entropy", mesh=None):
    """Evaluates every example of `split` (exactly halt_max_steps segments each).

    Returns {"all": metrics, "set/<name>": metrics (only with several sets),
    "group/<label>": metrics (with group_by)}, each a dict of floats: the ROW_METRICS means and
    "count". Padding rows of the last batch are excluded (the reference instead adds their
    q_halt_loss to the sum; they carry no labels, so nothing else differs).

    group_by: one label per example, in eval order (sets in metadata order, examples in file order),
      e.g. `difficulty_bands(split)`; metrics are reported per distinct label.
    return_predictions: also return per-example numpy arrays (inputs, labels, puzzle_identifiers,
      predictions, early_predictions, early_steps, q_halt_logits, q_continue_logits, set_name), as
      `(metrics, predictions)`.
    max_batches: stop after this many batches (a quick look at a large test set).
    mesh: split each batch over these devices (hrm_jax.parallel.data_mesh; batch_size must divide). In a
      multi-process run every process calls evaluate with the same arguments, feeds its rows of each
      batch, and gets the metrics of the whole split.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_model_fits_data(model_config, split)
    if group_by is not None:
        group_by = np.asarray(group_by)
        total = sum(s.num_examples for s in split.sets.values())
        if group_by.shape != (total,):
            raise EvaluationError(f"group_by must hold one label per example of {split.path} "
                                  f"(shape ({total},)), got shape {group_by.shape}")
    if mesh is not None:
        try:
            parallel.check_divisible(batch_size, mesh, "batch_size")
        except parallel.ParallelError as err:
            raise EvaluationError(str(err)) from None
    set_names, chunks = [], []
    for set_name, rows in _rows(params, model_config, split, batch_size, loss_type, max_batches,
                                return_predictions, mesh):
        set_names.extend([set_name] * len(rows["accuracy"]))
        chunks.append(rows)
    if not chunks:
        raise EvaluationError(f"{split.path}: no examples to evaluate")
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    rows["set_name"] = np.asarray(set_names)

    everything = np.ones(len(set_names), bool)
    metrics = {"all": _mean_metrics(rows, everything, early_halt_stats)}
    if len(split.metadata.sets) > 1:
        for name in split.metadata.sets:
            metrics[f"set/{name}"] = _mean_metrics(rows, rows["set_name"] == name, early_halt_stats)
    if group_by is not None:
        if max_batches is not None:
            group_by = _seen_labels(group_by, split, rows["set_name"])
        metrics.update({f"group/{label}": _mean_metrics(rows, group_by == label, early_halt_stats)
                        for label in np.unique(group_by)})
    logger.info("eval on %s: exact %.4f, token %.4f over %d examples", split.path,
                metrics["all"]["exact_accuracy"], metrics["all"]["accuracy"], int(metrics["all"]["count"]))
    if return_predictions:
        return metrics, {k: rows[k] for k in _PREDICTION_KEYS + ("set_name",)}
    return metrics


def _seen_labels(group_by: np.ndarray, split: PuzzleSplit, set_names: np.ndarray) -> np.ndarray:
    """The labels of the examples a truncated (max_batches) evaluation reached: a prefix per set."""
    parts, offset = [], 0
    for name in split.metadata.sets:
        seen = int((set_names == name).sum())
        parts.append(group_by[offset:offset + seen])
        offset += split.sets[name].num_examples
    return np.concatenate(parts)


def difficulty_bands(split: PuzzleSplit, key: str = "difficulty", num_bands: int = 4) -> np.ndarray | None:
    """Per-example band labels from a per-example (or per-puzzle) extra array, by quantiles.

    Returns None when some set lacks `<set>__<key>.npy`. Labels read "b<i>:[lo,hi]" (i from 1,
    bounds of the band's values) so that they sort and say what they hold. Ties can merge bands.
    """
    values = []
    for name in split.metadata.sets:
        pset = split.sets[name]
        if key not in pset.extra:
            return None
        arr = np.asarray(pset.extra[key], dtype=np.float64).reshape(-1)
        if arr.shape[0] == pset.num_puzzles != pset.num_examples:
            arr = np.repeat(arr, np.diff(np.asarray(pset.puzzle_indices)))
        if arr.shape[0] != pset.num_examples:
            raise EvaluationError(f"{split.path}/{name}__{key}.npy has {arr.shape[0]} values; expected one per "
                                  f"example ({pset.num_examples}) or per puzzle ({pset.num_puzzles})")
        values.append(arr)
    values = np.concatenate(values)
    edges = np.quantile(values, np.linspace(0, 1, num_bands + 1)[1:-1])
    band = np.searchsorted(edges, values, side="right")
    labels = np.empty(values.shape, dtype=object)
    for b in np.unique(band):
        members = values[band == b]
        labels[band == b] = f"b{b + 1}:[{members.min():.4g},{members.max():.4g}]"
    return labels.astype(str)
