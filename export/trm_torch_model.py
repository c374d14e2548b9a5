"""TRM ACT-v1 as a plain torch module for inference and export, beside HRMTorch and sharing its layers.

It computes the function of the reference's TinyRecursiveReasoningModel_ACTV1 in eval mode
(SamsungSAILMontreal/TinyRecursiveModels models/recursive_reasoning/trm.py) and its `state_dict()`
has the reference's keys (`model.inner.L_level.layers.0.mlp_t.gate_up_proj.weight`, ...), so a
released checkpoint loads with `load_state_dict(strict=True)` once `_orig_mod.` is dropped
(export/convert.py). The layers, embeddings, heads, carry interface, `solve` and the ONNX graphs are
HRMTorch's; what differs is the mlp_t block, the segment (one network, H_cycles recursions) and, with
no_ACT_continue, the early-halting rule (q_halt > 0).
"""

from __future__ import annotations

import torch
from torch import nn

from export.torch_model import HRMACT, ACTInner, Block, HRMTorch, ReasoningModule, SwiGLU, rms_norm
from hrm_jax.trm_config import TRMConfig


class MLPTBlock(nn.Module):
    """HRM's post-norm block with the attention replaced by a SwiGLU across positions: the token mixing and its
    norm run on [B, hidden, seq]."""

    def __init__(self, config: TRMConfig) -> None:
        super().__init__()
        self.mlp_t = SwiGLU(config.total_seq_len, config.sequence_intermediate_size)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.eps = config.rms_norm_eps

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h_t = h.transpose(1, 2)
        h = rms_norm(h_t + self.mlp_t(h_t), self.eps).transpose(1, 2)
        return rms_norm(h + self.mlp(h), self.eps)


class TRMInner(ACTInner):
    """TRM's segment: the shared parts with the one network (L_level) and H_cycles recursions."""

    def __init__(self, config: TRMConfig, dtype: torch.dtype) -> None:
        # mlp_t blocks have no attention, so no rotary tables even with pos_encodings "rope".
        super().__init__(config, dtype, rope=config.pos_encodings == "rope" and not config.mlp_t)
        self.L_level = ReasoningModule(config, config.L_layers, MLPTBlock if config.mlp_t else Block)

    def recursion(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, cos_sin):
        """L_cycles updates z_L <- net(z_L, z_H + x), then z_H <- net(z_H, z_L)."""
        for _ in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + x, cos_sin)
        return self.L_level(z_H, z_L, cos_sin), z_L

    def recurrence(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, cos_sin):
        """H_cycles recursions (in eval the reference's no-grad ones and the one with gradient are alike)."""
        for _ in range(self.config.H_cycles):
            z_H, z_L = self.recursion(z_H, z_L, x, cos_sin)
        return z_H, z_L


class TRMACT(HRMACT):
    """The ACT wrapper (the reference's TinyRecursiveReasoningModel_ACTV1) in eval mode; it halts by
    TRMConfig.halts (q_halt > 0 with no_ACT_continue)."""

    inner_class = TRMInner


class TRMTorch(HRMTorch):
    """Top-level module with keys `model.inner.*`; forward is the carry step, solve runs whole puzzles."""

    act_class = TRMACT


def torch_module(config, dtype: torch.dtype | str | None = None) -> HRMTorch:
    """HRMTorch for an HRMConfig, TRMTorch for a TRMConfig (the export side of hrm_jax.family)."""
    return (TRMTorch if isinstance(config, TRMConfig) else HRMTorch)(config, dtype)
