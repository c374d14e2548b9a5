"""TRM ACT-v1: one tiny network recursing on two latents, with the full last recursion on the tape.

The same interface as hrm_jax.model (params layout, ACTCarry, `init_params`, `initial_carry`,
`refresh_carry`, `gather_puzzle_rows`, `act_segment`, `act_step`), so losses, the train step and
evaluation take either family. Numerics follow the reference (SamsungSAILMontreal/TinyRecursiveModels,
models/recursive_reasoning/trm.py); what differs from HRM:

- one `L_level` (L_layers blocks) serves both updates: z_L <- net(z_L, z_H + x) L_cycles times, then
  z_H <- net(z_H, z_L); H_cycles such recursions, the first H_cycles - 1 without gradient and the
  last one entirely with it (no 1-step approximation); the carry leaves the segment detached;
- the puzzle embedding fills slot 0 of `num_puzzle_slots` prepended positions (zeros after), and the
  Q head reads position 0;
- `mlp_t`: the attention of each block is replaced by a SwiGLU across the sequence (on the
  transposed activations [B, hidden, seq], with the residual add and RMSNorm taken while transposed);
- `no_ACT_continue` (default): training halts on q_halt > 0, with no continue loss and no target-Q
  forward. With it off, the target Q is HRM's (a second forward from the new carry). The reference's
  own False branch unpacks five values from its inner model's three and would raise; this is
  what that line evidently means (and what HRM's ACT wrapper does).

params = {"dense": Flax params of TRMInner (trained by AdamATan2),
          "buffers": {"H_init", "L_init": f32[hidden]} (forward-dtype values, never trained),
          "puzzle_emb": f32[num_puzzle_identifiers, puzzle_emb_ndim] (if puzzle_emb_ndim > 0)}
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hrm_jax.layers import (
    Attention,
    CastedEmbedding,
    CastedLinear,
    LinearKernel,
    SwiGLU,
    add_rms_norm,
    rotary_cos_sin,
    trunc_normal_init,
)
from hrm_jax.model import (
    DATA_KEYS,
    ACTCarry,
    Batch,
    Params,
    count_params,
    forward_dtype,
    gather_puzzle_rows,
    initial_carry,
    min_halt_steps,
    refresh_carry,
)
from hrm_jax.trm_config import TRMConfig
from kernels_pallas.swiglu_matmul import swiglu_matmul_reference

__all__ = [
    "DATA_KEYS",
    "ACTCarry",
    "TRMInner",
    "act_segment",
    "act_step",
    "count_params",
    "gather_puzzle_rows",
    "halt_signal",
    "init_params",
    "initial_carry",
    "inner_forward",
    "refresh_carry",
    "segment_forward",
]


# Flax modules -------------------------------------------------------------------------------
class SequenceSwiGLU(nn.Module):
    """SwiGLU over the last axis of width `features` (the mlp_t token mixer: features = total_seq_len)."""

    features: int
    intermediate: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = LinearKernel(self.features, 2 * self.intermediate, name="gate_up_proj")(x.dtype)
        return CastedLinear(self.features, name="down_proj")(swiglu_matmul_reference(x, gate_up))


class TRMBlock(nn.Module):
    """Post-norm block: token mixing (attention, or mlp_t across positions), then the channel SwiGLU."""

    config: TRMConfig

    @nn.compact
    def __call__(self, h: jax.Array, cos_sin) -> jax.Array:
        cfg = self.config
        eps, impl = cfg.rms_norm_eps, cfg.norm_impl
        if cfg.mlp_t:
            # The reference normalises over the *sequence* axis here: the norm runs while transposed.
            h_t = jnp.swapaxes(h, 1, 2)  # [B, hidden, seq]
            mixed = SequenceSwiGLU(cfg.total_seq_len, cfg.sequence_intermediate_size, name="mlp_t")(h_t)
            h = jnp.swapaxes(add_rms_norm(h_t, mixed, eps, impl), 1, 2)
        else:
            h = add_rms_norm(h, Attention(cfg, name="self_attn")(h, cos_sin), eps, impl)
        return add_rms_norm(h, SwiGLU(cfg, name="mlp")(h), eps, impl)


class TRMReasoningModule(nn.Module):
    """The one network: add the injection, then the L_layers blocks."""

    config: TRMConfig

    def setup(self) -> None:
        self.layers = [TRMBlock(self.config) for _ in range(self.config.L_layers)]

    def __call__(self, h: jax.Array, injection: jax.Array, cos_sin) -> jax.Array:
        h = h + injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


class TRMInner(nn.Module):
    """Parameter container; the recursion lives in `inner_forward` (a pure function)."""

    config: TRMConfig

    def setup(self) -> None:
        cfg, dtype = self.config, forward_dtype(self.config)
        embed_std = 1.0 / math.sqrt(cfg.hidden_size)
        self.embed_tokens = CastedEmbedding(cfg.vocab_size, cfg.hidden_size, embed_std, dtype)
        if cfg.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(cfg.total_seq_len, cfg.hidden_size, embed_std, dtype)
        self.lm_head = CastedLinear(cfg.vocab_size)
        # As HRM: Q starts at "never halt" (weight 0, bias -5).
        self.q_head = CastedLinear(2, use_bias=True, kernel_init=nn.initializers.zeros_init(),
                                   bias_init=nn.initializers.constant(-5.0))
        self.L_level = TRMReasoningModule(cfg)

    def embed(self, inputs: jax.Array, puzzle_rows: jax.Array) -> jax.Array:
        """inputs int32[B, seq_len], puzzle_rows [B, puzzle_emb_ndim] -> [B, total_seq_len, hidden]."""
        cfg = self.config
        embedding = self.embed_tokens(inputs)
        if cfg.puzzle_emb_ndim > 0:
            pad = cfg.num_puzzle_slots * cfg.hidden_size - cfg.puzzle_emb_ndim
            rows = jnp.pad(puzzle_rows.astype(embedding.dtype), ((0, 0), (0, pad)))
            rows = rows.reshape(-1, cfg.num_puzzle_slots, cfg.hidden_size)
            embedding = jnp.concatenate([rows, embedding], axis=1)
        if cfg.pos_encodings == "learned":
            embedding = 0.707106781 * (embedding + self.embed_pos.table())
        return math.sqrt(cfg.hidden_size) * embedding

    def net(self, h: jax.Array, injection: jax.Array, cos_sin) -> jax.Array:
        return self.L_level(h, injection, cos_sin)

    def heads(self, z_H: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> logits [B, seq_len, vocab] (puzzle slots dropped), q_logits f32[B, 2] from position 0."""
        logits = self.lm_head(z_H)[:, self.config.num_puzzle_slots:]
        q_logits = self.q_head(z_H[:, 0]).astype(jnp.float32)
        return logits, q_logits

    def init_all(self, inputs: jax.Array, puzzle_rows: jax.Array):
        x = self.embed(inputs, puzzle_rows)
        return self.heads(self.net(x, x, None))


