"""A tiny HRM learns a tiny fixed task on the CPU: the whole ACT training signal is wired up."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hrm_jax as H


def _task(batch_size, seq_len, seed):
    """Sort-free token task: label = (input + position) mod 8 + 2 (needs attention to positions)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, 10, (batch_size, seq_len))
    labels = (inputs - 2 + np.arange(seq_len)) % 8 + 2
    return {"inputs": jnp.asarray(inputs, jnp.int32), "labels": jnp.asarray(labels, jnp.int32),
            "puzzle_identifiers": jnp.zeros((batch_size,), jnp.int32)}


def test_tiny_config_learns_in_under_a_minute():
    cfg = H.tiny(seq_len=8, vocab_size=10, hidden_size=32, num_heads=2, H_layers=1, L_layers=1,
                 H_cycles=1, L_cycles=2, halt_max_steps=2)
    params = H.init_params(cfg, jax.random.key(0))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params["dense"])
    batch_size = 64

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(dense, opt_state, carry, batch, key):
        def loss_fn(dense):
            new_carry, outputs = H.act_step({**params, "dense": dense}, cfg, carry, batch, key, train=True)
            loss, metrics = H.act_loss(outputs, new_carry)
            return loss / batch_size, (new_carry, metrics)

        (loss, (carry, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(dense)
        updates, opt_state = optimizer.update(grads, opt_state, dense)
        return optax.apply_updates(dense, updates), opt_state, carry, metrics

    dense, carry = params["dense"], H.initial_carry(cfg, _task(batch_size, 8, 0))
    start, lm_losses = time.time(), []
    for i in range(300):
        dense, opt_state, carry, metrics = step(dense, opt_state, carry, _task(batch_size, 8, i), jax.random.key(i))
        lm_losses.append(float(metrics["lm_loss"]) / batch_size)
    elapsed = time.time() - start
    first, last = np.mean(lm_losses[:10]), np.mean(lm_losses[-10:])
    assert last < first / 5, (first, last)  # measured: ~2.3 -> ~0.05 on 2 cores
    assert elapsed < 60, elapsed


def test_bfloat16_training_stays_finite():
    """Regression: bf16 logits hit stablemax's singular branch exactly; every param became NaN
    after the first update (seen on the H100 smoke run)."""
    from hrm_jax.config import TrainConfig
    from hrm_jax.train import init_train_state, train_step

    cfg = H.tiny(hidden_size=64, num_heads=2, H_layers=1, L_layers=1, puzzle_emb_ndim=64,
                 forward_dtype="bfloat16", halt_max_steps=3)
    train_config = TrainConfig(global_batch_size=16, lr_warmup_steps=1, lr=1e-3)
    state = init_train_state(cfg, train_config, 100)
    for i in range(4):
        state, metrics = train_step(state, _task(16, cfg.seq_len, i) | {"labels": jnp.asarray(
            np.random.default_rng(i).integers(2, 11, (16, cfg.seq_len)), jnp.int32)},
            model_config=cfg, train_config=train_config, total_steps=100)
        assert np.isfinite(float(metrics["lm_loss"])), i
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state.params))
