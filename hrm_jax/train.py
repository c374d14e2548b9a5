"""Training: the state, one pure jitted train step, and the loop (logs, evaluation, checkpoints).

The step follows the reference's pretrain.py `train_batch`: the ACT carry persists across batches
(halted rows take the new batch's row, the others keep their example), one
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
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from tqdm.auto import tqdm

from hrm_jax import checkpoint as ckpt
from hrm_jax import distributed, parallel, run_dir
from hrm_jax.config import HRMConfig, LoopConfig, OptimConfig, RunConfig
from hrm_jax.data.format import PuzzleSplit, load_split
from hrm_jax.data.sampler import TrainSampler
from hrm_jax.ema import eval_params, init_ema, update_ema
from hrm_jax.evaluate import check_model_fits_data, difficulty_bands, evaluate
from hrm_jax.family import family_of
from hrm_jax.logging_utils import MetricsLogger, truncate_metrics
from hrm_jax.losses import act_loss, reduce_metrics
from hrm_jax.model import ACTCarry
from hrm_jax.optim import lr_schedule, make_dense_optimizer, make_puzzle_emb_schedule, sparse_signsgd_update
from hrm_jax.preemption import StopSignals
from hrm_jax.types import Batch, Metrics, Params

logger = logging.getLogger(__name__)


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
    ema: Params | None = None  # average of params["dense"] when optim.ema (hrm_jax.ema), else None

    def eval_params(self) -> Params:
        """The parameters evaluation, best/ and exports use: the averaged dense ones when there is an average."""
        return eval_params(self.params, self.ema)


def _empty_batch(config: HRMConfig, batch_size: int) -> Batch:
    zeros = jnp.zeros((batch_size, config.seq_len), jnp.int32)
    return {"inputs": zeros, "labels": zeros, "puzzle_identifiers": jnp.zeros((batch_size,), jnp.int32)}


def _fresh_state(model_config: HRMConfig, train_config: OptimConfig, total_steps: int) -> TrainState:
    family = family_of(model_config)
    k_params, k_train = jax.random.split(jax.random.key(train_config.seed))
    params = family.init_params(model_config, k_params)
    optimizer = make_dense_optimizer(train_config, total_steps)
    carry = family.initial_carry(model_config, _empty_batch(model_config, train_config.global_batch_size))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params["dense"]),
                      carry=carry, rng=jax.random.key_data(k_train),
                      ema=init_ema(params["dense"]) if train_config.ema else None)


# Jitted: run eagerly, Flax's init dispatches (and compiles) hundreds of small ops.
_fresh_state_jit = jax.jit(_fresh_state, static_argnums=(0, 1, 2))


def on_default_device(tree: Any) -> Any:
    """Commits every array to this process's first device. Restored checkpoints come back committed; a
    fresh state must match, or train_step's jit cache misses and it compiles a second time."""
    return jax.device_put(tree, jax.local_devices()[0])


def init_train_state(model_config: HRMConfig, train_config: OptimConfig, total_steps: int) -> TrainState:
    """Fresh parameters, optimizer state and an all-halted carry, from train_config.seed."""
    return on_default_device(_fresh_state_jit(model_config, train_config, total_steps))


def abstract_train_state(model_config: HRMConfig, train_config: OptimConfig, total_steps: int) -> TrainState:
    """Shapes and dtypes of init_train_state without computing it (the target of a restore)."""
    return jax.eval_shape(lambda: _fresh_state(model_config, train_config, total_steps))


