"""Training: the state, one pure jitted train step, and the loop (logs, evaluation, checkpoints).

The step follows the reference's pretrain.py `train_batch`: the ACT carry persists across batches
(halted rows take the new batch's row, the others keep their example: REFERENCE-FACTS item 4), one
ACT segment runs per batch, the backward pass uses the summed loss divided by the global batch
size, AdamATan2 updates the dense parameters and sign-SGD the puzzle-embedding rows of the batch,
both on the same schedule shape with their own base learning rates.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from hrm_jax import checkpoint as ckpt
from hrm_jax import parallel, run_dir
from hrm_jax.config import HRMConfig, TrainConfig
from hrm_jax.data.format import PuzzleSplit, load_split
from hrm_jax.data.sampler import TrainSampler
from hrm_jax.evaluate import check_model_fits_data, difficulty_bands, evaluate
from hrm_jax.logging_utils import MetricsLogger, truncate_metrics
from hrm_jax.losses import act_loss
from hrm_jax.model import ACTCarry, act_segment, gather_puzzle_rows, init_params, initial_carry, refresh_carry
from hrm_jax.optim import lr_schedule, make_dense_optimizer, make_puzzle_emb_schedule, sparse_signsgd_update
from hrm_jax.preemption import StopSignals

logger = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = dict[str, jax.Array]


# Wall-clock fields of the logged train metrics: they differ between otherwise identical runs.
TIMING_METRICS = ("steps_per_s", "elapsed_s")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue (the sampler's position aside, which is host-side JSON)."""

    step: jax.Array  # int32[]: optimizer steps taken (the optax count; the reference's step - 1)
    params: Params  # {"dense", "buffers", "puzzle_emb"?} as model.init_params
    opt_state: optax.OptState  # AdamATan2 state of params["dense"] only
    carry: ACTCarry  # the ACT carry, [global_batch_size, ...]
    rng: jax.Array  # uint32 raw key data (jax.random.key_data), so orbax stores a plain array


def _empty_batch(config: HRMConfig, batch_size: int) -> Batch:
    zeros = jnp.zeros((batch_size, config.seq_len), jnp.int32)
    return {"inputs": zeros, "labels": zeros, "puzzle_identifiers": jnp.zeros((batch_size,), jnp.int32)}


def _fresh_state(model_config: HRMConfig, train_config: TrainConfig, total_steps: int) -> TrainState:
    k_params, k_train = jax.random.split(jax.random.key(train_config.seed))
    params = init_params(model_config, k_params)
    optimizer = make_dense_optimizer(train_config, total_steps)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params["dense"]),
                      carry=initial_carry(model_config, _empty_batch(model_config, train_config.global_batch_size)),
                      rng=jax.random.key_data(k_train))


# Jitted: run eagerly, Flax's init dispatches (and compiles) hundreds of small ops.
_fresh_state_jit = jax.jit(_fresh_state, static_argnums=(0, 1, 2))


def on_default_device(tree: Any) -> Any:
    """Commits every array to the default device. Restored checkpoints come back committed; a fresh
    state must match, or train_step's jit cache misses and it compiles a second time."""
    return jax.device_put(tree, jax.devices()[0])


def init_train_state(model_config: HRMConfig, train_config: TrainConfig, total_steps: int) -> TrainState:
    """Fresh parameters, optimizer state and an all-halted carry, from train_config.seed."""
    return on_default_device(_fresh_state_jit(model_config, train_config, total_steps))


def abstract_train_state(model_config: HRMConfig, train_config: TrainConfig, total_steps: int) -> TrainState:
    """Shapes and dtypes of init_train_state without computing it (the target of a restore)."""
    return jax.eval_shape(lambda: _fresh_state(model_config, train_config, total_steps))


def _reduce_metrics(sums: dict[str, jax.Array], global_batch_size: int) -> dict[str, jax.Array]:
    """As the reference: losses per global batch row, the rest per counted (halted) row."""
    count = jnp.maximum(sums["count"], 1).astype(jnp.float32)
    out = {k: v.astype(jnp.float32) / (global_batch_size if k.endswith("loss") else count)
           for k, v in sums.items() if k != "count"}
    out["count"] = sums["count"].astype(jnp.float32)
    return out


