"""The torch sleep trainer (sage/sleep.py, `--trainer torch`): a device without JAX fine-tunes too.

Fine-tune: export/torch_train.py's TorchTrainer (the reference's train_batch on export/torch_model.py:
the ACT carry across batches, stablemax ACT loss, AdamATan2, sparse sign-SGD; checked against
hrm_jax.train.train_step in tests/test_torch_train_step.py) from the served params, one step per batch,
with torch's generator seeded from train_config.seed for the ACT exploration (forked, so the caller's
random state is untouched). On a CPU it computes in float32 (CPUs emulate bf16 slowly), on CUDA in the
config's forward_dtype; H_init/L_init are kept in float32 either way, so untrained buffers come back as
they went in.
Validate: `evaluate`, the metrics of hrm_jax.evaluate.evaluate's "all" (full halt_max_steps rollouts,
rows without labels left out) computed from HRMTorch.solve.
Load: a model folder (model.safetensors + config.json, "pretrained" for the shipped model) without
JAX, or an hrm_jax checkpoint where JAX is installed; publish: model folders (export/params_folder.py).
HRM only: TRM's training step has no torch transcription here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from export.params_folder import is_params_folder, params_of, read_params
from export.torch_model import HRMTorch
from export.torch_train import TorchTrainer, log_stablemax, model_from_params
from hrm_jax.config import HRMConfig, TrainConfig
from hrm_jax.data.format import PuzzleSplit
from hrm_jax.data.sampler import IGNORE_LABEL_ID, eval_batches
from hrm_jax.pretrained import PRETRAINED, model_dir

Params = dict[str, Any]
METRICS = ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss", "copy_accuracy",
           "copy_exact_accuracy")


class TorchTrainerError(ValueError):
    """A model the torch trainer cannot read or train; the message says what to pass instead."""


def _device() -> tuple[str, torch.dtype | None]:
    """(device, compute dtype): CUDA in the config's dtype (None) when there is one, else the CPU in float32."""
    return ("cuda", None) if torch.cuda.is_available() else ("cpu", torch.float32)


def _module(params: Params, model_config: HRMConfig) -> HRMTorch:
    if type(model_config) is not HRMConfig:
        raise TorchTrainerError(f"the torch trainer trains HRM; this model is a {type(model_config).__name__} "
                                "(use --trainer jax)")
    device, dtype = _device()
    # float32 buffers: HRMTorch keeps H_init/L_init in forward_dtype, which would round them on the way back.
    storage = dataclasses.replace(model_config, forward_dtype="float32")
    return model_from_params(params, storage, device, dtype or model_config.forward_dtype)


class TorchSleepTrainer:
    name = "torch"
    weights_format = "folder"

    def load(self, path: str) -> tuple[Params, HRMConfig]:
        """(float32 NumPy params, config) of a model folder, "pretrained[:NAME]", or an hrm_jax checkpoint."""
        text = os.fspath(path)
        folder = model_dir(text.partition(":")[2] or "sudoku") if text.split(":")[0] == PRETRAINED else text
        if is_params_folder(folder):
            return read_params(folder)
        try:
            from hrm_jax.checkpoint import load_params_for_eval  # noqa: PLC0415  (orbax checkpoints need JAX)
        except ImportError as err:
            raise TorchTrainerError(f"{path}: not a model folder (model.safetensors + config.json), and reading an "
                                    f"hrm_jax checkpoint needs JAX, which does not import here ({err}); publish "
                                    "a model folder (hrm_jax.pretrained.save_pretrained) instead") from None
        params, config = load_params_for_eval(text)
        return _to_numpy(params), config

    def fine_tune(self, params: Params, model_config: HRMConfig, batches: Iterator[dict[str, np.ndarray]],
                  train_config: TrainConfig, steps: int) -> tuple[Params, list[float]]:
        """One TorchTrainer step per batch (`steps` of them) from `params`; returns (float32 NumPy params,
        lm_loss per step, per batch row as hrm_jax.losses.reduce_metrics reports it)."""
        model = _module(params, model_config)
        device = next(model.parameters()).device
        losses = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(train_config.seed)
            trainer = TorchTrainer(model, train_config, steps)
            for batch in batches:
                sums = trainer.step({k: torch.from_numpy(np.asarray(v, np.int32)).to(device) for k, v in batch.items()})
                losses.append(float(sums["lm_loss"]) / train_config.global_batch_size)
        return params_of(model), losses

    def validate(self, params: Params, model_config: HRMConfig, split: PuzzleSplit, batch_size: int,
                 max_batches: int | None = None) -> dict[str, float]:
        return evaluate(_module(params, model_config), split, batch_size, max_batches)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _check_fits(config: HRMConfig, split: PuzzleSplit) -> None:
    bad = [f"{name}: model {getattr(config, name)} vs data {getattr(split.metadata, name)}"
           for name in ("seq_len", "vocab_size", "num_puzzle_identifiers")
           if getattr(config, name) != getattr(split.metadata, name)]
    if bad:
        raise TorchTrainerError(f"model config does not fit the dataset at {split.path} ({'; '.join(bad)})")


def _row_metrics(model: HRMTorch, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row values of hrm_jax.evaluate's ROW_METRICS (early-halting ones left out) and has_labels."""
    device = next(model.parameters()).device
    inputs, labels = (torch.from_numpy(batch[k]).to(device) for k in ("inputs", "labels"))
    out = model.solve(inputs, torch.from_numpy(batch["puzzle_identifiers"]).to(device))
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)

    def scores(pred):
        correct = (mask & (pred == labels)).sum(-1)
        return correct / counts.clamp_min(1), correct == counts

    accuracy, exact = scores(out.logits.argmax(-1))
    copy_accuracy, copy_exact = scores(inputs)
    picked = log_stablemax(out.logits).gather(-1, torch.where(mask, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    q_halt = out.q_halt_logits.float()
    rows = {"accuracy": accuracy, "exact_accuracy": exact, "q_halt_accuracy": (q_halt >= 0) == exact,
            "steps": out.steps, "lm_loss": -torch.where(mask, picked, 0.0).sum(-1) / counts.clamp_min(1),
            "q_halt_loss": torch.nn.functional.binary_cross_entropy_with_logits(q_halt, exact.float(),
                                                                                 reduction="none"),
            "copy_accuracy": copy_accuracy, "copy_exact_accuracy": copy_exact, "has_labels": counts > 0}
    return {k: v.cpu().numpy() for k, v in rows.items()}


def evaluate(model: HRMTorch, split: PuzzleSplit, batch_size: int, max_batches: int | None = None
             ) -> dict[str, float]:
    """hrm_jax.evaluate.evaluate(...)["all"] without the early-halting metrics: means over the rows with
    labels (padding rows of the last batch excluded) and "count"."""
    if batch_size < 1:
        raise TorchTrainerError(f"batch_size must be >= 1, got {batch_size}")
    _check_fits(model.config, split)
    chunks = []
    for index, item in enumerate(eval_batches(split, batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        rows = _row_metrics(model, item.batch)
        chunks.append({k: v[item.valid] for k, v in rows.items()})
    if not chunks:
        raise TorchTrainerError(f"{split.path}: no examples to evaluate")
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    counted = rows["has_labels"]
    count = int(counted.sum())
    metrics = {n: float(rows[n][counted].astype(np.float64).mean()) if count else float("nan") for n in METRICS}
    metrics["count"] = float(count)
    return metrics


TRAINER = TorchSleepTrainer()