def _train_step(state: TrainState, batch: Batch, model_config: HRMConfig, train_config: OptimConfig,
                total_steps: int, axis_name: str | None = None) -> tuple[TrainState, Metrics]:
    """The step; with axis_name (inside shard_map) on this device's rows, summing over the mesh."""
    family = family_of(model_config)
    rng, k_segment = jax.random.split(jax.random.wrap_key_data(state.rng))
    params = state.params
    carry = family.refresh_carry(params, model_config, state.carry, batch)
    # The embedding looks up the carry's examples, not the batch's (non-halted rows keep theirs).
    ids = carry.current_data["puzzle_identifiers"]
    rows = family.gather_puzzle_rows(params, model_config, ids)

    def loss_fn(dense: Params, rows: jax.Array):
        segment_params = {"dense": dense, "buffers": params["buffers"]}
        new_carry, outputs = family.act_segment(segment_params, model_config, carry, rows, k_segment, train=True,
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

    metrics = reduce_metrics(sums, train_config.global_batch_size)
    metrics["lr"] = jnp.asarray(lr_schedule(train_config.lr, train_config.lr_warmup_steps, total_steps,
                                            train_config.lr_min_ratio)(state.step), jnp.float32)
    # After every optimizer step, as the reference's loop updates its EMAHelper.
    ema = None if state.ema is None else update_ema(state.ema, new_params["dense"], train_config.ema_rate)
    new_state = TrainState(step=state.step + 1, params=new_params, opt_state=opt_state, carry=new_carry,
                           rng=jax.random.key_data(rng), ema=ema)
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("model_config", "train_config", "total_steps"),
                   donate_argnames=("state",))
def train_step(state: TrainState, batch: Batch, *, model_config: HRMConfig, train_config: OptimConfig,
               total_steps: int) -> tuple[TrainState, Metrics]:
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


def state_shardings(state: TrainState, mesh) -> TrainState:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def put_state(state: TrainState, mesh) -> TrainState:
    """Places a state on the mesh (replicas and carry shards). In a multi-process run every process
    passes the same values (a fresh state from the same seed) and keeps the shards its devices hold."""
    return parallel.place(state, state_shardings(state, mesh))


def restore_target(abstract: TrainState, mesh) -> TrainState:
    """abstract_train_state with the shardings a restored state takes: this run's mesh (whatever mesh wrote
    the checkpoint), or without one this process's first device."""
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), abstract)
    else:
        shardings = state_shardings(abstract, mesh)
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract, shardings)


@functools.cache
def parallel_train_step(mesh, model_config: HRMConfig, train_config: OptimConfig, total_steps: int):
    """train_step over the devices of `mesh`: (state placed by put_state, batch split by
    parallel.put_batch) -> (state, metrics), the state donated. Same results as train_step up to
    the order of the gradient sums."""
    parallel.check_divisible(train_config.global_batch_size, mesh, "global_batch_size")
    specs = state_specs(abstract_train_state(model_config, train_config, total_steps))
    local = functools.partial(_train_step, model_config=model_config, train_config=train_config,
                              total_steps=total_steps, axis_name=parallel.BATCH_AXIS)
    # check_vma=False: the replicated outputs are replicated by construction (psum / all_gather inputs).
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(specs, parallel.batch_spec()),
                            out_specs=(specs, PartitionSpec()), check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


def step_function(model_config: HRMConfig, train_config: OptimConfig, total_steps: int, mesh=None):
    """(state, batch) -> (state, metrics): train_step, or with a mesh parallel_train_step with the
    batch split onto the mesh (the state must be placed by put_state; the batch holds this process's
    rows, parallel.process_rows)."""
    if mesh is None:
        return functools.partial(train_step, model_config=model_config, train_config=train_config,
                                 total_steps=total_steps)
    step = parallel_train_step(mesh, model_config, train_config, total_steps)
    return lambda state, batch: step(state, parallel.put_batch(batch, mesh, train_config.global_batch_size))


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


def _load_eval_split(data_dir: str, split: str | None, config) -> PuzzleSplit | None:
    if split is None or not os.path.isdir(os.path.join(data_dir, split)):
        logger.warning("no '%s' split under %s: training without evaluation", split, data_dir)
        return None
    loaded = load_split(data_dir, split)
    check_model_fits_data(config, loaded)
    return loaded


