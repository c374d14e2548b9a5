"""HRM ACT-v1: the H/L recurrence with the 1-step gradient and the ACT (Q-learning halting) wrapper.

Everything here is a pure function of (params, config, carry, batch, rng); `config` is a frozen,
hashable dataclass and can be a static argument of `jax.jit`. Numerics follow the reference
(sapientinc/HRM models/hrm/hrm_act_v1.py).

TRM (hrm_jax/trm.py) is built from this module's parts: the embeddings and heads (`ACTInner`), the block
stack (`ReasoningModule`), the carry and its refresh, and the parameter init, segment and ACT wrapper,
which take a family's own parts (inner module, recurrence) as arguments, HRM's by default; the halting rule
is the config's (`halts`).

params = {"dense":  Flax params trained by AdamATan2,
          "buffers": {"H_init": f32[hidden], "L_init": f32[hidden]}  (fixed, saved, never trained),
          "puzzle_emb": f32[num_puzzle_identifiers, puzzle_emb_ndim]  (only if puzzle_emb_ndim > 0;
                        trained by sparse SignSGD, never by the dense optimizer)}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from hrm_jax.config import HRMConfig
from hrm_jax.layers import Block, CastedEmbedding, CastedLinear, rotary_cos_sin, trunc_normal_init
from hrm_jax.parallel import global_rows
from hrm_jax.types import Batch, Params

DATA_KEYS = ("inputs", "labels", "puzzle_identifiers")

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def forward_dtype(config: HRMConfig) -> jnp.dtype:
    return _DTYPES[config.forward_dtype]


@flax.struct.dataclass
class ACTCarry:
    """State carried between ACT segments (and between training batches)."""

    z_H: jax.Array  # [batch, total_seq_len, hidden], forward dtype
    z_L: jax.Array  # [batch, total_seq_len, hidden], forward dtype
    steps: jax.Array  # int32[batch]: segments run on the current example
    halted: jax.Array  # bool[batch]: the row takes a new example at the next step
    current_data: dict[str, jax.Array]  # DATA_KEYS -> the examples being worked on


# Flax modules -------------------------------------------------------------------------------
class ReasoningModule(nn.Module):
    """A stack of `num_layers` blocks run on h + injection: one HRM level (H or L), or TRM's one network.

    block: the block class (HRM's post-norm attention block; TRM's mlp_t variant passes its own)."""

    config: Any  # HRMConfig or TRMConfig
    num_layers: int
    block: type[nn.Module] = Block

    def setup(self) -> None:
        self.layers = [self.block(self.config) for _ in range(self.num_layers)]

    def __call__(self, h: jax.Array, injection: jax.Array, cos_sin) -> jax.Array:
        h = h + injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


class ACTInner(nn.Module):
    """What both families' inner models set up alike (the references' `_Inner` classes): the token, puzzle and
    position embeddings and the two heads. A family's subclass adds its reasoning modules in `setup` and an
    `init_all` that touches every parameter; the recurrence itself is a pure function (`inner_forward`)."""

    config: Any  # HRMConfig or TRMConfig

    def setup(self) -> None:
        cfg, dtype = self.config, forward_dtype(self.config)
        embed_std = 1.0 / math.sqrt(cfg.hidden_size)
        self.embed_tokens = CastedEmbedding(cfg.vocab_size, cfg.hidden_size, embed_std, dtype)
        if cfg.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(cfg.total_seq_len, cfg.hidden_size, embed_std, dtype)
        self.lm_head = CastedLinear(cfg.vocab_size)
        # Q starts (almost) at "never halt": weight 0, bias -5 (reference: faster bootstrapping).
        self.q_head = CastedLinear(2, use_bias=True, kernel_init=nn.initializers.zeros_init(),
                                   bias_init=nn.initializers.constant(-5.0))

    def embed(self, inputs: jax.Array, puzzle_rows: jax.Array) -> jax.Array:
        """inputs int32[B, seq_len], puzzle_rows [B, puzzle_emb_ndim] -> [B, total_seq_len, hidden].

        The puzzle row fills the first of num_puzzle_slots prepended positions, zero-padded."""
        cfg, slots = self.config, self.config.num_puzzle_slots
        embedding = self.embed_tokens(inputs)
        if cfg.puzzle_emb_ndim > 0:
            pad = slots * cfg.hidden_size - cfg.puzzle_emb_ndim
            rows = jnp.pad(puzzle_rows.astype(embedding.dtype), ((0, 0), (0, pad)))
            embedding = jnp.concatenate([rows.reshape(-1, slots, cfg.hidden_size), embedding], axis=1)
        if cfg.pos_encodings == "learned":
            # 1/sqrt(2) keeps the variance of the sum of two unit embeddings.
            embedding = 0.707106781 * (embedding + self.embed_pos.table())
        return math.sqrt(cfg.hidden_size) * embedding

    def heads(self, z_H: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> logits [B, seq_len, vocab] (puzzle slots dropped), q_logits f32[B, 2] from position 0."""
        logits = self.lm_head(z_H)[:, self.config.num_puzzle_slots:]
        q_logits = self.q_head(z_H[:, 0]).astype(jnp.float32)
        return logits, q_logits


