"""The jax sleep trainer (sage/sleep.py, `--trainer jax`): the library's own train step and evaluation.

Fine-tune: a TrainState built from the served params (`make_dense_optimizer`, a fresh ACT carry) and
`hrm_jax.train.train_step` per batch (AdamATan2, the carry across batches, the reference's loss, ACT
exploration keyed by the config's seed). Validate: `hrm_jax.evaluate.evaluate` (full rollouts).
Load: an hrm_jax checkpoint or a model folder (`hrm_jax.pretrained.load_model`); publish: checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hrm_jax.config import HRMConfig, TrainConfig
from hrm_jax.data.format import PuzzleSplit
from hrm_jax.evaluate import evaluate
from hrm_jax.model import initial_carry
from hrm_jax.optim import make_dense_optimizer
from hrm_jax.pretrained import load_model
from hrm_jax.train import TrainState, on_default_device, train_step

Params = dict[str, Any]


class JaxTrainer:
    name = "jax"
    weights_format = "checkpoint"

    def load(self, path: str) -> tuple[Params, HRMConfig]:
        return load_model(path)

    def fine_tune(self, params: Params, model_config: HRMConfig, batches: Iterator[dict[str, np.ndarray]],
                  train_config: TrainConfig, steps: int) -> tuple[Params, list[float]]:
        """One train_step per batch (`steps` of them, batch train_config.global_batch_size) from `params` (the
        caller's arrays stay valid); returns (params, lm_loss per step). Exploration keyed by train_config.seed."""
        own = jax.tree.map(jnp.copy, params)  # train_step donates its state; the caller keeps `params`
        rows = train_config.global_batch_size
        empty = {"inputs": np.zeros((rows, model_config.seq_len), np.int32),
                 "labels": np.zeros((rows, model_config.seq_len), np.int32),
                 "puzzle_identifiers": np.zeros(rows, np.int32)}
        state = on_default_device(TrainState(
            step=jnp.zeros((), jnp.int32), params=own,
            opt_state=make_dense_optimizer(train_config, steps).init(own["dense"]),
            carry=initial_carry(model_config, empty), rng=jax.random.key_data(jax.random.key(train_config.seed))))
        losses = []
        for batch in batches:
            state, metrics = train_step(state, batch, model_config=model_config, train_config=train_config,
                                        total_steps=steps)
            losses.append(float(metrics["lm_loss"]))
        return state.params, losses

    def validate(self, params: Params, model_config: HRMConfig, split: PuzzleSplit, batch_size: int,
                 max_batches: int | None = None) -> dict[str, float]:
        """Whole-split metrics of hrm_jax.evaluate (exact_accuracy, accuracy, ...)."""
        return evaluate(params, model_config, split, batch_size, early_halt_stats=False,
                        max_batches=max_batches)["all"]


TRAINER = JaxTrainer()