def _eval_every(loop: LoopConfig, optim: OptimConfig, meta) -> int | None:
    """Explicit steps, or the reference's eval_interval (epochs) converted to steps."""
    if loop.eval_every is not None:
        return loop.eval_every
    if optim.eval_interval is None:
        return None
    steps_per_epoch = meta.total_groups * meta.mean_puzzle_examples / optim.global_batch_size
    return max(1, int(optim.eval_interval * steps_per_epoch))


# `stopped_by` on the processes of a multi-process run that did not receive the stop signal themselves.
PEER_STOP = "a signal to another process"


class _Run:
    """Host-side bookkeeping of one call to `train`: logger, checkpoints, evaluation, best score.

    In a multi-process run every process holds one: they make the same decisions and the same
    collective calls in the same order; only process 0 writes logs, plots and run-folder changes."""

    def __init__(self, config: RunConfig, total_steps: int, eval_data: PuzzleSplit | None, mesh) -> None:
        self.config, self.total_steps = config, total_steps
        self.model_config, self.train_config = config.model, config.optim
        self.mesh = mesh  # None: one device
        self.out_dir = config.loop.out_dir
        self.checkpoints: ckpt.RunCheckpoints | None = None  # opened by `start`, after a restart moved the old run
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        self.eval_data = eval_data
        self.eval_batch_size = config.loop.eval_batch_size or config.optim.global_batch_size
        # Per-difficulty-band results when the split has a difficulty array (e.g. Sudoku ratings).
        self.group_by = difficulty_bands(eval_data) if eval_data is not None else None
        self.best_exact = -math.inf
        self.last_eval: dict[str, float] | None = None
        self.log: MetricsLogger | None = None
        self.restored_window: list[dict[str, float]] = []  # a log window the checkpoint was taken inside
        self.last_save = time.monotonic()

    def start(self, sampler: TrainSampler) -> TrainState:
        """Fresh state, or the latest intact checkpoint's state (sampler, log window and metrics.jsonl
        rewound to it). Refuses to start over a previous run's files unless loop.restart moves them aside."""
        loop = self.config.loop
        previous = run_dir.describe(self.out_dir)
        if loop.restart and previous:
            distributed.barrier("hrm_jax restart")  # every process has looked before process 0 moves it
            if distributed.is_primary():
                run_dir.move_aside(self.out_dir)
            distributed.barrier("hrm_jax restarted")
            previous = []
        self.checkpoints = ckpt.RunCheckpoints(self.out_dir, max_to_keep=loop.keep_checkpoints)
        latest = self.checkpoints.latest_step()
        if latest is None and previous:
            holds = ", ".join(run_dir.describe(self.out_dir))
            raise TrainingError(
                f"{self.out_dir}: {'no resumable checkpoint' if loop.resume else 'holds a previous run'} ({holds}); "
                f"train into a new out_dir (--out), or pass restart=True (--restart) to move this one aside to "
                f"{self.out_dir.rstrip(os.sep)}.old-<time>")
        if latest is not None and not loop.resume:
            raise TrainingError(f"{self.out_dir} already holds checkpoints (latest step {latest}); pass "
                                "resume=True (--resume) to continue that run, restart=True (--restart) to move it "
                                "aside, or choose a new out_dir")
        if latest is None:
            self.log = self._open_log()
            if loop.resume:
                logger.info("resume: %s is empty, starting a new run", self.out_dir)
            return init_train_state(self.model_config, self.train_config, self.total_steps)
        abstract = abstract_train_state(self.model_config, self.train_config, self.total_steps)
        state, meta = ckpt.restore(os.path.join(self.out_dir, ckpt.PERIODIC_DIR), restore_target(abstract, self.mesh),
                                   run_config=self.config, total_steps=self.total_steps, step=latest)
        sampler.restore(meta["sampler"])
        best = meta.get("best_exact_accuracy")
        self.best_exact = -math.inf if best is None else float(best)
        self.restored_window = list(meta.get("log_window") or [])
        dropped = truncate_metrics(self.metrics_path, int(meta["step"])) if distributed.is_primary() else 0
        logger.info("resumed at step %d (%d later log records dropped)", meta["step"], dropped)
        self.log = self._open_log()
        return state

    def _open_log(self) -> MetricsLogger:
        return MetricsLogger(self.out_dir, tensorboard=self.config.loop.tensorboard, active=distributed.is_primary())

    def meta(self, step: int, sampler: TrainSampler, window: list | None = None) -> dict[str, Any]:
        """Checkpoint metadata; `window`: the per-step metrics of the log window not yet written, so
        that a run resumed inside a window logs the same means as one never stopped."""
        best = None if self.best_exact == -math.inf else self.best_exact
        log_window = [{k: float(v) for k, v in record.items()} for record in jax.device_get(window or [])]
        return ckpt.make_meta(self.config, self.total_steps, step, sampler.state(),
                              best_exact_accuracy=best, eval_metrics=self.last_eval, log_window=log_window)

    def save(self, state: TrainState, step: int, sampler: TrainSampler, window: list) -> None:
        self.checkpoints.save(state, self.meta(step, sampler, window))
        self.last_save = time.monotonic()

    def save_due(self, step: int, evaluated: bool, timed: bool) -> bool:
        """A periodic checkpoint: at every evaluation, every checkpoint_every steps, or when `timed` (decide)."""
        loop = self.config.loop
        return evaluated or timed or (loop.checkpoint_every is not None and step % loop.checkpoint_every == 0)

    def decide(self, window_closed: bool, requested: str | None, early: bool) -> tuple[str | None, bool, bool]:
        """(stop signal, timed checkpoint due, early stop) after a step, the same on every process.

        One process acts on a stop signal at the next step and on the clock (checkpoint_minutes after the
        last save) at once. Several processes agree at the end of each log window (steps every process
        knows, and where the host waits for the device anyway): a signal any process received, a clock any
        process saw run out, or an early stop any process measured, is acted on by all at that step.
        """
        loop = self.config.loop
        timed = bool(loop.checkpoint_minutes) and time.monotonic() - self.last_save >= 60 * loop.checkpoint_minutes
        if not distributed.multi_process():
            return requested, timed, early
        if not window_closed:
            return None, False, False
        stop, timed, early = distributed.agree_any([requested is not None, timed, early])
        return (requested or PEER_STOP) if stop else None, timed, early

    def evaluate(self, state: TrainState, step: int, sampler: TrainSampler) -> dict[str, float] | None:
        """Evaluates, logs every group of results, redraws the plot, saves the best checkpoint."""
        if self.eval_data is None:
            return None
        results = evaluate(state.eval_params(), self.model_config, self.eval_data, self.eval_batch_size,
                           group_by=self.group_by, max_batches=self.config.loop.eval_max_batches, mesh=self.mesh)
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


