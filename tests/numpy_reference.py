"""An independent NumPy (float64) transcription of the reference HRM forward, for parity tests.

Written from the formulas of sapientinc/HRM (models/layers.py, models/hrm/hrm_act_v1.py), with
plain loops and no JAX, so that a bug in hrm_jax does not repeat itself here.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope_tables(positions, head_dim, theta):
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    freqs = np.outer(np.arange(positions), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb), np.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, S, H, D]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(x, layer, num_heads, rope):
    b, s, hidden = x.shape
    d = hidden // num_heads
    qkv = x @ layer["self_attn"]["qkv_proj"]["kernel"]
    q, k, v = (qkv[..., i * hidden:(i + 1) * hidden].reshape(b, s, num_heads, d) for i in range(3))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    out = np.einsum("bhqk,bkhd->bqhd", softmax(scores), v).reshape(b, s, hidden)
    return out @ layer["self_attn"]["o_proj"]["kernel"]


def swiglu(x, layer):
    gate_up = x @ layer["mlp"]["gate_up_proj"]["kernel"]
    gate, up = np.split(gate_up, 2, axis=-1)
    silu = gate / (1.0 + np.exp(-gate))
    return (silu * up) @ layer["mlp"]["down_proj"]["kernel"]


def block(h, layer, num_heads, eps, rope):
    h = rms_norm(h + attention(h, layer, num_heads, rope), eps)
    return rms_norm(h + swiglu(h, layer), eps)


def level(params, name, h, injection, num_heads, eps, rope):
    h = h + injection
    i = 0
    while f"layers_{i}" in params[name]:
        h = block(h, params[name][f"layers_{i}"], num_heads, eps, rope)
        i += 1
    return h


def to_f64(tree):
    if isinstance(tree, dict):
        return {k: to_f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def embed(cfg, dense, inputs, puzzle_rows):
    emb = dense["embed_tokens"]["embedding"][inputs]
    if cfg.puzzle_emb_ndim > 0:
        b = inputs.shape[0]
        padded = np.zeros((b, cfg.puzzle_emb_len * cfg.hidden_size))
        padded[:, :cfg.puzzle_emb_ndim] = puzzle_rows
        emb = np.concatenate([padded.reshape(b, cfg.puzzle_emb_len, cfg.hidden_size), emb], 1)
    if cfg.pos_encodings == "learned":
        emb = 0.707106781 * (emb + dense["embed_pos"]["embedding"])
    return np.sqrt(cfg.hidden_size) * emb


def inner_forward(cfg, params, z_H, z_L, inputs, puzzle_rows):
    """The reference's Inner.forward in float64: -> z_H, z_L, logits, q_logits [B, 2]."""
    dense = to_f64(params["dense"])
    z_H, z_L = np.asarray(z_H, np.float64), np.asarray(z_L, np.float64)
    rope = rope_tables(cfg.total_seq_len, cfg.head_dim, cfg.rope_theta) if cfg.pos_encodings == "rope" else None
    x = embed(cfg, dense, np.asarray(inputs), np.asarray(puzzle_rows, np.float64))
    args = (cfg.num_heads, cfg.rms_norm_eps, rope)
    for _h in range(cfg.H_cycles):
        for _l in range(cfg.L_cycles):
            z_L = level(dense, "L_level", z_L, z_H + x, *args)
        z_H = level(dense, "H_level", z_H, z_L, *args)
    logits = z_H @ dense["lm_head"]["kernel"]
    q = z_H[:, 0] @ dense["q_head"]["kernel"] + dense["q_head"]["bias"]
    return z_H, z_L, logits[:, cfg.puzzle_emb_len:], q


def log_stablemax(x):
    s = np.where(x < 0, 1.0 / (1.0 - x + 1e-30), x + 1.0)
    return np.log(s / s.sum(-1, keepdims=True))
