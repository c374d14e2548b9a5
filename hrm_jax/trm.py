"""TRM ACT-v1: one tiny network recursing on two latents, with the full last recursion on the tape.

The same interface as hrm_jax.model (params layout, ACTCarry, `init_params`, `initial_carry`,
`refresh_carry`, `gather_puzzle_rows`, `act_segment`, `act_step`), so losses, the train step and
evaluation take either family. Numerics follow the reference (SamsungSAILMontreal/TinyRecursiveModels,
models/recursive_reasoning/trm.py). The embeddings, heads, blocks, initialisers, carry and ACT wrapper
are HRM's (hrm_jax.model, hrm_jax.layers); this module holds what differs:

- one `L_level` (L_layers blocks) serves both updates: z_L <- net(z_L, z_H + x) L_cycles times, then
  z_H <- net(z_H, z_L); H_cycles such recursions, the first H_cycles - 1 without gradient and the
  last one entirely with it (no 1-step approximation); the carry leaves the segment detached;
- `puzzle_emb_len` prepended positions (16 in the paper's configs; HRM's ceil(ndim / hidden) when 0):
  the puzzle embedding fills the first, zeros the rest;
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

import flax.linen as nn
import jax
import jax.numpy as jnp

from hrm_jax import model
from hrm_jax.layers import Block, CastedLinear, LinearKernel, SwiGLU, add_rms_norm, rotary_cos_sin
from hrm_jax.model import (
    DATA_KEYS,
    ACTCarry,
    ACTInner,
    Batch,
    Params,
    ReasoningModule,
    count_params,
    gather_puzzle_rows,
    halt_signal,
    initial_carry,
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
    "block_class",
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


class MLPTBlock(nn.Module):
    """HRM's post-norm block with the attention replaced by a SwiGLU across positions (mlp_t)."""

    config: TRMConfig

    @nn.compact
    def __call__(self, h: jax.Array, cos_sin) -> jax.Array:
        cfg = self.config
        eps, impl = cfg.rms_norm_eps, cfg.norm_impl
        # The reference normalises over the *sequence* axis here: the norm runs while transposed.
        h_t = jnp.swapaxes(h, 1, 2)  # [B, hidden, seq]
        mixed = SequenceSwiGLU(cfg.total_seq_len, cfg.sequence_intermediate_size, name="mlp_t")(h_t)
        h = jnp.swapaxes(add_rms_norm(h_t, mixed, eps, impl), 1, 2)
        return add_rms_norm(h, SwiGLU(cfg, name="mlp")(h), eps, impl)


def block_class(config: TRMConfig) -> type[nn.Module]:
    """TRM's block: MLPTBlock with mlp_t, else HRM's attention block (the reference's block is the same)."""
    return MLPTBlock if config.mlp_t else Block


class TRMInner(ACTInner):
    """TRM's parameters: the shared embeddings and heads and the one network, named L_level as in the reference."""

    def setup(self) -> None:
        super().setup()
        self.L_level = ReasoningModule(self.config, self.config.L_layers, block_class(self.config))

    def net(self, h: jax.Array, injection: jax.Array, cos_sin) -> jax.Array:
        return self.L_level(h, injection, cos_sin)

    def init_all(self, inputs: jax.Array, puzzle_rows: jax.Array):
        x = self.embed(inputs, puzzle_rows)
        return self.heads(self.net(x, x, None))


def _apply(config: TRMConfig, dense: Params, method, *args):
    return TRMInner(config).apply({"params": dense}, *args, method=method)


def _cos_sin(config: TRMConfig):
    if config.pos_encodings != "rope" or config.mlp_t:
        return None
    return rotary_cos_sin(config.total_seq_len, config.head_dim, config.rope_theta)


def init_params(config: TRMConfig, rng: jax.Array) -> Params:
    """Fresh parameters as the reference initialises them: HRM's initialisers on TRMInner's layout."""
    return model.init_params(config, rng, inner=TRMInner)


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
    """One inner forward on the carry's data -> (z_H, z_L, logits, q_logits f32[B, 2]) (model.segment_forward)."""
    return model.segment_forward(params, config, carry, puzzle_rows, inner=TRMInner, recurrence=inner_forward)


def act_segment(params: Params, config: TRMConfig, carry: ACTCarry, puzzle_rows: jax.Array,
                rng: jax.Array | None, *, train: bool,
                axis_name: str | None = None) -> tuple[ACTCarry, dict[str, jax.Array]]:
    """One ACT segment on a refreshed carry: hrm_jax.model.act_segment with TRM's forward (and TRMConfig.halts).

    Outputs: logits, q_halt_logits, q_continue_logits; target_q_continue only when training with
    no_ACT_continue=False (so hrm_jax.losses.act_loss adds the continue loss only then).
    """
    return model.act_segment(params, config, carry, puzzle_rows, rng, train=train, axis_name=axis_name,
                             forward=segment_forward, target_q=not config.no_ACT_continue)


def act_step(params: Params, config: TRMConfig, carry: ACTCarry, batch: Batch, rng: jax.Array | None,
             *, train: bool) -> tuple[ACTCarry, dict[str, jax.Array]]:
    """refresh_carry + one act_segment: the reference's TinyRecursiveReasoningModel_ACTV1.forward."""
    carry = refresh_carry(params, config, carry, batch)
    rows = gather_puzzle_rows(params, config, carry.current_data["puzzle_identifiers"])
    return act_segment(params, config, carry, rows, rng, train=train)