def train(config: RunConfig, data_dir: str | os.PathLike) -> dict[str, Any]:
    """Trains `config.model` on `<data_dir>/train` as `config.optim` says, driven by `config.loop`
    (see LoopConfig for each setting); evaluates on `<data_dir>/<loop.eval_split>` and writes
    metrics, plots and checkpoints into `loop.out_dir`.

    The data folder is an argument, not a setting, because a run may resume from the same data at
    another path. Periodic checkpoints are written at every evaluation, every loop.checkpoint_every
    steps, at least every loop.checkpoint_minutes, at the last step, and when SIGTERM or SIGINT
    stops the run (the step in flight completes and is saved; "stopped_by" names the signal).

    Multi-process (after hrm_jax.distributed.initialize, every process calling train with the same
    arguments): one mesh over loop.devices devices of every process, each process feeding its rows of
    every global batch; only process 0 writes metrics.jsonl, the plot and the progress bar, and orbax
    writes each checkpoint once. Stop signals, timed checkpoints and early stops take effect at the end
    of a log window (every loop.log_every steps), the same step on every process; "stopped_by" is
    PEER_STOP on processes that did not receive the signal themselves.
    Returns {"step", "total_steps", "stopped_early", "stopped_by" (None, "SIGTERM", "SIGINT" or PEER_STOP), "train"
    (last logged train metrics), "eval" (last eval metrics of the whole split), "best_exact_accuracy", "state" (the
    final TrainState), "config" (the RunConfig as run, out_dir a string), "paths"}.
    """
    loop = config.loop
    if loop.out_dir is None:
        raise TrainingError("loop.out_dir is None: name the run folder to write into (--out DIR)")
    config = config.replace(loop=loop.replace(out_dir=os.fspath(loop.out_dir)))
    data_dir = os.fspath(data_dir)
    train_split = load_split(data_dir, "train")
    check_model_fits_data(config.model, train_split)
    meta = train_split.metadata
    optim = config.optim
    total_steps = loop.total_steps or optim.total_steps(meta.total_groups, meta.mean_puzzle_examples)
    if total_steps < 1:
        raise TrainingError(f"total_steps is {total_steps}: the data gives less than one batch; raise epochs "
                            "or lower global_batch_size")
    mesh = _mesh(loop.devices, optim, loop.eval_batch_size)
    if distributed.multi_process():
        _check_same_run(config, train_split)
    # The reference's loader draws eval_interval epochs per iteration before dropping a short batch.
    # Each process collates only its rows of every global batch.
    sampler = TrainSampler(train_split, optim.global_batch_size, optim.seed,
                           epochs_per_iter=optim.eval_interval or optim.epochs,
                           rows=slice(None) if mesh is None else parallel.process_rows(optim.global_batch_size, mesh))
    run = _Run(config, total_steps, _load_eval_split(data_dir, loop.eval_split, config.model), mesh)
    try:
        return _loop(run, sampler, _eval_every(loop, optim, meta))
    finally:
        run.close()