def _train_step(state: TrainState, batch: Batch, model_config: HRMConfig, train_config: TrainConfig,
                total_steps: int, axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """The step; with axis_name (inside shard_map) on this device's rows, summing over the mesh."""
    rng, k_segment = jax.random.split(jax.random.wrap_key_data(state.rng))
    params = state.params
    carry = refresh_carry(params, model_config, state.carry, batch)
    # The embedding looks up the carry's examples, not the batch's (non-halted rows keep theirs).
    ids = carry.current_data["puzzle_identifiers"]
    rows = gather_puzzle_rows(params, model_config, ids)

    def loss_fn(dense: Params, rows: jax.Array):
        segment_params = {"dense": dense, "buffers": params["buffers"]}
        new_carry, outputs = act_segment(segment_params, model_config, carry, rows, k_segment, train=True,
                                         axis_name=axis_name)
        loss, sums = act_loss(outputs, new_carry)
        return loss / train_config.global_batch_size, (new_carry, sums)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (_, (new_carry, sums)), (dense_grads, row_grads) = grad_fn(params["dense"], rows)
    if axis_name is not None:
        # Every device then holds the global gradient and sums, and updates its replica identically;
        # the sign-SGD sees all rows of the global batch, in global order.
        dense_grads, sums = jax.lax.psum((dense_grads, sums), axis_name)
        ids, row_grads = jax.lax.all_gather((ids, row_grads), axis_name, tiled=True)

    optimizer = make_dense_optimizer(train_config, total_steps)
    updates, opt_state = optimizer.update(dense_grads, state.opt_state, params["dense"])
    new_params = {**params, "dense": optax.apply_updates(params["dense"], updates)}
    if model_config.puzzle_emb_ndim > 0:
        emb_lr = make_puzzle_emb_schedule(train_config, total_steps)(state.step)
        new_params["puzzle_emb"] = sparse_signsgd_update(params["puzzle_emb"], ids, row_grads, emb_lr,
                                                         train_config.puzzle_emb_weight_decay)

    metrics = _reduce_metrics(sums, train_config.global_batch_size)
    metrics["lr"] = jnp.asarray(lr_schedule(train_config.lr, train_config.lr_warmup_steps, total_steps,
                                            train_config.lr_min_ratio)(state.step), jnp.float32)
    new_state = TrainState(step=state.step + 1, params=new_params, opt_state=opt_state, carry=new_carry,
                           rng=jax.random.key_data(rng))
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("model_config", "train_config", "total_steps"),
                   donate_argnames=("state",))
