"""An independent NumPy (float64) transcription of the reference TRM forward, for parity tests.

Written from the formulas of SamsungSAILMontreal/TinyRecursiveModels (models/layers.py,
models/recursive_reasoning/trm.py) with plain loops and no JAX; the attention, rotary and norm
pieces are those of tests/numpy_reference.py (the two references share models/layers.py).
"""

from __future__ import annotations

import numpy as np

from tests.numpy_reference import attention, rms_norm, rope_tables, swiglu, to_f64


def sequence_swiglu(x_t, layer):
    """The mlp_t SwiGLU on x_t [B, hidden, seq] (mixing positions)."""
    gate, up = np.split(x_t @ layer["mlp_t"]["gate_up_proj"]["kernel"], 2, axis=-1)
    return (gate / (1.0 + np.exp(-gate)) * up) @ layer["mlp_t"]["down_proj"]["kernel"]


def block(cfg, h, layer, rope):
    eps = cfg.rms_norm_eps
    if cfg.mlp_t:
        h_t = np.swapaxes(h, 1, 2)
        h = np.swapaxes(rms_norm(h_t + sequence_swiglu(h_t, layer), eps), 1, 2)
    else:
        h = rms_norm(h + attention(h, layer, cfg.num_heads, rope), eps)
    return rms_norm(h + swiglu(h, layer), eps)


def net(cfg, dense, h, injection, rope):
    h = h + injection
    for i in range(cfg.L_layers):
        h = block(cfg, h, dense["L_level"][f"layers_{i}"], rope)
    return h


def embed(cfg, dense, inputs, puzzle_rows):
    emb = dense["embed_tokens"]["embedding"][inputs]
    if cfg.puzzle_emb_ndim > 0:
        b, slots = inputs.shape[0], cfg.num_puzzle_slots
        padded = np.zeros((b, slots * cfg.hidden_size))
        padded[:, :cfg.puzzle_emb_ndim] = puzzle_rows
        emb = np.concatenate([padded.reshape(b, slots, cfg.hidden_size), emb], 1)
    if cfg.pos_encodings == "learned":
        emb = 0.707106781 * (emb + dense["embed_pos"]["embedding"])
    return np.sqrt(cfg.hidden_size) * emb


def rope_for(cfg):
    if cfg.pos_encodings != "rope" or cfg.mlp_t:
        return None
    return rope_tables(cfg.total_seq_len, cfg.head_dim, cfg.rope_theta)


def recursions(cfg, dense, z_H, z_L, x, count):
    rope = rope_for(cfg)
    for _ in range(count):
        for _ in range(cfg.L_cycles):
            z_L = net(cfg, dense, z_L, z_H + x, rope)
        z_H = net(cfg, dense, z_H, z_L, rope)
    return z_H, z_L


def heads(cfg, dense, z_H):
    logits = z_H @ dense["lm_head"]["kernel"]
    q = z_H[:, 0] @ dense["q_head"]["kernel"] + dense["q_head"]["bias"]
    return logits[:, cfg.num_puzzle_slots:], q


def inner_forward(cfg, params, z_H, z_L, inputs, puzzle_rows):
    """The reference's Inner.forward in float64: -> z_H, z_L, logits, q_logits [B, 2]."""
    dense = to_f64(params["dense"])
    z_H, z_L = np.asarray(z_H, np.float64), np.asarray(z_L, np.float64)
    x = embed(cfg, dense, np.asarray(inputs), np.asarray(puzzle_rows, np.float64))
    z_H, z_L = recursions(cfg, dense, z_H, z_L, x, cfg.H_cycles)
    return (z_H, z_L, *heads(cfg, dense, z_H))
