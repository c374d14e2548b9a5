"""The reference's training step on a checkout's own modules, HRM's (sapientinc/HRM) or TRM's
(SamsungSAILMontreal/TinyRecursiveModels), for the reference-checkout tests and benchmarks/trm_train_step.py.

Both pretrain.py files run the same `train_batch` for world size 1: forward and loss of the ACTLossHead
model, `((1 / global_batch_size) * loss).backward()`, the dense update, the sparse sign-SGD of the puzzle
embedding (models/sparse_embedding.py), `zero_grad`; TRM's then updates its EMAHelper (models/ema.py) when
`ema` is on. The dense update is export.torch_train.adam_atan2_ (the AdamATan2 formula): the
reference's adam-atan2 is a CUDA extension that is not installable offline. Everything else is the checkout's.
"""

from __future__ import annotations

import types

import torch

from export.torch_train import adam_atan2_, schedule_values
from hrm_jax.config import OptimConfig


class ReferenceTrainer:
    """Holds a checkout's ACTLossHead model, the optimizer states and the ACT carry; `step(batch)` is one
    `train_batch`. ref: the checkout's modules (`sparse`, and `ema` when train_config.ema); batches are dicts
    of tensors on the model's device. compiled: torch.compile the model and the update, as pretrain.py
    compiles its model."""

    def __init__(self, ref: types.SimpleNamespace, model: torch.nn.Module, train_config: OptimConfig,
                 total_steps: int, *, compiled: bool = False) -> None:
        self.tc = train_config
        self.device = next(model.parameters()).device
        self.model = torch.compile(model) if compiled else model
        self.model.train()
        self.dense = list(self.model.parameters())
        self.exp_avg = [torch.zeros_like(p) for p in self.dense]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.dense]
        self.update = torch.compile(adam_atan2_, dynamic=False) if compiled else adam_atan2_
        self.sign_sgd = ref.sparse.CastedSparseEmbeddingSignSGD_Distributed(
            self.model.model.puzzle_emb.buffers(), world_size=1, lr=0.0,
            weight_decay=train_config.puzzle_emb_weight_decay)
        self.ema = None
        if train_config.ema:
            self.ema = ref.ema.EMAHelper(mu=train_config.ema_rate)
            self.ema.register(self.model)
        schedule = schedule_values(train_config.lr, train_config, total_steps)
        self.lrs = torch.from_numpy(schedule).to(self.device)
        self.emb_lrs = schedule_values(train_config.puzzle_emb_lr, train_config, total_steps)
        # 1-based update counts on the device: a fresh host tensor per step would be a blocking copy.
        self.update_counts = torch.arange(1, total_steps + 2, dtype=torch.float32, device=self.device)
        self.carry, self.step_count = None, 0

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the loss head's metric sums (tensors, not synchronised)."""
        tc, index = self.tc, self.step_count
        if self.carry is None:
            with torch.device(self.device):
                self.carry = self.model.initial_carry(batch)
        self.carry, loss, metrics, _, _ = self.model(carry=self.carry, batch=batch, return_keys=[])
        ((1 / tc.global_batch_size) * loss).backward()
        with torch.no_grad():
            self.update(self.dense, [p.grad for p in self.dense], self.exp_avg, self.exp_avg_sq,
                        self.update_counts[index], self.lrs[index], tc.beta1, tc.beta2, tc.weight_decay)
        for group in self.sign_sgd.param_groups:
            group["lr"] = float(self.emb_lrs[index])
        self.sign_sgd.step()
        self.sign_sgd.zero_grad()
        for p in self.dense:
            p.grad = None
        if self.ema is not None:
            self.ema.update(self.model)  # TRM's pretrain.py: after train_batch, i.e. after the optimizers
        self.step_count += 1
        return metrics