def _apply(config: TRMConfig, dense: Params, method, *args):
    return TRMInner(config).apply({"params": dense}, *args, method=method)


def _cos_sin(config: TRMConfig):
    if config.pos_encodings != "rope" or config.mlp_t:
        return None
    return rotary_cos_sin(config.total_seq_len, config.head_dim, config.rope_theta)


# Parameters ---------------------------------------------------------------------------------
def init_params(config: TRMConfig, rng: jax.Array) -> Params:
    """Fresh parameters as the reference initialises them (layout in the module docstring)."""
    k_dense, k_h, k_l = jax.random.split(rng, 3)
    inputs = jnp.zeros((1, config.seq_len), jnp.int32)
    rows = jnp.zeros((1, config.puzzle_emb_ndim), jnp.float32)
    dense = TRMInner(config).init(k_dense, inputs, rows, method=TRMInner.init_all)["params"]
    dtype = forward_dtype(config)
    init = trunc_normal_init(1.0)
    buffers = {"H_init": init(k_h, (config.hidden_size,)).astype(dtype).astype(jnp.float32),
               "L_init": init(k_l, (config.hidden_size,)).astype(dtype).astype(jnp.float32)}
    params = {"dense": dense, "buffers": buffers}
    if config.puzzle_emb_ndim > 0:
        params["puzzle_emb"] = jnp.zeros((config.num_puzzle_identifiers, config.puzzle_emb_ndim), jnp.float32)
    return params


