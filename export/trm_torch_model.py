"""TRM ACT-v1 as a plain torch module for inference and export, beside HRMTorch and sharing its layers.

It computes the function of the reference's TinyRecursiveReasoningModel_ACTV1 in eval mode
(SamsungSAILMontreal/TinyRecursiveModels models/recursive_reasoning/trm.py) and its `state_dict()`
has the reference's keys (`model.inner.L_level.layers.0.mlp_t.gate_up_proj.weight`, ...), so a
released checkpoint loads with `load_state_dict(strict=True)` once `_orig_mod.` is dropped
(export/convert.py). The carry interface, `solve` and the ONNX graphs are HRMTorch's; what differs
is the segment (one network, H_cycles recursions) and, with no_ACT_continue, the early-halting
rule (q_halt > 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from export.torch_model import (
    HRMACT,
    TORCH_DTYPES,
    Attention,
    CastedEmbedding,
    CastedLinear,
    HRMInner,
    HRMTorch,
    PuzzleEmbedding,
    SwiGLU,
    rms_norm,
    rotary_tables,
)
from hrm_jax.trm_config import TRMConfig


class SequenceSwiGLU(nn.Module):
    """The mlp_t token mixer: a SwiGLU over the last axis of width `features` (= total_seq_len)."""

    def __init__(self, features: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = CastedLinear(features, 2 * intermediate)
        self.down_proj = CastedLinear(intermediate, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TRMBlock(nn.Module):
    """Post-norm block; with mlp_t the token mixing and its norm run on [B, hidden, seq]."""

    def __init__(self, config: TRMConfig) -> None:
        super().__init__()
        self.mlp_t_enabled, self.eps = config.mlp_t, config.rms_norm_eps
        if config.mlp_t:
            self.mlp_t = SequenceSwiGLU(config.total_seq_len, config.sequence_intermediate_size)
        else:
            self.self_attn = Attention(config)
        self.mlp = SwiGLU(config)

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.mlp_t_enabled:
            h_t = h.transpose(1, 2)
            h = rms_norm(h_t + self.mlp_t(h_t), self.eps).transpose(1, 2)
        else:
            h = rms_norm(h + self.self_attn(h, cos_sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class TRMReasoningModule(nn.Module):
    """The one network: add the injection, then the L_layers blocks."""

    def __init__(self, config: TRMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TRMBlock(config) for _ in range(config.L_layers)])

    def forward(self, h: torch.Tensor, injection: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = h + injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


class TRMInner(nn.Module):
    """Embeddings, the H_cycles recursions of one segment and the output heads."""

    # The carry handling is HRM's (H_init/L_init broadcast, halted rows restarted).
    initial_state = HRMInner.initial_state
    restart_halted = HRMInner.restart_halted

    def __init__(self, config: TRMConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.dtype = config, dtype
        hidden = config.hidden_size
        self.embed_tokens = CastedEmbedding(config.vocab_size, hidden)
        self.lm_head = CastedLinear(hidden, config.vocab_size)
        self.q_head = CastedLinear(hidden, 2, bias=True)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim)
        self.uses_rope = config.pos_encodings == "rope" and not config.mlp_t
        if self.uses_rope:
            cos, sin = rotary_tables(config.total_seq_len, config.head_dim, config.rope_theta)
            self.rope_cos = nn.Buffer(cos, persistent=False)
            self.rope_sin = nn.Buffer(sin, persistent=False)
        if config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(config.total_seq_len, hidden)
        self.L_level = TRMReasoningModule(config)
        storage = TORCH_DTYPES[config.forward_dtype]
        self.H_init = nn.Buffer(torch.zeros(hidden, dtype=storage), persistent=True)
        self.L_init = nn.Buffer(torch.zeros(hidden, dtype=storage), persistent=True)

    def embed(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor,
              puzzle_rows: torch.Tensor | None = None) -> torch.Tensor:
        """inputs int[B, seq_len], puzzle_identifiers int[B] -> [B, total_seq_len, hidden]; puzzle_rows,
        if given, replace the table lookup (a leaf for the sparse sign-SGD gradient when training)."""
        cfg = self.config
        embedding = self.embed_tokens(inputs, self.dtype)
        if cfg.puzzle_emb_ndim > 0:
            rows = (self.puzzle_emb(puzzle_identifiers, self.dtype) if puzzle_rows is None
                    else puzzle_rows.to(self.dtype))
            rows = F.pad(rows, (0, cfg.num_puzzle_slots * cfg.hidden_size - cfg.puzzle_emb_ndim))
            embedding = torch.cat((rows.view(-1, cfg.num_puzzle_slots, cfg.hidden_size), embedding), dim=-2)
        if cfg.pos_encodings == "learned":
            embedding = 0.707106781 * (embedding + self.embed_pos.embedding_weight.to(self.dtype))
        return math.sqrt(cfg.hidden_size) * embedding

    def recursion(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, cos_sin):
        """L_cycles updates z_L <- net(z_L, z_H + x), then z_H <- net(z_H, z_L)."""
        for _ in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + x, cos_sin)
        return self.L_level(z_H, z_L, cos_sin), z_L

    def forward(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor,
                puzzle_identifiers: torch.Tensor):
        """One segment -> (z_H, z_L, logits [B, seq_len, vocab], q_halt f32[B], q_continue f32[B]).

        In eval the reference's no-grad recursions and the one with gradient compute the same thing."""
        cos_sin = (self.rope_cos, self.rope_sin) if self.uses_rope else None
        x = self.embed(inputs, puzzle_identifiers)
        z_H, z_L = z_H.to(self.dtype), z_L.to(self.dtype)
        for _ in range(self.config.H_cycles):
            z_H, z_L = self.recursion(z_H, z_L, x, cos_sin)
        logits = self.lm_head(z_H)[:, self.config.num_puzzle_slots:]
        q_logits = self.q_head(z_H[:, 0]).to(torch.float32)
        return z_H, z_L, logits, q_logits[:, 0], q_logits[:, 1]


class TRMACT(HRMACT):
    """The ACT wrapper (the reference's TinyRecursiveReasoningModel_ACTV1) in eval mode."""

    inner_class = TRMInner

    def halts(self, q_halt: torch.Tensor, q_continue: torch.Tensor) -> torch.Tensor:
        """trm.py: q_halt > 0 with no_ACT_continue, else q_halt > q_continue."""
        return q_halt > 0 if self.config.no_ACT_continue else q_halt > q_continue


class TRMTorch(HRMTorch):
    """Top-level module with keys `model.inner.*`; forward is the carry step, solve runs whole puzzles."""

    act_class = TRMACT


def torch_module(config, dtype: torch.dtype | str | None = None) -> HRMTorch:
    """HRMTorch for an HRMConfig, TRMTorch for a TRMConfig (the export side of hrm_jax.family)."""
    return (TRMTorch if isinstance(config, TRMConfig) else HRMTorch)(config, dtype)
