"""The reference's training step in torch, built on export.torch_model (no JAX needed).

It computes what sapientinc/HRM's pretrain.py `train_batch` computes for one global batch (world size
1), on HRMTorch's modules (the same keys and function as the reference's model):

- refresh the ACT carry (halted rows restart from H_init/L_init and take the batch's row),
- one segment: every H/L update but the last two under `torch.no_grad()`, the last L- and H-update
  with gradients (the 1-step gradient), lm and Q heads,
- halting with exploration and the target-Q forward (a second full inner forward, no gradient),
- ACTLossHead's loss: stablemax cross-entropy in float64 as the reference, plus
  0.5 (q_halt + q_continue) binary cross-entropies, summed and divided by the global batch size,
- AdamATan2 (decoupled weight decay, no epsilon) on the dense parameters and sparse sign-SGD on the
  puzzle-embedding rows of the batch, on the warm-up/cosine schedule of hrm_jax.optim (`schedule_values`:
  the same formula in NumPy float32, so that a device without JAX can train).

`compiled=True` wraps the forward + loss and the optimizer update in `torch.compile`, as the reference
compiles its model. The reference's fused adam-atan2 CUDA kernel is not installable here; in eager mode
the update is a loop of torch ops (slower than that kernel), compiled it is fused by inductor.
tests/test_torch_train_step.py checks the step against hrm_jax.train.train_step at float32. Users: the
torch sleep trainer (sage/sleep_torch.py) and the benchmarks (benchmarks/train_step.py, trm_train_step.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from export.convert import to_torch_state_dict
from export.torch_model import HRMInner, HRMTorch
from hrm_jax.config import HRMConfig, TrainConfig
from hrm_jax.data.sampler import IGNORE_LABEL_ID


class TorchCarry(NamedTuple):
    """The ACT carry of the reference (inner carry, steps, halted, current data) as tensors."""

    z_H: torch.Tensor
    z_L: torch.Tensor
    steps: torch.Tensor  # int32[B]
    halted: torch.Tensor  # bool[B]
    inputs: torch.Tensor
    labels: torch.Tensor
    puzzle_identifiers: torch.Tensor
    puzzle_rows: torch.Tensor | None = None  # f32[B, puzzle_emb_ndim]: given rows instead of the table's


def log_stablemax(logits: torch.Tensor) -> torch.Tensor:
    """log(s(x) / sum s(x)), s(x) = x + 1 (x >= 0) or 1 / (1 - x); float64 as the reference's loss."""
    x = logits.to(torch.float64)
    s = torch.where(x < 0, 1.0 / (1.0 - x + 1e-30), x + 1.0)
    return torch.log(s / s.sum(-1, keepdim=True))