# The recursion ------------------------------------------------------------------------------
def recursion(dense: Params, config: TRMConfig, z_H: jax.Array, z_L: jax.Array, x: jax.Array,
              cos_sin, *, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
    """One full recursion: L_cycles latent updates z_L <- net(z_L, z_H + x), then z_H <- net(z_H, z_L).

    unroll: a Python loop instead of a fori_loop, for the differentiated recursion: differentiating the
    fori_loop (a scan) stacks every update's residuals into loop buffers (dynamic-update-slice copies), which
    made the trm_sudoku_mlp step 180 ms instead of 133 ms on an H200 (BUILD_NOTES, TRM). Same math.
    """
    def l_update(_, z_L):
        return _apply(config, dense, TRMInner.net, z_L, z_H + x, cos_sin)

    if unroll:
        for i in range(config.L_cycles):
            z_L = l_update(i, z_L)
    else:
        z_L = jax.lax.fori_loop(0, config.L_cycles, l_update, z_L)
    return _apply(config, dense, TRMInner.net, z_H, z_L, cos_sin), z_L


def inner_forward(dense: Params, config: TRMConfig, z_H: jax.Array, z_L: jax.Array,
                  x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """H_cycles recursions; the first H_cycles - 1 on stop-gradient copies, the last fully differentiated.

    z_H, z_L, x: [B, total_seq_len, hidden] in the forward dtype.
    """
    cos_sin = _cos_sin(config)
    frozen, x_frozen = jax.lax.stop_gradient(dense), jax.lax.stop_gradient(x)
    z_H, z_L = jax.lax.fori_loop(0, config.H_cycles - 1,
                                 lambda _, z: recursion(frozen, config, *z, x_frozen, cos_sin), (z_H, z_L))
    z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)
    return recursion(dense, config, z_H, z_L, x, cos_sin, unroll=True)


def segment_forward(params: Params, config: TRMConfig, carry: ACTCarry, puzzle_rows: jax.Array):
    """One inner forward on the carry's data -> (z_H, z_L, logits, q_logits f32[B, 2])."""
    dtype = forward_dtype(config)
    dense = jax.tree_util.tree_map(lambda p: p.astype(dtype), params["dense"])
    x = _apply(config, dense, TRMInner.embed, carry.current_data["inputs"], puzzle_rows)
    z_H, z_L = inner_forward(dense, config, carry.z_H, carry.z_L, x)
    logits, q_logits = _apply(config, dense, TRMInner.heads, z_H)
    return z_H, z_L, logits, q_logits


def halt_signal(config: TRMConfig, q_halt_logits: jax.Array, q_continue_logits: jax.Array) -> jax.Array:
    """Where the Q head asks to stop: q_halt > 0 with no_ACT_continue, else q_halt > q_continue (HRM's)."""
    if config.no_ACT_continue:
        return q_halt_logits > 0
    return q_halt_logits > q_continue_logits


def act_segment(params: Params, config: TRMConfig, carry: ACTCarry, puzzle_rows: jax.Array,
                rng: jax.Array | None, *, train: bool,
                axis_name: str | None = None) -> tuple[ACTCarry, dict[str, jax.Array]]:
    """One ACT segment on a refreshed carry, as hrm_jax.model.act_segment (same inputs and outputs).

    Outputs: logits, q_halt_logits, q_continue_logits; target_q_continue only when training with
    no_ACT_continue=False (so hrm_jax.losses.act_loss adds the continue loss only then).
    """
    z_H, z_L, logits, q_logits = segment_forward(params, config, carry, puzzle_rows)
    z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)
    outputs = {"logits": logits, "q_halt_logits": q_logits[:, 0], "q_continue_logits": q_logits[:, 1]}

    steps = carry.steps + 1
    is_last = steps >= config.halt_max_steps
    halted = is_last
    if train and config.halt_max_steps > 1:
        if rng is None:
            raise ValueError("act_segment(train=True) needs an rng key for halting exploration")
        q = jax.lax.stop_gradient(q_logits)
        halted = halted | halt_signal(config, q[:, 0], q[:, 1])
        halted = halted & (steps >= min_halt_steps(config, rng, steps.shape[0], axis_name))
        if not config.no_ACT_continue:
            next_carry = carry.replace(z_H=z_H, z_L=z_L)
            frozen = jax.lax.stop_gradient({"dense": params["dense"]})
            *_, next_q = segment_forward(frozen, config, next_carry, jax.lax.stop_gradient(puzzle_rows))
            target = jnp.where(is_last, next_q[:, 0], jnp.maximum(next_q[:, 0], next_q[:, 1]))
            outputs["target_q_continue"] = jax.nn.sigmoid(target)

    new_carry = ACTCarry(z_H=z_H, z_L=z_L, steps=steps, halted=halted, current_data=carry.current_data)
    return new_carry, outputs


def act_step(params: Params, config: TRMConfig, carry: ACTCarry, batch: Batch, rng: jax.Array | None,
             *, train: bool) -> tuple[ACTCarry, dict[str, jax.Array]]:
    """refresh_carry + one act_segment: the reference's TinyRecursiveReasoningModel_ACTV1.forward."""
    carry = refresh_carry(params, config, carry, batch)
    rows = gather_puzzle_rows(params, config, carry.current_data["puzzle_identifiers"])
    return act_segment(params, config, carry, rows, rng, train=train)
