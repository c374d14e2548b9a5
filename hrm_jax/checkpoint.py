"""Checkpoints with orbax: everything needed to continue a run bit-exactly, and the best model.

Layout of a run directory (`out_dir`)::

    checkpoints/<step>/params/       params: {"dense", "buffers", "puzzle_emb"?} (StandardSave)
    checkpoints/<step>/train_state/  {"step", "opt_state", "carry", "rng", "dense"?} (StandardSave)
    checkpoints/<step>/meta/         JSON: the run configuration, total_steps, sampler state, metrics
    best/<step>/...                  the same, for the best eval exact accuracy (one kept)
    checkpoints/<step>/hrm_manifest.json   size and SHA-256 of every file (hrm_jax.manifest)

Params are an item of their own so that `load_params_for_eval` restores them without building an
optimizer. With an EMA (OptimConfig.ema) that item holds the evaluation parameters (the averaged
dense ones, as the TRM reference saves its EMA copy) and train_state/"dense" the trained ones, so
evaluation, solvers and exports read the average and a resume restores both. Restores use an
abstract target (without one orbax returns optax states as plain lists). Saves wait until written:
the trainer donates the state to the next step, and a checkpoint must be complete before the loop
can be killed anyway.

Metadata format 2 stores the whole RunConfig tree as `run_config` and the model family's name;
format 1 (written before the run configuration was one tree) stored `model_config` and
`train_config` side by side. Format 1 is read by converting it on the fly (`_upgrade`): its two
configs are format 2's `model` and `optim`, its family is HRM, and it had no loop settings.

Atomicity: orbax writes a step under a temporary name and renames it when every item is committed,
so a save killed mid-write is never listed; the manifest, written after that, catches a finished
step damaged later or one killed between the rename and the manifest. Readers that pick the latest
step skip damaged ones (logged with the reason); the trainer moves them aside to
`<step>.damaged-<time>` (orbax ignores such names, nothing is deleted) and resumes from the
previous good one.

Fault injection for tests: HRM_FAULT_KILL=<phase>@<step> makes the process SIGKILL itself while
saving that step, phase `write` (orbax's asynchronous write has begun, nothing is committed) or
`manifest` (orbax committed the step, the manifest is not written yet).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from hrm_jax import distributed, manifest
from hrm_jax.config import IMPLEMENTATION_FIELDS, OptimConfig, RunConfig
from hrm_jax.family import Family, family_named, family_of
from hrm_jax.layers import runnable_here

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)
PERIODIC_DIR = "checkpoints"
BEST_DIR = "best"
_ITEMS = ("params", "train_state", "meta")
FAULT_ENV = "HRM_FAULT_KILL"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or incomplete; the message names the path."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written with a different configuration; the message names each field."""


def _manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, read_only: bool = False
             ) -> ocp.CheckpointManager:
    """A writing manager is shared by every process of a run (orbax synchronises them; each writes its
    shards, process 0 the rest). A reading one is this process's alone: reads need no other process, and
    orbax's barriers would wait for processes that are not reading."""
    me = jax.process_index()
    processes = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}) if read_only else None
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           **({"multiprocessing_options": processes} if processes else {}))
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options, item_names=_ITEMS)