def train_step(state: TrainState, batch: Batch, *, model_config: HRMConfig, train_config: TrainConfig,
               total_steps: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one global batch (int32 arrays: inputs/labels [B, seq_len], puzzle_identifiers [B]).

    `state` is donated. Metrics (f32 scalars): lm_loss, q_halt_loss, q_continue_loss (per global
    batch row); accuracy, exact_accuracy, q_halt_accuracy, steps (per halted row); count; lr.
    """
    return _train_step(state, batch, model_config, train_config, total_steps)


def state_specs(state: TrainState) -> TrainState:
    """PartitionSpecs of a TrainState (or of its abstract shapes) for data parallelism: the carry
    split along the batch, everything else replicated."""
    specs = jax.tree.map(lambda _: PartitionSpec(), state)
    return specs.replace(carry=jax.tree.map(lambda _: parallel.batch_spec(), state.carry))


def put_state(state: TrainState, mesh) -> TrainState:
    """Places a state on the mesh (replicas and carry shards)."""
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state),
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.device_put(state, shardings)


@functools.cache
def parallel_train_step(mesh, model_config: HRMConfig, train_config: TrainConfig, total_steps: int):
    """train_step over the devices of `mesh`: (state placed by put_state, batch split by
    parallel.put_batch) -> (state, metrics), the state donated. Same results as train_step up to
    the order of the gradient sums."""
    parallel.check_divisible(train_config.global_batch_size, mesh, "global_batch_size")
    specs = state_specs(abstract_train_state(model_config, train_config, total_steps))
    local = functools.partial(_train_step, model_config=model_config, train_config=train_config,
                              total_steps=total_steps, axis_name=parallel.BATCH_AXIS)
    # check_vma=False: the replicated outputs are replicated by construction (psum / all_gather inputs).
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(specs, parallel.batch_spec()), out_specs=(specs, PartitionSpec()),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


def step_function(model_config: HRMConfig, train_config: TrainConfig, total_steps: int, mesh=None):
    """(state, batch) -> (state, metrics): train_step, or with a mesh parallel_train_step with the
    batch split onto the mesh (the state must be placed by put_state)."""
    if mesh is None:
        return functools.partial(train_step, model_config=model_config, train_config=train_config,
                                 total_steps=total_steps)
    step = parallel_train_step(mesh, model_config, train_config, total_steps)
    return lambda state, batch: step(state, parallel.put_batch(batch, mesh))


# The loop --------------------------------------------------------------------------------------
class TrainingError(ValueError):
    """Bad arguments to `train` or an out_dir that does not fit the requested run."""


def _window_mean(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of per-step metrics: losses per step, row metrics weighted by their counts, lr last."""
    counts = np.array([float(r["count"]) for r in records])
    out = {}
    for name in records[-1]:
        values = np.array([float(r[name]) for r in records])
        if name.endswith("loss"):
            out[name] = float(values.mean())
        elif name == "lr":
            out[name] = float(values[-1])
        elif name == "count":
            out[name] = float(counts.sum())
        else:
            out[name] = float((values * counts).sum() / counts.sum()) if counts.sum() > 0 else float("nan")
    return out


def _load_eval_split(data_dir: str, split: str | None, config: HRMConfig) -> PuzzleSplit | None:
    if split is None or not os.path.isdir(os.path.join(data_dir, split)):
        logger.warning("no '%s' split under %s: training without evaluation", split, data_dir)
        return None
    loaded = load_split(data_dir, split)
    check_model_fits_data(config, loaded)
    return loaded


def _eval_every(eval_every: int | None, train_config: TrainConfig, meta) -> int | None:
    """Explicit steps, or the reference's eval_interval (epochs) converted to steps."""
    if eval_every is not None:
        if eval_every < 1:
            raise TrainingError(f"eval_every must be >= 1 or None, got {eval_every}")
        return eval_every
    if train_config.eval_interval is None:
        return None
    steps_per_epoch = meta.total_groups * meta.mean_puzzle_examples / train_config.global_batch_size
    return max(1, int(train_config.eval_interval * steps_per_epoch))


class _Run:
    """Host-side bookkeeping of one call to `train`: logger, checkpoints, evaluation, best score."""

    def __init__(self, model_config, train_config, total_steps, out_dir, eval_data, *, tensorboard,
                 keep_checkpoints, eval_batch_size, eval_max_batches, mesh):
        self.model_config, self.train_config, self.total_steps = model_config, train_config, total_steps
        self.mesh = mesh  # None: one device
        self.out_dir = out_dir
        self.keep_checkpoints = keep_checkpoints
        self.checkpoints: ckpt.RunCheckpoints | None = None  # opened by `start`
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.eval_data = eval_data
        self.eval_batch_size = eval_batch_size or train_config.global_batch_size
        self.eval_max_batches = eval_max_batches
        # Per-difficulty-band results when the split has a difficulty array (e.g. Sudoku ratings).
        self.group_by = difficulty_bands(eval_data) if eval_data is not None else None
        self.best_exact = -math.inf
        self.last_eval: dict[str, float] | None = None
        self._tensorboard = tensorboard
        self.log: MetricsLogger | None = None
        self.restored_window: list[dict[str, float]] = []  # a log window the checkpoint was taken inside

    def start(self, sampler: TrainSampler, resume: bool, restart: bool) -> TrainState:
        """Fresh state, or the latest intact checkpoint's state (sampler, log window and metrics.jsonl
        rewound to it). Refuses to start over a previous run's files unless `restart` moves them aside."""
        previous = run_dir.describe(self.out_dir)
        if restart and previous:
            run_dir.move_aside(self.out_dir)
            previous = []
        self.checkpoints = ckpt.RunCheckpoints(self.out_dir, max_to_keep=self.keep_checkpoints)
        latest = self.checkpoints.latest_step()
        if latest is None and previous:
            holds = ", ".join(run_dir.describe(self.out_dir))
            raise TrainingError(
                f"{self.out_dir}: {'no resumable checkpoint' if resume else 'holds a previous run'} ({holds}); "
                f"train into a new out_dir (--out), or pass restart=True (--restart) to move this one aside to "
                f"{self.out_dir.rstrip(os.sep)}.old-<time>")
        if latest is not None and not resume:
            raise TrainingError(f"{self.out_dir} already holds checkpoints (latest step {latest}); pass "
                                "resume=True (--resume) to continue that run, restart=True (--restart) to move it "
                                "aside, or choose a new out_dir")
        if latest is None:
            self.log = MetricsLogger(self.out_dir, tensorboard=self._tensorboard)
            if resume:
                logger.info("resume: %s is empty, starting a new run", self.out_dir)
            return init_train_state(self.model_config, self.train_config, self.total_steps)
        state, meta = ckpt.restore(
            os.path.join(self.out_dir, ckpt.PERIODIC_DIR),
            abstract_train_state(self.model_config, self.train_config, self.total_steps),
            model_config=self.model_config, train_config=self.train_config, total_steps=self.total_steps,
            step=latest)
        sampler.restore(meta["sampler"])
        best = meta.get("best_exact_accuracy")
        self.best_exact = -math.inf if best is None else float(best)
        self.restored_window = list(meta.get("log_window") or [])
        dropped = truncate_metrics(self.metrics_path, int(meta["step"]))
        logger.info("resumed at step %d (%d later log records dropped)", meta["step"], dropped)
        self.log = MetricsLogger(self.out_dir, tensorboard=self._tensorboard)
        return state

    def meta(self, step: int, sampler: TrainSampler, window: list | None = None) -> dict[str, Any]:
        """Checkpoint metadata; `window`: the per-step metrics of the log window not yet written, so
        that a run resumed inside a window logs the same means as one never stopped."""
        best = None if self.best_exact == -math.inf else self.best_exact
        log_window = [{k: float(v) for k, v in record.items()} for record in jax.device_get(window or [])]
        return ckpt.make_meta(self.model_config, self.train_config, self.total_steps, step, sampler.state(),
                              best_exact_accuracy=best, eval_metrics=self.last_eval, log_window=log_window)

    def save(self, state: TrainState, step: int, sampler: TrainSampler, window: list) -> None:
        self.checkpoints.save(state, self.meta(step, sampler, window))
        self.last_save = time.monotonic()

    def evaluate(self, state: TrainState, step: int, sampler: TrainSampler) -> dict[str, float] | None:
        """Evaluates, logs every group of results, redraws the plot, saves the best checkpoint."""
        if self.eval_data is None:
            return None
        results = evaluate(state.params, self.model_config, self.eval_data, self.eval_batch_size,
                           group_by=self.group_by, max_batches=self.eval_max_batches, mesh=self.mesh)
        for name, metrics in results.items():
            self.log.log(step, "eval" if name == "all" else f"eval/{name}", metrics)
        self.log.plot()
        self.last_eval = results["all"]
        exact = results["all"]["exact_accuracy"]
        if math.isfinite(exact) and exact > self.best_exact:
            self.best_exact = exact
            self.checkpoints.save(state, self.meta(step, sampler), best=True)
        return results["all"]

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.checkpoints is not None:
            self.checkpoints.close()


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)


