"""HRM ACT-v1 as a plain torch module for inference and export (ONNX, TensorRT, torch.export).

It computes the function of the reference's HierarchicalReasoningModel_ACTV1 in eval mode
(sapientinc/HRM models/hrm/hrm_act_v1.py, models/layers.py) and its `state_dict()` has the
reference's keys (`model.inner.H_level.layers.0.self_attn.qkv_proj.weight`, ...), so a released
checkpoint loads with `load_state_dict(strict=True)` once the torch.compile prefix `_orig_mod.` is
dropped (see export/convert.py). Written for tracing: no data-dependent Python control flow inside a
segment (resets are `torch.where`), RMSNorm spelled out in float32, attention through
`scaled_dot_product_attention` instead of flash-attn, rotary tables as non-persistent buffers.

Layout of the modules (mirrors the reference so the keys match):
    HRMTorch            the reference's ACTLossHead wrapper  -> key prefix "model."
      .model: HRMACT    HierarchicalReasoningModel_ACTV1      -> key prefix "inner."
        .inner: HRMInner  embeddings, H/L levels, heads, H_init/L_init (all but the levels: ACTInner)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hrm_jax.config import HRMConfig

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without weight; float32 (or wider) math, result in x's dtype (reference models/layers.py)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64 (test oracle)
    variance = x32.square().mean(-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [-x[d/2:], x[:d/2]]: the non-interleaved RoPE layout of the reference."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim], cos/sin f32[seq, head_dim]; math in f32 (or wider) as the reference."""
    x32 = x.to(torch.promote_types(x.dtype, cos.dtype))
    out = x32 * cos.unsqueeze(-2) + rotate_half(x32) * sin.unsqueeze(-2)
    return out.to(x.dtype)