# Saving ----------------------------------------------------------------------------------------
class RunCheckpoints:
    """The periodic manager (`out_dir/checkpoints`, `max_to_keep` newest) and the best one
    (`out_dir/best`, one kept, saved when eval exact accuracy improves).

    In a multi-process run every process makes the same calls (orbax writes each array once: every
    process its shards, process 0 the replicated arrays and the metadata); process 0 alone writes
    manifests and moves damaged steps aside, and the others wait for it (distributed.barrier)."""

    def __init__(self, out_dir: str | os.PathLike, *, max_to_keep: int = 3) -> None:
        self.out_dir = os.fspath(out_dir)
        self.periodic = _manager(os.path.join(self.out_dir, PERIODIC_DIR), max_to_keep=max_to_keep)
        self.best = _manager(os.path.join(self.out_dir, BEST_DIR), max_to_keep=1)

    def save(self, state: Any, meta: dict[str, Any], *, best: bool = False) -> str:
        """Writes `state` (a train.TrainState) and `meta` (see `make_meta`), waits until orbax has
        committed it, then writes its manifest; returns the step dir. A step already saved is kept
        if it is intact and rewritten (the damaged copy moved aside) if not."""
        manager = self.best if best else self.periodic
        step = int(jax.device_get(state.step))
        path = os.path.join(os.fspath(manager.directory), str(step))
        if step in manager.all_steps() and (problem := step_problem(path)) is not None:
            self._move_aside(manager, step, problem)
        if step not in manager.all_steps():
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.eval_params()),
                train_state=ocp.args.StandardSave(_train_items(state)),
                meta=ocp.args.JsonSave({**meta, manifest.MANIFEST_KEY: True})))
            _fault_point("write", step)
            manager.wait_until_finished()
            _fault_point("manifest", step)
            if distributed.is_primary():
                manifest.write(path)
            distributed.barrier(f"hrm_jax manifest {step}")  # the save is complete when it returns, everywhere
        logger.info("saved %s checkpoint %s", "best" if best else "periodic", path)
        return path

    def latest_step(self) -> int | None:
        """The newest intact periodic step; damaged or unfinished newer ones are moved aside."""
        for step in sorted(self.periodic.all_steps(), reverse=True):
            problem = step_problem(os.path.join(os.fspath(self.periodic.directory), str(step)))
            if problem is None:
                return step
            self._move_aside(self.periodic, step, problem)
        return None

    @staticmethod
    def _move_aside(manager: ocp.CheckpointManager, step: int, problem: str) -> None:
        """move_aside by process 0, after every process has read the step and before any reads the folder again."""
        distributed.barrier(f"hrm_jax checked {step}")
        if distributed.is_primary():
            move_aside(manager, step, problem)
        distributed.barrier(f"hrm_jax moved {step}")
        manager.reload()

    def close(self) -> None:
        self.periodic.close()
        self.best.close()