def train(model_config: HRMConfig, train_config: TrainConfig, data_dir: str | os.PathLike,
          out_dir: str | os.PathLike, *, total_steps: int | None = None, max_steps: int | None = None,
          eval_every: int | None = None, eval_split: str | None = "test", eval_batch_size: int | None = None,
          eval_max_batches: int | None = None, checkpoint_every: int | None = None,
          checkpoint_minutes: float | None = 10.0, keep_checkpoints: int = 3, resume: bool = False,
          restart: bool = False, early_stop_exact: float | None = None, log_every: int = 10,
          progress: bool = True, tensorboard: bool = False, num_devices: int | None = 1) -> dict[str, Any]:
    """Trains on `<data_dir>/train`, evaluating on `<data_dir>/<eval_split>`; writes into out_dir.

    total_steps: schedule length (default: the reference's estimate from epochs and the data).
    max_steps: stop (resumably) after this step even if the schedule is longer.
    eval_every: steps between evaluations (default: train_config.eval_interval epochs in steps; the
      last step is always evaluated). Periodic checkpoints are written at every evaluation, every
      `checkpoint_every` steps if set, at least every `checkpoint_minutes` of wall time (None or 0:
      no time-based saves), at the last step, and when SIGTERM/SIGINT stops the run (the step in
      flight completes, the checkpoint is written, the summary's "stopped_by" names the signal).
    resume: continue from out_dir's latest intact checkpoint (a new run if out_dir is empty); an
      out_dir holding a previous run's files but no checkpoint is refused, as is one holding
      checkpoints without resume. restart: move such a previous run aside to `<out_dir>.old-<time>`
      first and start anew (nothing is deleted).
    early_stop_exact: stop once the training exact accuracy over a log window reaches this (the
      reference README advises stopping near 100% on Sudoku-Extreme: late training turns unstable).
    log_every: steps per metrics.jsonl train record (mean over the window; 1 logs every step).
    eval_split: the split to evaluate on (None or a missing split: no evaluation); eval_batch_size
      (default global_batch_size); eval_max_batches: evaluate only this many batches (large sets).
    keep_checkpoints: periodic checkpoints kept (the best one is kept apart in out_dir/best).
    progress: a tqdm bar (loss, token/exact accuracy, steps/s); tensorboard: also write
      TensorBoard scalars (needs `tensorboard` or `tensorboardX`).
    num_devices: local devices to split each batch over (data parallel, hrm_jax.parallel; None: all).
      The global batch and the evaluation batch must divide evenly. Checkpoints do not depend on it.
    Returns {"step", "total_steps", "stopped_early", "stopped_by" (None or "SIGTERM"/"SIGINT"), "train" (last
    logged train metrics), "eval" (last
    eval metrics of the whole split), "best_exact_accuracy", "state" (the final TrainState), "paths"}.
    """
    data_dir, out_dir = os.fspath(data_dir), os.fspath(out_dir)
    if log_every < 1:
        raise TrainingError(f"log_every must be >= 1, got {log_every}")
    if checkpoint_minutes is not None and checkpoint_minutes < 0:
        raise TrainingError(f"checkpoint_minutes must be >= 0 or None, got {checkpoint_minutes}")
    if resume and restart:
        raise TrainingError("resume and restart exclude each other: resume continues the run in out_dir, "
                            "restart moves it aside")
    train_split = load_split(data_dir, "train")
    check_model_fits_data(model_config, train_split)
    meta = train_split.metadata
    total_steps = total_steps or train_config.total_steps(meta.total_groups, meta.mean_puzzle_examples)
    if total_steps < 1:
        raise TrainingError(f"total_steps is {total_steps}: the data gives less than one batch; raise epochs "
                            "or lower global_batch_size")
    stop_at = min(total_steps, max_steps) if max_steps is not None else total_steps
    mesh = _mesh(num_devices, train_config, eval_batch_size)
    eval_every = _eval_every(eval_every, train_config, meta)
    # The reference's loader draws eval_interval epochs per iteration before dropping a short batch.
    sampler = TrainSampler(train_split, train_config.global_batch_size, train_config.seed,
                           epochs_per_iter=train_config.eval_interval or train_config.epochs)
    run = _Run(model_config, train_config, total_steps, out_dir, _load_eval_split(data_dir, eval_split, model_config),
               tensorboard=tensorboard, keep_checkpoints=keep_checkpoints, eval_batch_size=eval_batch_size,
               eval_max_batches=eval_max_batches, mesh=mesh)
    try:
        return _loop(run, sampler, (resume, restart), stop_at, eval_every, (checkpoint_every, checkpoint_minutes),
                     early_stop_exact, log_every, progress)
    finally:
        run.close()