class HRMInner(ACTInner):
    """HRM's parameters: the shared embeddings and heads, an H level and an L level."""

    def setup(self) -> None:
        super().setup()
        self.H_level = ReasoningModule(self.config, self.config.H_layers)
        self.L_level = ReasoningModule(self.config, self.config.L_layers)

    def l_level(self, z_L: jax.Array, injection: jax.Array, cos_sin) -> jax.Array:
        return self.L_level(z_L, injection, cos_sin)

    def h_level(self, z_H: jax.Array, injection: jax.Array, cos_sin) -> jax.Array:
        return self.H_level(z_H, injection, cos_sin)

    def init_all(self, inputs: jax.Array, puzzle_rows: jax.Array):
        x = self.embed(inputs, puzzle_rows)
        z = self.h_level(self.l_level(x, x, None), x, None)
        return self.heads(z)


def _apply(config: HRMConfig, dense: Params, method, *args):
    return HRMInner(config).apply({"params": dense}, *args, method=method)


def _cos_sin(config: HRMConfig):
    if config.pos_encodings != "rope":
        return None
    return rotary_cos_sin(config.total_seq_len, config.head_dim, config.rope_theta)


# Parameters and carry -----------------------------------------------------------------------
def init_params(config: HRMConfig, rng: jax.Array, *, inner: type[ACTInner] = HRMInner) -> Params:
    """Fresh parameters as the reference initialises them (see module docstring for the layout).

    inner: the family's parameter container (TRM passes its own; buffers and puzzle table are alike)."""
    k_dense, k_h, k_l = jax.random.split(rng, 3)
    inputs = jnp.zeros((1, config.seq_len), jnp.int32)
    rows = jnp.zeros((1, config.puzzle_emb_ndim), jnp.float32)
    dense = inner(config).init(k_dense, inputs, rows, method=inner.init_all)["params"]
    # H_init/L_init are forward-dtype buffers in the reference: round to that dtype, store as f32.
    dtype = forward_dtype(config)
    init = trunc_normal_init(1.0)
    buffers = {"H_init": init(k_h, (config.hidden_size,)).astype(dtype).astype(jnp.float32),
               "L_init": init(k_l, (config.hidden_size,)).astype(dtype).astype(jnp.float32)}
    params = {"dense": dense, "buffers": buffers}
    if config.puzzle_emb_ndim > 0:
        # Zero-initialised, as the reference (init_std=0).
        params["puzzle_emb"] = jnp.zeros((config.num_puzzle_identifiers, config.puzzle_emb_ndim), jnp.float32)
    return params


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def initial_carry(config: HRMConfig, batch: Batch) -> ACTCarry:
    """A carry whose rows are all halted, so the first act_step loads every row from `batch`."""
    batch_size = batch["inputs"].shape[0]
    shape, dtype = (batch_size, config.total_seq_len, config.hidden_size), forward_dtype(config)
    # Two distinct buffers: a train step that donates the carry must not see one buffer twice.
    return ACTCarry(z_H=jnp.zeros(shape, dtype), z_L=jnp.zeros(shape, dtype), steps=jnp.zeros((batch_size,), jnp.int32),
                    halted=jnp.ones((batch_size,), jnp.bool_),
                    current_data={k: jnp.zeros_like(jnp.asarray(batch[k], jnp.int32)) for k in DATA_KEYS})