def _reason(err: Exception) -> str:
    """An exception as one short line: orbax/TensorStore messages span dozens of lines of spec."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:200]}"


def _fault_point(phase: str, step: int) -> None:
    """SIGKILLs this process when HRM_FAULT_KILL names this phase and step (fault-injection tests)."""
    if os.environ.get(FAULT_ENV) == f"{phase}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def step_problem(step_dir: str) -> str | None:
    """None for an intact step dir, else what is wrong. Steps saved before manifests existed (their
    metadata lacks MANIFEST_KEY) are accepted unverified."""
    if os.path.exists(os.path.join(step_dir, manifest.MANIFEST_FILE)):
        return manifest.problem(step_dir)
    try:
        meta = _read_json_item(step_dir)
    except CheckpointError as err:
        return str(err)
    return manifest.problem(step_dir) if meta.get(manifest.MANIFEST_KEY) else None


def _read_json_item(step_dir: str) -> dict[str, Any]:
    manager = _manager(os.path.dirname(step_dir), read_only=True)
    try:
        meta = manager.restore(int(os.path.basename(step_dir)),
                               args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # orbax raises several types for missing/corrupt files
        raise CheckpointError(f"{step_dir}: unreadable checkpoint metadata ({_reason(err)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{step_dir}: checkpoint metadata is not a JSON object")
    return meta


def move_aside(manager: ocp.CheckpointManager, step: int, problem: str) -> str:
    """Renames a damaged step dir to `<step>.damaged-<time>` (kept for inspection, ignored by orbax)."""
    root = os.fspath(manager.directory)
    target = base = os.path.join(root, f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    copies = 1
    while os.path.exists(target):  # the same step damaged twice within a second
        target, copies = f"{base}-{copies}", copies + 1
    os.rename(os.path.join(root, str(step)), target)
    manager.reload()
    logger.warning("checkpoint %s is damaged (%s): moved aside to %s; using the previous one",
                   os.path.join(root, str(step)), problem, target)
    return target


def _train_items(state: Any) -> dict[str, Any]:
    items = {"step": state.step, "opt_state": state.opt_state, "carry": state.carry, "rng": state.rng}
    if state.ema is not None:  # the params item then holds the average; the trained weights go here
        items["dense"] = state.params["dense"]
    return items


def make_meta(run_config: RunConfig, total_steps: int, step: int, sampler_state: dict[str, Any] | None,
              **extra: Any) -> dict[str, Any]:
    """The JSON part of a checkpoint; `extra` holds e.g. eval metrics and the best exact accuracy."""
    return {"format_version": FORMAT_VERSION, "step": int(step), "total_steps": int(total_steps),
            "model_family": family_of(run_config.model).name, "run_config": run_config.to_dict(),
            "sampler": sampler_state, **extra}


def _with_defaults(saved_optim: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer config with the fields it lacks at OptimConfig's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(OptimConfig) if f.default is not dataclasses.MISSING}
    return defaults | saved_optim


def _upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """Format 1 metadata in format 2's shape (see the module docstring); optimizer fields added
    since a checkpoint was written (ema, ema_rate) at their defaults, which is what it ran with."""
    if meta["format_version"] != FORMAT_VERSION:
        old = dict(meta)
        run = {"model": old.pop("model_config"), "optim": old.pop("train_config", None), "loop": None}
        meta = {**old, "format_version": FORMAT_VERSION, "model_family": "hrm", "run_config": run}
    run = meta.get("run_config")
    if run is not None and run.get("optim") is not None:
        meta = {**meta, "run_config": {**run, "optim": _with_defaults(run["optim"])}}
    return meta


# Reading ---------------------------------------------------------------------------------------
def _resolve(path: str | os.PathLike, step: int | None) -> tuple[ocp.CheckpointManager, int, str]:
    """A run dir, a manager dir or a step dir -> (read-only manager, step, step dir).

    Run dir: its `checkpoints/`. Manager dir: `step` or its latest. Step dir: that step.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory; pass a run's out_dir, its "
                              f"'{PERIODIC_DIR}'/'{BEST_DIR}' dir or one step dir inside them")
    if os.path.isdir(os.path.join(path, PERIODIC_DIR)):
        path = os.path.join(path, PERIODIC_DIR)
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        root, step = os.path.dirname(path), int(name)
    else:
        root = path
    manager = _manager(root, read_only=True)
    steps = manager.all_steps()
    explicit = step is not None
    if step is None:
        step = _latest_intact(root, steps)
    if step is None or step not in steps:
        raise CheckpointError(f"{root}: no {'intact ' if steps else ''}checkpoint"
                              f"{f' for step {step}' if explicit else ''} (steps found: {sorted(steps)}); "
                              "train first or pass the right path")
    where = os.path.join(root, str(step))
    problem = step_problem(where)
    if problem is not None:
        raise CheckpointError(f"{where}: damaged checkpoint ({problem}); use another step or run")
    return manager, step, where


def _latest_intact(root: str, steps) -> int | None:
    """The newest step whose files match its manifest; damaged newer ones are logged and skipped."""
    for step in sorted(steps, reverse=True):
        problem = step_problem(os.path.join(root, str(step)))
        if problem is None:
            return step
        logger.warning("skipping damaged checkpoint %s (%s)", os.path.join(root, str(step)), problem)
    return None