def _mesh(num_devices: int | None, train_config: TrainConfig, eval_batch_size: int | None):
    """None for one device (the plain jitted step), else the data-parallel mesh, checked against the batches."""
    if num_devices == 1:
        if len(jax.local_devices()) > 1:
            logger.info("%d devices visible, training on one; num_devices (--devices) splits batches over them",
                        len(jax.local_devices()))
        return None
    try:
        mesh = parallel.data_mesh(num_devices)
        parallel.check_divisible(train_config.global_batch_size, mesh, "global_batch_size")
        parallel.check_divisible(eval_batch_size or train_config.global_batch_size, mesh, "eval batch size")
    except parallel.ParallelError as err:
        raise TrainingError(str(err)) from None
    logger.info("data parallel over %d devices", mesh.size)
    return mesh


def _loop(run: _Run, sampler: TrainSampler, start: tuple[bool, bool], stop_at: int, eval_every: int | None,
          cadence: tuple[int | None, float | None], early_stop_exact: float | None, log_every: int,
          progress: bool) -> dict[str, Any]:
    """start: (resume, restart); cadence: (checkpoint_every steps, checkpoint_minutes)."""
    checkpoint_every, checkpoint_minutes = cadence
    state = run.start(sampler, *start)
    if run.mesh is not None:
        state = put_state(state, run.mesh)
    step = int(jax.device_get(state.step))
    step_fn = step_function(run.model_config, run.train_config, run.total_steps, run.mesh)
    bar = _progress_bar(progress, run.total_steps, step)
    window, train_metrics, eval_metrics, stopped_early = run.restored_window, None, None, False
    begin = tick = time.perf_counter()
    run.last_save = time.monotonic()
    with StopSignals() as signals:
        while step < stop_at and not stopped_early and signals.requested is None:
            state, metrics = step_fn(state, sampler.next_batch())
            step += 1
            window.append(metrics)
            last = step == stop_at
            if step % log_every == 0 or last:
                train_metrics = _window_mean(jax.device_get(window))
                now = time.perf_counter()
                # Training throughput of the window (evaluation and checkpoint time excluded: `tick` restarts
                # after them; the first window includes compilation), and wall time since the loop began.
                train_metrics["steps_per_s"] = len(window) / (now - tick)
                train_metrics["elapsed_s"] = now - begin
                run.log.log(step, "train", train_metrics)
                bar.set_postfix(loss=f"{train_metrics['lm_loss']:.4f}", acc=f"{train_metrics['accuracy']:.3f}",
                                exact=f"{train_metrics['exact_accuracy']:.3f}",
                                steps_s=f"{train_metrics['steps_per_s']:.2f}")
                bar.update(len(window))
                window = []
                stopped_early = (early_stop_exact is not None and train_metrics["exact_accuracy"] >= early_stop_exact)
                if stopped_early:
                    logger.info("early stop at step %d: train exact accuracy %.4f >= %.4f", step,
                                train_metrics["exact_accuracy"], early_stop_exact)
            final = last or stopped_early or signals.requested is not None
            evaluated = eval_every is not None and step % eval_every == 0
            if last or stopped_early or evaluated:
                eval_metrics = run.evaluate(state, step, sampler) or eval_metrics
            timed = bool(checkpoint_minutes) and time.monotonic() - run.last_save >= 60 * checkpoint_minutes
            if final or evaluated or timed or (checkpoint_every is not None and step % checkpoint_every == 0):
                run.save(state, step, sampler, window)
            if not window:  # a window just closed: time the next one from after any evaluation/checkpoint
                tick = time.perf_counter()
    bar.close()
    if signals.requested is not None:
        logger.warning("stopped by %s at step %d; continue with resume=True (--resume)", signals.requested, step)
    if run.log is not None and os.path.exists(run.metrics_path):
        run.log.plot()
    best = None if run.best_exact == -math.inf else run.best_exact
    return {"step": step, "total_steps": run.total_steps, "stopped_early": stopped_early,
            "stopped_by": signals.requested, "train": train_metrics, "eval": eval_metrics,
            "best_exact_accuracy": best, "state": state,
            "paths": {"out_dir": run.out_dir, "metrics": run.metrics_path, "plot": run.log.plot_path,
                      "checkpoints": os.path.join(run.out_dir, ckpt.PERIODIC_DIR),
                      "best": os.path.join(run.out_dir, ckpt.BEST_DIR)}}