def refresh_carry(params: Params, config: HRMConfig, carry: ACTCarry, batch: Batch) -> ACTCarry:
    """Halted rows restart from H_init/L_init with the batch's example at that row; others keep theirs.

    As the reference, the incoming example at a non-halted row is dropped (the reference's pretrain.py keeps
    the carry across batches; models/hrm/hrm_act_v1.py `reset_carry` replaces only halted rows).
    """
    halted = carry.halted
    dtype = forward_dtype(config)
    reset = halted[:, None, None]
    z_H = jnp.where(reset, params["buffers"]["H_init"].astype(dtype), carry.z_H)
    z_L = jnp.where(reset, params["buffers"]["L_init"].astype(dtype), carry.z_L)
    data = {}
    for key, old in carry.current_data.items():
        new = jnp.asarray(batch[key], old.dtype)
        data[key] = jnp.where(halted.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return ACTCarry(z_H=z_H, z_L=z_L, steps=jnp.where(halted, 0, carry.steps), halted=halted,
                    current_data=data)


def gather_puzzle_rows(params: Params, config: HRMConfig, puzzle_identifiers: jax.Array) -> jax.Array:
    """Rows of the puzzle-embedding table for a batch: [B, puzzle_emb_ndim] ([B, 0] if none)."""
    if config.puzzle_emb_ndim == 0:
        return jnp.zeros((puzzle_identifiers.shape[0], 0), jnp.float32)
    return jnp.take(params["puzzle_emb"], puzzle_identifiers, axis=0)


# The recurrence -----------------------------------------------------------------------------
def inner_forward(dense: Params, config: HRMConfig, z_H: jax.Array, z_L: jax.Array,
                  x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """H_cycles x L_cycles L-updates and H_cycles H-updates; gradient through the last of each only.

    Order (reference): for each H cycle, L_cycles times z_L <- L(z_L, z_H + x), then z_H <- H(z_H, z_L).
    Every step but the final L-update and the final H-update runs on stop-gradient copies of the
    params and of x, so no tangent enters the loops and XLA never builds their backward pass.
    """
    cos_sin = _cos_sin(config)

    def l_step(p, z_L, z_H, x):
        return _apply(config, p, HRMInner.l_level, z_L, z_H + x, cos_sin)

    def h_step(p, z_H, z_L):
        return _apply(config, p, HRMInner.h_level, z_H, z_L, cos_sin)

    frozen, x_frozen = jax.lax.stop_gradient(dense), jax.lax.stop_gradient(x)

    def l_steps(n, z_L, z_H):
        return jax.lax.fori_loop(0, n, lambda _, zl: l_step(frozen, zl, z_H, x_frozen), z_L)

    def h_cycle(state, _):
        z_H, z_L = state
        z_L = l_steps(config.L_cycles, z_L, z_H)
        return (h_step(frozen, z_H, z_L), z_L), None

    (z_H, z_L), _ = jax.lax.scan(h_cycle, (z_H, z_L), None, length=config.H_cycles - 1)
    z_L = l_steps(config.L_cycles - 1, z_L, z_H)
    z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)

    # The 1-step gradient: one L-update and one H-update with gradients.
    z_L = l_step(dense, z_L, z_H, x)
    z_H = h_step(dense, z_H, z_L)
    return z_H, z_L


def segment_forward(params: Params, config: HRMConfig, carry: ACTCarry, puzzle_rows: jax.Array, *,
                    inner: type[ACTInner] = HRMInner, recurrence: Callable[..., Any] = inner_forward):
    """One inner forward on the carry's data -> (z_H, z_L, logits, q_logits f32[B, 2]).

    inner, recurrence: the family's parameter container and its `inner_forward` (TRM passes its own)."""
    # Every layer casts its f32 parameters to the compute dtype; casting once here keeps those
    # converts out of the H/L loops (the same values, so the result is unchanged).
    dtype = forward_dtype(config)
    dense = jax.tree_util.tree_map(lambda p: p.astype(dtype), params["dense"])
    module = inner(config)
    x = module.apply({"params": dense}, carry.current_data["inputs"], puzzle_rows, method=inner.embed)
    z_H, z_L = recurrence(dense, config, carry.z_H, carry.z_L, x)
    logits, q_logits = module.apply({"params": dense}, z_H, method=inner.heads)
    return z_H, z_L, logits, q_logits


def halt_signal(config: HRMConfig, q_halt_logits: jax.Array, q_continue_logits: jax.Array) -> jax.Array:
    """Where the Q head asks to stop (without exploration): the family's rule, `config.halts` (HRM: q_halt >
    q_continue; TRM: q_halt > 0 under no_ACT_continue)."""
    return config.halts(q_halt_logits, q_continue_logits)


def act_segment(params: Params, config: HRMConfig, carry: ACTCarry, puzzle_rows: jax.Array,
                rng: jax.Array | None, *, train: bool, axis_name: str | None = None,
                forward: Callable[..., Any] = segment_forward,
                target_q: bool = True) -> tuple[ACTCarry, dict[str, jax.Array]]:
    """One ACT segment on a refreshed carry. Differentiable w.r.t. params["dense"] and puzzle_rows.

    Returns the next carry (detached) and outputs: logits [B, seq_len, vocab] (forward dtype),
    q_halt_logits / q_continue_logits f32[B], and when training target_q_continue f32[B].
    axis_name: inside shard_map over the batch (hrm_jax.parallel), the mesh axis; exploration is
    then drawn for the global batch and this device's rows are taken from it.
    forward, target_q: the family's segment_forward, and whether training bootstraps a target Q (TRM's
    no_ACT_continue turns it off); the defaults are HRM's. Halting follows the config's rule (halt_signal).
    """
    z_H, z_L, logits, q_logits = forward(params, config, carry, puzzle_rows)
    z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)
    outputs = {"logits": logits, "q_halt_logits": q_logits[:, 0], "q_continue_logits": q_logits[:, 1]}

    steps = carry.steps + 1
    is_last = steps >= config.halt_max_steps
    halted = is_last
    if train and config.halt_max_steps > 1:
        if rng is None:
            raise ValueError("act_segment(train=True) needs an rng key for halting exploration")
        q_halt, q_cont = jax.lax.stop_gradient(q_logits[:, 0]), jax.lax.stop_gradient(q_logits[:, 1])
        halted = halted | halt_signal(config, q_halt, q_cont)
        halted = halted & (steps >= min_halt_steps(config, rng, steps.shape[0], axis_name))
        if target_q:
            # Target Q from a second full inner forward on the new carry, without gradient (the
            # reference's PQN-style bootstrapping: no replay buffer, no target network).
            next_carry = carry.replace(z_H=z_H, z_L=z_L)
            frozen = jax.lax.stop_gradient({"dense": params["dense"]})
            *_, next_q = forward(frozen, config, next_carry, jax.lax.stop_gradient(puzzle_rows))
            target = jnp.where(is_last, next_q[:, 0], jnp.maximum(next_q[:, 0], next_q[:, 1]))
            outputs["target_q_continue"] = jax.nn.sigmoid(target)

    new_carry = ACTCarry(z_H=z_H, z_L=z_L, steps=steps, halted=halted, current_data=carry.current_data)
    return new_carry, outputs