def _mesh(num_devices: int | None, optim: OptimConfig, eval_batch_size: int | None):
    """None for one device (the plain jitted step), else the data-parallel mesh (every process's
    `num_devices` first local devices), checked against the batches."""
    if num_devices == 1 and not distributed.multi_process():
        if len(jax.local_devices()) > 1:
            logger.info("%d devices visible, training on one; devices (--devices) splits batches over them",
                        len(jax.local_devices()))
        return None
    try:
        mesh = parallel.data_mesh(num_devices)
        parallel.check_divisible(optim.global_batch_size, mesh, "global_batch_size")
        parallel.check_divisible(eval_batch_size or optim.global_batch_size, mesh, "eval batch size")
    except parallel.ParallelError as err:
        raise TrainingError(str(err)) from None
    logger.info("data parallel over %s", parallel.describe(mesh))
    return mesh


# What must be the same on every process: everything but where the files go and process 0's own output.
_PER_PROCESS_LOOP_FIELDS = ("out_dir", "progress", "tensorboard")


def _check_same_run(config: RunConfig, train_split: PuzzleSplit) -> None:
    """Refuses (on every process) a multi-process run whose processes were given different settings or data."""
    meta = train_split.metadata
    differing = distributed.first_differing({
        "model": config.model.to_dict(), "optim": config.optim.to_dict(),
        "loop": {k: v for k, v in config.loop.to_dict().items() if k not in _PER_PROCESS_LOOP_FIELDS},
        "data": [repr(meta), [int(train_split.sets[name].num_examples) for name in meta.sets]]})
    if differing is not None:
        raise TrainingError(f"process {differing} was started with other settings or data than process 0 (model, "
                            "optimizer, loop flags or the training split differ): start every process with the same "
                            "command, only --process-id differing")


