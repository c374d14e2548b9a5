"""Random batches and parameters shared by the model, export and training tests of both families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hrm_jax.family import family_of


def random_batch(cfg, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform int32 inputs and labels [batch_size, seq_len] over the vocabulary, puzzle identifiers [batch_size]."""
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, cfg.vocab_size, (batch_size, cfg.seq_len)).astype(np.int32),
            "labels": rng.integers(0, cfg.vocab_size, (batch_size, cfg.seq_len)).astype(np.int32),
            "puzzle_identifiers": rng.integers(0, cfg.num_puzzle_identifiers, (batch_size,)).astype(np.int32)}


def randomized_params(cfg, seed: int = 0):
    """The family's init, then the zero-initialised parts (Q head, puzzle table) randomised so that a test sees them."""
    params = family_of(cfg).init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    params["dense"]["q_head"] = {"kernel": jnp.asarray(rng.normal(0, 0.1, (cfg.hidden_size, 2)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(0, 1, (2,)), jnp.float32)}
    if cfg.puzzle_emb_ndim:
        params["puzzle_emb"] = jnp.asarray(rng.normal(0, 0.5, params["puzzle_emb"].shape), jnp.float32)
    return params


def set_q_bias(params, halt: float, cont: float):
    """A copy of `params` whose Q head outputs (halt, cont) on every input: zero weight, that bias."""
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["dense"]["q_head"] = {"kernel": jnp.zeros_like(params["dense"]["q_head"]["kernel"]),
                                 "bias": jnp.array([halt, cont], jnp.float32)}
    return params


def exploration_halting_steps(cfg, step, batch_size: int = 512) -> set[int]:
    """The steps at which rows first halt when the Q head says "halt now" (bias 5, -5) and every row explores
    (cfg.halt_exploration_prob 1): the exploration's minimum steps, U{2..halt_max_steps}.

    step: the family's act_step, jitted with config and train static."""
    params = set_q_bias(family_of(cfg).init_params(cfg, jax.random.key(0)), 5.0, -5.0)  # would halt at once
    batch = random_batch(cfg, batch_size)
    carry = family_of(cfg).initial_carry(cfg, batch)
    halted_at = np.zeros(batch_size, int)
    for n in range(1, cfg.halt_max_steps + 1):
        carry, _ = step(params, cfg, carry, batch, jax.random.key(10 + n), train=True)
        newly = np.asarray(carry.halted) & (halted_at == 0)
        halted_at[newly] = n
        carry = carry.replace(halted=jnp.asarray(halted_at > 0))  # keep halted rows out of the count
    return set(halted_at.tolist())