def act_loss(logits, q_halt, q_continue, target_q_continue, labels, halted, steps):
    """ACTLossHead: summed loss and the metric sums of hrm_jax.losses.act_loss (same names)."""
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    divisor = counts.clamp_min(1).unsqueeze(-1)
    with torch.no_grad():
        is_correct = mask & (logits.argmax(-1) == labels)
        seq_correct = is_correct.sum(-1) == counts
        valid = halted & (counts > 0)
        metrics = {"count": valid.sum(),
                   "accuracy": torch.where(valid, (is_correct.float() / divisor).sum(-1), 0.0).sum(),
                   "exact_accuracy": (valid & seq_correct).sum(),
                   "steps": torch.where(valid, steps, 0).sum()}
    logprobs = log_stablemax(logits)
    picked = logprobs.gather(-1, torch.where(mask, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    lm_loss = (-torch.where(mask, picked, 0.0) / divisor).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.to(q_halt.dtype), reduction="sum")
    q_continue_loss = F.binary_cross_entropy_with_logits(q_continue, target_q_continue, reduction="sum")
    metrics.update(lm_loss=lm_loss.detach(), q_halt_loss=q_halt_loss.detach(), q_continue_loss=q_continue_loss.detach())
    return lm_loss + 0.5 * (q_halt_loss + q_continue_loss), metrics


def segment(inner: HRMInner, z_H, z_L, inputs, puzzle_identifiers, puzzle_rows):
    """One inner forward with the 1-step gradient -> (z_H, z_L, logits, q_halt, q_continue)."""
    cfg, cos_sin = inner.config, inner.cos_sin()
    x = inner.embed(inputs, puzzle_identifiers, puzzle_rows)
    with torch.no_grad():
        for h in range(cfg.H_cycles):
            for low in range(cfg.L_cycles):
                if h < cfg.H_cycles - 1 or low < cfg.L_cycles - 1:
                    z_L = inner.L_level(z_L, z_H + x, cos_sin)
            if h < cfg.H_cycles - 1:
                z_H = inner.H_level(z_H, z_L, cos_sin)
    z_L = inner.L_level(z_L, z_H + x, cos_sin)
    z_H = inner.H_level(z_H, z_L, cos_sin)
    return z_H, z_L, *inner.heads(z_H)


def forward_and_loss(inner: HRMInner, carry: TorchCarry, puzzle_rows: torch.Tensor, global_batch_size: int):
    """The reference's HierarchicalReasoningModel_ACTV1.forward (training) and ACTLossHead.

    `carry` is already refreshed. Returns (loss / global_batch_size, new carry, metric sums)."""
    cfg = inner.config
    z_H, z_L, logits, q_halt, q_continue = segment(inner, carry.z_H, carry.z_L, carry.inputs,
                                                   carry.puzzle_identifiers, puzzle_rows)
    z_H, z_L = z_H.detach(), z_L.detach()
    with torch.no_grad():
        steps = carry.steps + 1
        is_last = steps >= cfg.halt_max_steps
        halted = is_last | (q_halt > q_continue)
        explore = torch.rand_like(q_halt) < cfg.halt_exploration_prob
        minimum = torch.randint_like(steps, 2, cfg.halt_max_steps + 1)
        halted = halted & (steps >= torch.where(explore, minimum, 0))
        *_, next_halt, next_continue = segment(inner, z_H, z_L, carry.inputs, carry.puzzle_identifiers, puzzle_rows)
        target = torch.sigmoid(torch.where(is_last, next_halt, torch.maximum(next_halt, next_continue)))
    loss, metrics = act_loss(logits, q_halt, q_continue, target, carry.labels, halted, steps)
    # A plain tuple: torch.compile returns NamedTuples it built inside the graph incompletely.
    return loss / global_batch_size, (z_H, z_L, steps, halted), metrics


def adam_atan2_(params, grads, exp_avg, exp_avg_sq, step, lr, b1: float, b2: float, weight_decay: float):
    """In place, per element (imoneoi/adam-atan2): p *= 1 - lr wd; m, v EMAs;
    p -= lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t)). `step` and `lr` are 0-d tensors."""
    step_size = lr / (1 - b1 ** step)
    correction2_sqrt = torch.sqrt(1 - b2 ** step)
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.sub_(step_size * torch.atan2(m, v.sqrt() / correction2_sqrt))


class TorchTrainer:
    """Holds the torch model, optimizer state and ACT carry; `step(batch)` is one training step.

    batch: dict of int tensors on the model's device (inputs/labels [B, seq_len], puzzle_identifiers [B]).
    Opt-in, not part of the reference's step: batch["puzzle_rows"] f32[B, puzzle_emb_ndim] fills the
    prepended puzzle positions instead of the embedding table (e.g. a memory's read-out per example,
    benchmarks/memory_readout.py); the rows ride in the ACT carry with their example, receive no update,
    and the table is then neither read nor trained. Without it every step is the reference's.
    """

    def __init__(self, model: HRMTorch, train_config: TrainConfig, total_steps: int, *, compiled: bool = False):
        self.inner: HRMInner = model.model.inner
        self.config: HRMConfig = model.config
        self.train_config = train_config
        self.inner.train()
        self.params = [p for p in self.inner.parameters()]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        device = self.params[0].device
        self.step_count = 0
        self.lrs = torch.from_numpy(schedule_values(train_config.lr, train_config, total_steps)).to(device)
        emb_lrs = schedule_values(train_config.puzzle_emb_lr, train_config, total_steps)
        self.emb_lrs = torch.from_numpy(emb_lrs).to(device)
        # 1-based update counts on the device: a fresh host tensor per step would be a blocking copy.
        self.update_counts = torch.arange(1, total_steps + 2, dtype=torch.float32, device=device)
        self.carry: TorchCarry | None = None
        self._forward = torch.compile(forward_and_loss, dynamic=False) if compiled else forward_and_loss
        self._update = torch.compile(adam_atan2_, dynamic=False) if compiled else adam_atan2_

    def _refresh(self, batch: dict[str, torch.Tensor]) -> TorchCarry:
        """Halted rows restart from H_init/L_init with the batch's example; the others keep theirs."""
        if self.carry is None:  # all rows halted: the first step loads the whole batch
            shape = (batch["inputs"].shape[0], self.config.total_seq_len, self.config.hidden_size)
            z = torch.zeros(shape, dtype=self.inner.dtype, device=batch["inputs"].device)
            self.carry = TorchCarry(z, z, torch.zeros_like(batch["puzzle_identifiers"], dtype=torch.int32),
                                    torch.ones_like(batch["puzzle_identifiers"], dtype=torch.bool),
                                    batch["inputs"], batch["labels"], batch["puzzle_identifiers"])
        c = self.carry
        row = c.halted.view(-1, 1)
        rows = batch.get("puzzle_rows")
        if rows is not None:
            rows = rows if c.puzzle_rows is None else torch.where(row, rows, c.puzzle_rows)
        return TorchCarry(*self.inner.restart_halted(c.halted, c.z_H, c.z_L, c.steps), c.halted,
                          torch.where(row, batch["inputs"], c.inputs), torch.where(row, batch["labels"], c.labels),
                          torch.where(c.halted, batch["puzzle_identifiers"], c.puzzle_identifiers), rows)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the metric sums (tensors, not synchronised)."""
        carry = self._refresh(batch)
        rows = None
        if carry.puzzle_rows is not None:
            rows = carry.puzzle_rows.detach()
        elif self.config.puzzle_emb_ndim > 0:
            rows = self.inner.puzzle_emb.weights[carry.puzzle_identifiers].detach().requires_grad_(True)
        for p in self.params:
            p.grad = None
        loss, (z_H, z_L, steps, halted), metrics = self._forward(self.inner, carry, rows,
                                                                  self.train_config.global_batch_size)
        self.carry = carry._replace(z_H=z_H, z_L=z_L, steps=steps, halted=halted)
        loss.backward()
        tc, index = self.train_config, self.step_count
        with torch.no_grad():
            self._update(self.params, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq,
                         self.update_counts[index], self.lrs[index], tc.beta1, tc.beta2, tc.weight_decay)
            if rows is not None and rows.requires_grad:  # table rows, not given ones
                self._sign_sgd(carry.puzzle_identifiers, rows.grad, self.emb_lrs[index])
        self.step_count += 1
        return metrics

    def _sign_sgd(self, ids: torch.Tensor, row_grads: torch.Tensor, lr: torch.Tensor) -> None:
        """The reference's sparse sign-SGD: sum gradients per unique id, decay and step those rows."""
        table = self.inner.puzzle_emb.weights
        unique, inverse = torch.unique(ids, return_inverse=True)
        grad = torch.zeros(unique.shape[0], row_grads.shape[1], dtype=table.dtype, device=table.device)
        grad.index_add_(0, inverse, row_grads.to(table.dtype))
        decay = 1 - lr * self.train_config.puzzle_emb_weight_decay
        table[unique] = table[unique] * decay - lr * torch.sign(grad)


def schedule_values(base_lr: float, train_config: TrainConfig, total_steps: int) -> np.ndarray:
    """hrm_jax.optim.lr_schedule at every 0-based step 0..total_steps, f32[total_steps + 1]: linear warm-up,
    then cosine decay to min_ratio * base_lr, written as that function writes it (the reference's step is
    count + 1; the cosine as sin^2 of the remaining fraction), in float32 as JAX computes it."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = int(round(train_config.lr_warmup_steps))
    min_ratio = np.float32(train_config.lr_min_ratio)
    decay_len = np.float32(max(1, total_steps - warmup))
    step = np.arange(total_steps + 1, dtype=np.float32) + np.float32(1)
    warm = np.float32(base_lr) * step / np.float32(max(1, warmup))
    remaining = (decay_len + np.float32(warmup) - step) / decay_len
    cosine = (np.float32(1) - min_ratio) * np.square(np.sin(np.float32(0.5 * np.pi) * remaining))
    return np.where(step < warmup, warm, np.float32(base_lr) * (min_ratio + cosine)).astype(np.float32)


def model_from_params(params, config: HRMConfig, device: str = "cpu", dtype: torch.dtype | str | None = None
                      ) -> HRMTorch:
    """HRMTorch holding hrm_jax params (JAX or NumPy arrays; export.convert), on `device`; dtype: the compute
    dtype (default config.forward_dtype)."""
    model = HRMTorch(config, dtype).to(device)
    model.load_state_dict({k: v.to(device) for k, v in to_torch_state_dict(params, config).items()})
    return model