def _loop(run: _Run, sampler: TrainSampler, eval_every: int | None) -> dict[str, Any]:
    loop = run.config.loop
    stop_at = min(run.total_steps, loop.max_steps) if loop.max_steps is not None else run.total_steps
    state = run.start(sampler)
    if run.mesh is not None:
        state = put_state(state, run.mesh)
    step = int(jax.device_get(state.step))
    step_fn = step_function(run.model_config, run.train_config, run.total_steps, run.mesh)
    bar = tqdm(total=run.total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (loop.progress and distributed.is_primary()))
    window, train_metrics, eval_metrics, stopped_early, stop = run.restored_window, None, None, False, None
    start = tick = time.perf_counter()
    run.last_save = time.monotonic()
    with StopSignals() as signals:
        while step < stop_at and not stopped_early and stop is None:
            state, metrics = step_fn(state, sampler.next_batch())
            step += 1
            window.append(metrics)
            last = step == stop_at
            closed = step % loop.log_every == 0 or last
            if closed:
                train_metrics = _window_mean(jax.device_get(window))
                now = time.perf_counter()
                # Training throughput of the window (evaluation and checkpoint time excluded: `tick` restarts
                # after them; the first window includes compilation), and wall time since the loop began.
                train_metrics["steps_per_s"] = len(window) / (now - tick)
                train_metrics["elapsed_s"] = now - start
                run.log.log(step, "train", train_metrics)
                bar.set_postfix(loss=f"{train_metrics['lm_loss']:.4f}", acc=f"{train_metrics['accuracy']:.3f}",
                                exact=f"{train_metrics['exact_accuracy']:.3f}",
                                steps_s=f"{train_metrics['steps_per_s']:.2f}")
                bar.update(len(window))
                window = []
                stopped_early = _reached(loop.early_stop_exact, train_metrics, step)
            stop, timed, stopped_early = run.decide(closed, signals.requested, stopped_early)
            evaluated = last or stopped_early or (eval_every is not None and step % eval_every == 0)
            if evaluated:
                eval_metrics = run.evaluate(state, step, sampler) or eval_metrics
            if evaluated or stop is not None or run.save_due(step, evaluated, timed):
                run.save(state, step, sampler, window)
            if not window:  # a window just closed: time the next one from after any evaluation/checkpoint
                tick = time.perf_counter()
    bar.close()
    if stop is not None:
        logger.warning("stopped by %s at step %d; continue with resume=True (--resume)", stop, step)
    if run.log is not None and os.path.exists(run.metrics_path):
        run.log.plot()
    return {**_summary(run, state, step, stopped_early, train_metrics, eval_metrics), "stopped_by": stop}


def _reached(early_stop_exact: float | None, train_metrics: dict[str, float], step: int) -> bool:
    """Early stop: the reference README advises stopping near 100% on Sudoku-Extreme (late training turns unstable)."""
    # `not >=`: a window without halted rows has a NaN exact accuracy, which must not stop the run.
    if early_stop_exact is None or not train_metrics["exact_accuracy"] >= early_stop_exact:
        return False
    logger.info("early stop at step %d: train exact accuracy %.4f >= %.4f", step, train_metrics["exact_accuracy"],
                early_stop_exact)
    return True


def _summary(run: _Run, state: TrainState, step: int, stopped_early: bool, train_metrics, eval_metrics):
    best = None if run.best_exact == -math.inf else run.best_exact
    return {"step": step, "total_steps": run.total_steps, "stopped_early": stopped_early,
            "train": train_metrics, "eval": eval_metrics, "best_exact_accuracy": best,
            "state": state, "config": run.config,
            "paths": {"out_dir": run.out_dir, "metrics": run.metrics_path, "plot": run.log.plot_path,
                      "checkpoints": os.path.join(run.out_dir, ckpt.PERIODIC_DIR),
                      "best": os.path.join(run.out_dir, ckpt.BEST_DIR)}}