def read_meta(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (see `_resolve` for `path`)."""
    manager, step, where = _resolve(path, step)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # orbax raises several types for missing/corrupt files
        raise CheckpointError(f"{where}: unreadable checkpoint metadata ({_reason(err)})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in _READABLE_FORMATS:
        raise CheckpointError(f"{where}: not a hrm_jax checkpoint of format {' or '.join(map(str, _READABLE_FORMATS))}")
    return _upgrade(meta)


def config_from_dict(cls, data: dict[str, Any], where: str):
    """A config dataclass from its saved dict; unknown or missing fields give a CheckpointError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{where}: saved {cls.__name__} has fields this version lacks: {unknown}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: saved {cls.__name__} is invalid ({err})") from None


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """'prefix.field: saved X, now Y' for every field that differs (missing counts as differing)."""
    return [f"{prefix}.{k}: saved {saved.get(k, '<missing>')!r}, now {current.get(k, '<missing>')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, "<missing>") != current.get(k, "<missing>")]


def saved_family(meta: dict[str, Any], where: str) -> Family:
    try:
        return family_named(meta["model_family"])
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def saved_model_config(meta: dict[str, Any], where: str):
    """The model config a checkpoint was written with (its family's config class)."""
    return config_from_dict(saved_family(meta, where).config_class, meta["run_config"]["model"], where)


def check_compatible(meta: dict[str, Any], run_config: RunConfig, total_steps: int, where: str) -> None:
    """Raises CheckpointMismatchError listing every differing field with both values.

    Compared: the model family, the model (kernel choices aside: IMPLEMENTATION_FIELDS), the optimizer
    and total_steps, which fix the numbers; the loop settings may differ (they drive the run).
    """
    saved = meta["run_config"]
    family = family_of(run_config.model).name
    diffs = [] if meta["model_family"] == family else [f"model family: saved {meta['model_family']!r}, now {family!r}"]
    saved_model = {k: v for k, v in saved["model"].items() if k not in IMPLEMENTATION_FIELDS}
    current_model = {k: v for k, v in run_config.model.to_dict().items() if k not in IMPLEMENTATION_FIELDS}
    diffs += (config_differences(saved_model, current_model, "model")
              + config_differences(saved["optim"] or {}, run_config.optim.to_dict(), "optim"))
    if int(meta["total_steps"]) != int(total_steps):
        diffs.append(f"total_steps: saved {meta['total_steps']}, now {total_steps}")
    if diffs:
        raise CheckpointMismatchError(f"{where} was written with a different configuration: " + "; ".join(diffs)
                                      + ". Resume with the saved configuration or use a new out_dir.")


def restore(path: str | os.PathLike, abstract_state: Any, *, run_config: RunConfig, total_steps: int,
            step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores a TrainState (structure and shapes of `abstract_state`, e.g. from jax.eval_shape)
    and its metadata. Refuses (CheckpointMismatchError) a checkpoint written with other configs.

    Leaves of `abstract_state` that carry a sharding are restored with it: a checkpoint written by
    any number of processes and devices restores onto this run's mesh, each process reading the
    slices its devices hold."""
    manager, step, where = _resolve(path, step)
    meta = read_meta(where)
    check_compatible(meta, run_config, total_steps, where)
    abstract_items = _train_items(abstract_state)
    try:
        items = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train_state=ocp.args.StandardRestore(abstract_items)))
    except Exception as err:
        raise CheckpointError(f"{where}: could not restore the state ({_reason(err)}); the "
                              "checkpoint is incomplete or corrupt: delete it to fall back to an older one") from None
    train_items, params, ema = items["train_state"], items["params"], None
    if abstract_state.ema is not None:
        params, ema = {**params, "dense": train_items["dense"]}, params["dense"]
    state = abstract_state.replace(params=params, step=train_items["step"], opt_state=train_items["opt_state"],
                                   carry=train_items["carry"], rng=train_items["rng"], ema=ema)
    logger.info("restored %s (step %d)", where, step)
    return state, meta


def load_params_for_eval(path: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Any], Any]:
    """(params, model_config) of a checkpoint, for evaluation or the solve CLI. `path` is a run's
    out_dir (its latest periodic checkpoint), `<out_dir>/best`, a manager dir or a step dir.
    Kernel choices this machine cannot run fall back to XLA (`runnable_here`)."""
    manager, step, where = _resolve(path, step)
    meta = read_meta(where)
    config = runnable_here(saved_model_config(meta, where))
    init_params = saved_family(meta, where).init_params
    # On this process's first device, whatever the process and device count that wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                            jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0)))
    try:
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
    except Exception as err:
        raise CheckpointError(f"{where}: could not restore the params ({_reason(err)})") from None
    return params, config


def save_params(directory: str | os.PathLike, params: dict[str, Any], model_config: Any, *,
                step: int = 0, **extra: Any) -> str:
    """Writes a params-only checkpoint (no optimizer state) that `load_params_for_eval` and the
    solvers read, e.g. weights converted from a PyTorch checkpoint. Refuses to overwrite a step."""
    manager = _manager(directory, max_to_keep=None)
    if step in manager.all_steps():
        raise CheckpointError(f"{directory}: already holds a checkpoint for step {step}; choose another --out")
    meta = {"format_version": FORMAT_VERSION, "step": int(step), "model_family": family_of(model_config).name,
            "run_config": {"model": model_config.to_dict(), "optim": None, "loop": None}, "params_only": True,
            manifest.MANIFEST_KEY: True, **extra}
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    path = os.path.join(os.path.abspath(os.fspath(directory)), str(step))
    manifest.write(path)
    return path