def rotary_tables(num_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin f32[num_positions, head_dim] with the frequencies repeated twice (rotate-half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class CastedLinear(nn.Module):
    """F.linear with float32 weights [out, in] cast to the input's dtype (key names `weight`, `bias`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        # Values come from a checkpoint or export/convert.py; zeros keep construction deterministic.
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Module):
    """Table lookup in a float32 table [num, dim] cast to the compute dtype (key `embedding_weight`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight.to(dtype))


class PuzzleEmbedding(nn.Module):
    """The eval path of the reference's CastedSparseEmbedding: a persistent buffer `weights`."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weights = nn.Buffer(torch.zeros(num_embeddings, embedding_dim), persistent=True)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weights).to(dtype)


class Attention(nn.Module):
    """Non-causal multi-head self-attention; qkv_proj rows are q | k | v, heads contiguous."""

    def __init__(self, config: HRMConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = CastedLinear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = CastedLinear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        batch, seq, hidden = x.shape
        qkv = self.qkv_proj(x).view(batch, seq, 3 * self.num_heads, self.head_dim)
        query, key, value = qkv.split(self.num_heads, dim=2)
        if cos_sin is not None:
            query, key = apply_rotary(query, *cos_sin), apply_rotary(key, *cos_sin)
        # SDPA wants [batch, heads, seq, head_dim]; its default scale 1/sqrt(head_dim) is flash-attn's.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                             value.transpose(1, 2), is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, hidden))


class SwiGLU(nn.Module):
    """down(silu(gate) * up) over the last axis of width `features`; gate_up_proj rows are gate | up."""

    def __init__(self, features: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = CastedLinear(features, 2 * intermediate)
        self.down_proj = CastedLinear(intermediate, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm block: h = norm(h + attn(h)); h = norm(h + mlp(h))."""

    def __init__(self, config: HRMConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.eps = config.rms_norm_eps

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = rms_norm(h + self.self_attn(h, cos_sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class ReasoningModule(nn.Module):
    """A stack of `num_layers` blocks run on h + injection: one HRM level (H or L), or TRM's one network."""

    def __init__(self, config: HRMConfig, num_layers: int, block: type[nn.Module] = Block) -> None:
        super().__init__()
        self.layers = nn.ModuleList([block(config) for _ in range(num_layers)])

    def forward(self, h: torch.Tensor, injection: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = h + injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


class ACTInner(nn.Module):
    """What both families' inner models share: embeddings, heads, H_init/L_init and the segment around the
    recurrence. A family's subclass adds its reasoning modules and the method `recurrence(z_H, z_L, x, cos_sin)
    -> (z_H, z_L)` (HRMInner; TRM's in export/trm_torch_model.py). rope: whether the blocks rotate queries
    and keys (the tables are built then)."""

    def __init__(self, config: HRMConfig, dtype: torch.dtype, rope: bool) -> None:
        super().__init__()
        self.config, self.dtype = config, dtype
        hidden = config.hidden_size
        self.embed_tokens = CastedEmbedding(config.vocab_size, hidden)
        self.lm_head = CastedLinear(hidden, config.vocab_size)
        self.q_head = CastedLinear(hidden, 2, bias=True)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim)
        self.rope = rope
        if rope:
            cos, sin = rotary_tables(config.total_seq_len, config.head_dim, config.rope_theta)
            # Non-persistent, as the reference's RotaryEmbedding: not part of checkpoints.
            self.rope_cos = nn.Buffer(cos, persistent=False)
            self.rope_sin = nn.Buffer(sin, persistent=False)
        if config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(config.total_seq_len, hidden)
        # The reference keeps these in forward_dtype (bf16 for the paper's runs) and saves them.
        storage = TORCH_DTYPES[config.forward_dtype]
        self.H_init = nn.Buffer(torch.zeros(hidden, dtype=storage), persistent=True)
        self.L_init = nn.Buffer(torch.zeros(hidden, dtype=storage), persistent=True)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.rope else None

    def embed(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor,
              puzzle_rows: torch.Tensor | None = None) -> torch.Tensor:
        """inputs int[B, seq_len], puzzle_identifiers int[B] -> [B, total_seq_len, hidden].

        The puzzle row fills the first of num_puzzle_slots prepended positions, zero-padded. puzzle_rows
        f32[B, puzzle_emb_ndim], if given, replace the table lookup (training: the rows are a leaf tensor
        whose gradient feeds the sparse sign-SGD update)."""
        cfg, slots = self.config, self.config.num_puzzle_slots
        embedding = self.embed_tokens(inputs, self.dtype)
        if cfg.puzzle_emb_ndim > 0:
            if puzzle_rows is None:
                rows = self.puzzle_emb(puzzle_identifiers, self.dtype)
            else:
                rows = puzzle_rows.to(self.dtype)
            rows = F.pad(rows, (0, slots * cfg.hidden_size - cfg.puzzle_emb_ndim))
            embedding = torch.cat((rows.view(-1, slots, cfg.hidden_size), embedding), dim=-2)
        if cfg.pos_encodings == "learned":
            # The reference's literal 1/sqrt(2), kept for bit-compatibility.
            embedding = 0.707106781 * (embedding + self.embed_pos.embedding_weight.to(self.dtype))
        return math.sqrt(cfg.hidden_size) * embedding

    def heads(self, z_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> logits [B, seq_len, vocab] (puzzle slots dropped), q_halt f32[B], q_continue f32[B] (position 0)."""
        logits = self.lm_head(z_H)[:, self.config.num_puzzle_slots:]
        q_logits = self.q_head(z_H[:, 0]).to(torch.float32)
        return logits, q_logits[:, 0], q_logits[:, 1]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """H_init/L_init broadcast to [batch, total_seq_len, hidden] in the compute dtype."""
        shape = (batch_size, self.config.total_seq_len, self.config.hidden_size)
        return self.H_init.to(self.dtype).expand(shape), self.L_init.to(self.dtype).expand(shape)

    def restart_halted(self, halted: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor, steps: torch.Tensor):
        """Rows where `halted` restart: z_H/z_L from H_init/L_init (compute dtype), step count 0."""
        reset = halted.view(-1, 1, 1)
        h_init, l_init = self.initial_state(z_H.shape[0])
        return (torch.where(reset, h_init, z_H.to(self.dtype)), torch.where(reset, l_init, z_L.to(self.dtype)),
                torch.where(halted, torch.zeros_like(steps), steps))

    def forward(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor,
                puzzle_identifiers: torch.Tensor):
        """One segment: z_H, z_L [B, total_seq_len, hidden] -> (z_H, z_L, logits [B, seq_len, vocab],
        q_halt f32[B], q_continue f32[B]). Eval computes every step the same way, so the references' split
        into a no-grad part and a part with gradient is just the plain loop here."""
        x = self.embed(inputs, puzzle_identifiers)
        z_H, z_L = self.recurrence(z_H.to(self.dtype), z_L.to(self.dtype), x, self.cos_sin())
        return z_H, z_L, *self.heads(z_H)


class HRMInner(ACTInner):
    """HRM's segment: the shared parts with an H level and an L level."""

    def __init__(self, config: HRMConfig, dtype: torch.dtype) -> None:
        super().__init__(config, dtype, rope=config.pos_encodings == "rope")
        self.H_level = ReasoningModule(config, config.H_layers)
        self.L_level = ReasoningModule(config, config.L_layers)

    def recurrence(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, cos_sin):
        """H_cycles x (L_cycles L-updates z_L <- L(z_L, z_H + x), one H-update z_H <- H(z_H, z_L))."""
        for _ in range(self.config.H_cycles):
            for _ in range(self.config.L_cycles):
                z_L = self.L_level(z_L, z_H + x, cos_sin)
            z_H = self.H_level(z_H, z_L, cos_sin)
        return z_H, z_L


class SolveOutput(NamedTuple):
    """Result of `solve`: each row's outputs from the segment where it stopped."""

    logits: torch.Tensor  # [B, seq_len, vocab], compute dtype
    q_halt_logits: torch.Tensor  # f32[B]
    q_continue_logits: torch.Tensor  # f32[B]
    steps: torch.Tensor  # int32[B]: segments the row used (1..halt_max_steps)


class HRMACT(nn.Module):
    """The ACT wrapper (the reference's HierarchicalReasoningModel_ACTV1) in eval mode.

    A family supplies its segment as `inner_class` (same forward signature; export/trm_torch_model.py: TRM);
    the Q-head halting rule is its config's `halts`."""

    inner_class: type[nn.Module] = HRMInner

    def __init__(self, config: HRMConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.inner = self.inner_class(config, dtype)

    def halts(self, q_halt: torch.Tensor, q_continue: torch.Tensor) -> torch.Tensor:
        """The training-time halting rule without exploration: the family's, `config.halts` (HRMConfig.halts:
        q_halt > q_continue, as hrm_act_v1.py)."""
        return self.config.halts(q_halt, q_continue)

    def act_step(self, z_H, z_L, steps, halted, inputs, puzzle_identifiers,
                 new_inputs: torch.Tensor | None = None, new_puzzle_identifiers: torch.Tensor | None = None):
        """One ACT segment with the carry as tensors; eval semantics of the reference's forward.

        Carry: z_H, z_L [B, total_seq_len, hidden], steps int32[B], halted bool[B], inputs
        int[B, seq_len] and puzzle_identifiers int[B] (the carry's current data). Halted rows restart
        from H_init/L_init with step 0 and take new_inputs/new_puzzle_identifiers (the incoming batch;
        when omitted the batch is taken to be the current data, as in the reference's eval loop, which
        feeds the same batch every segment). A row halts only at config.halt_max_steps (eval ignores Q).
        Returns (z_H, z_L, steps, halted, inputs, puzzle_identifiers, logits, q_halt, q_continue).
        """
        z_H, z_L, steps = self.inner.restart_halted(halted, z_H, z_L, steps)
        if new_inputs is not None:
            inputs = torch.where(halted.view(-1, 1), new_inputs.to(inputs.dtype), inputs)
        if new_puzzle_identifiers is not None:
            puzzle_identifiers = torch.where(halted, new_puzzle_identifiers.to(puzzle_identifiers.dtype),
                                             puzzle_identifiers)
        z_H, z_L, logits, q_halt, q_continue = self.inner(z_H, z_L, inputs, puzzle_identifiers)
        steps = steps + 1
        halted = steps >= self.config.halt_max_steps
        return z_H, z_L, steps, halted, inputs, puzzle_identifiers, logits, q_halt, q_continue

    def solve(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor,
              halt_max_steps: int | None = None, early_halt: bool | torch.Tensor = False) -> SolveOutput:
        """Run up to halt_max_steps segments (default config.halt_max_steps) from H_init/L_init.

        early_halt=False is the reference's evaluation (pretrain.py `evaluate`): every row runs exactly
        halt_max_steps segments and the last segment's outputs are the answer. early_halt=True applies
        the reference's training-time halting rule without exploration (hrm_act_v1.py: halt when
        q_halt_logits > q_continue_logits): a row stops after the first segment where Q prefers to halt
        and keeps that segment's outputs. Stopped rows are still computed (a fixed graph for export) but
        ignored; in eager mode the loop ends once every row has stopped. early_halt may be a bool
        tensor, so that one exported graph (export/onnx.py) serves both rules.
        """
        n = self.config.halt_max_steps if halt_max_steps is None else int(halt_max_steps)
        if n < 1:
            raise ValueError(f"halt_max_steps must be >= 1, got {n}")
        batch = inputs.shape[0]
        z_H, z_L = self.inner.initial_state(batch)
        done = torch.zeros(batch, dtype=torch.bool, device=inputs.device)
        steps = torch.zeros(batch, dtype=torch.int32, device=inputs.device)
        out = None
        for _ in range(n):
            z_H, z_L, logits, q_halt, q_continue = self.inner(z_H, z_L, inputs, puzzle_identifiers)
            if out is None:
                out = SolveOutput(logits, q_halt, q_continue, steps + 1)
            else:
                keep = done.view(-1, 1, 1)
                out = SolveOutput(torch.where(keep, out.logits, logits),
                                  torch.where(done, out.q_halt_logits, q_halt),
                                  torch.where(done, out.q_continue_logits, q_continue),
                                  torch.where(done, out.steps, steps + 1))
            steps = steps + 1
            if isinstance(early_halt, torch.Tensor):
                done = done | (early_halt & self.halts(q_halt, q_continue))
            elif early_halt:
                done = done | self.halts(q_halt, q_continue)
            if _eager() and bool(done.all()):
                break
        return out


def _eager() -> bool:
    """True outside torch.export / dynamo / jit tracing, where a data-dependent break is allowed."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


class HRMTorch(nn.Module):
    """Top-level module: state_dict keys `model.inner.*` as the reference's training wrapper.

    forward(...) is HRMACT.act_step; solve(...) runs whole puzzles. Build with `from_config` and
    fill it with `load_state_dict` (a converted JAX checkpoint or a reference checkpoint).
    """

    act_class: type[HRMACT] = HRMACT

    def __init__(self, config: HRMConfig, dtype: torch.dtype | str | None = None) -> None:
        """dtype: compute dtype, default config.forward_dtype (float64 works too, as a test oracle)."""
        super().__init__()
        if isinstance(dtype, str):
            if dtype not in TORCH_DTYPES:
                raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
            dtype = TORCH_DTYPES[dtype]
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
        self.config = config
        self.model = self.act_class(config, dtype or TORCH_DTYPES[config.forward_dtype])
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (config.forward_dtype unless overridden at construction)."""
        return self.model.inner.dtype

    def forward(self, z_H, z_L, steps, halted, inputs, puzzle_identifiers,
                new_inputs: torch.Tensor | None = None, new_puzzle_identifiers: torch.Tensor | None = None):
        return self.model.act_step(z_H, z_L, steps, halted, inputs, puzzle_identifiers,
                                   new_inputs, new_puzzle_identifiers)

    def initial_carry(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor):
        """A carry with every row halted, so the first step loads `inputs` (z values are ignored)."""
        batch = inputs.shape[0]
        z = torch.zeros(batch, self.config.total_seq_len, self.config.hidden_size, dtype=self.dtype,
                        device=inputs.device)
        return (z, z, torch.zeros(batch, dtype=torch.int32, device=inputs.device),
                torch.ones(batch, dtype=torch.bool, device=inputs.device), inputs, puzzle_identifiers)

    @torch.no_grad()
    def solve(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor,
              halt_max_steps: int | None = None, early_halt: bool | torch.Tensor = False) -> SolveOutput:
        """See HRMACT.solve."""
        return self.model.solve(inputs, puzzle_identifiers, halt_max_steps, early_halt)