def min_halt_steps(config: HRMConfig, rng: jax.Array, batch_size: int, axis_name: str | None) -> jax.Array:
    """Exploration: one uniform per row; below the probability, a minimum of U{2..halt_max_steps}.

    Drawn for the global batch and sliced to this device's rows, so the draws do not depend on the
    number of devices."""
    total, offset = global_rows(batch_size, axis_name)
    k_explore, k_steps = jax.random.split(rng)
    explore = jax.random.uniform(k_explore, (total,)) < config.halt_exploration_prob
    minimum = jax.random.randint(k_steps, (total,), 2, config.halt_max_steps + 1, jnp.int32)
    return jax.lax.dynamic_slice_in_dim(jnp.where(explore, minimum, 0), offset, batch_size)


def act_step(params: Params, config: HRMConfig, carry: ACTCarry, batch: Batch, rng: jax.Array | None,
             *, train: bool) -> tuple[ACTCarry, dict[str, jax.Array]]:
    """refresh_carry + one act_segment: the reference's HierarchicalReasoningModel_ACTV1.forward."""
    carry = refresh_carry(params, config, carry, batch)
    rows = gather_puzzle_rows(params, config, carry.current_data["puzzle_identifiers"])
    return act_segment(params, config, carry, rows, rng, train=train)
