"""TRM on the shared machinery: the EMA (formula, in the train step, in checkpoints, restore equals
continue), the train step with the continue loss off, a tiny TRM that learns the toy task, and the
loop's evaluation, best/ and params-for-eval reading the EMA copy."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrm_jax import checkpoint as ckpt
from hrm_jax.config import RunConfig
from hrm_jax.data.format import load_split
from hrm_jax.ema import eval_params, init_ema, update_ema
from hrm_jax.evaluate import evaluate
from hrm_jax.presets import trm_tiny
from hrm_jax.train import abstract_train_state, init_train_state, train_step
from tests.test_train import (
    NUM_TRAIN,
    SEQ,
    TC,
    VOCAB,
    assert_learns_the_toy_task,
    batch_of,
    leaves_equal,
    make_dataset,
    train,
    train_records,
)

CFG = trm_tiny(seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=NUM_TRAIN + 1, hidden_size=32, num_heads=2,
               L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=3, expansion=2.0, puzzle_emb_ndim=32,
               puzzle_emb_len=2)
TC_EMA = TC.replace(ema=True, ema_rate=0.9)
TOTAL = 8


def step(state, batch, model_config=CFG, train_config=TC_EMA):
    return train_step(state, batch, model_config=model_config, train_config=train_config, total_steps=TOTAL)


def test_ema_update_formula():
    rng = np.random.default_rng(0)
    ema = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=5).astype(np.float32)}}
    dense = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), ema)
    got = update_ema(jax.tree.map(jnp.asarray, ema), jax.tree.map(jnp.asarray, dense), 0.999)
    for g, e, p in zip(jax.tree.leaves(got), jax.tree.leaves(ema), jax.tree.leaves(dense)):
        np.testing.assert_allclose(g, 0.001 * p.astype(np.float64) + 0.999 * e, rtol=1e-6, atol=1e-7)
    params = {"dense": dense, "buffers": {"H_init": 1}, "puzzle_emb": 2}
    assert eval_params(params, None) is params
    assert eval_params(params, ema)["dense"] is ema and eval_params(params, ema)["puzzle_emb"] == 2
    copied = init_ema(jax.tree.map(jnp.asarray, dense))
    assert leaves_equal(copied, dense)


def test_train_step_updates_ema_after_the_optimizer_and_skips_continue_loss():
    rng = np.random.default_rng(1)
    state = init_train_state(CFG, TC_EMA, TOTAL)
    assert leaves_equal(state.ema, state.params["dense"])  # starts at the initial parameters
    assert "puzzle_emb" not in state.ema and "buffers" not in state.ema  # dense only
    for _ in range(3):
        before = jax.device_get(state.ema)
        state, metrics = step(state, batch_of(rng, rng.integers(1, NUM_TRAIN + 1, 16)))
        after, dense = jax.device_get(state.ema), jax.device_get(state.params["dense"])
        for e1, e0, p in zip(jax.tree.leaves(after), jax.tree.leaves(before), jax.tree.leaves(dense)):
            np.testing.assert_allclose(e1, 0.1 * p + 0.9 * e0, rtol=1e-6, atol=1e-7)
    assert "q_continue_loss" not in metrics  # no_ACT_continue: no target Q, no continue loss
    assert not leaves_equal(state.ema, state.params["dense"])
    # Without ema the state holds no average.
    assert init_train_state(CFG, TC, TOTAL).ema is None


@pytest.mark.slow
def test_continue_loss_is_back_with_no_act_continue_false():
    cfg = CFG.replace(no_ACT_continue=False)
    state = init_train_state(cfg, TC, TOTAL)
    rng = np.random.default_rng(2)
    _, metrics = step(state, batch_of(rng, rng.integers(1, NUM_TRAIN + 1, 16)), cfg, TC)
    assert "q_continue_loss" in metrics and np.isfinite(float(metrics["q_continue_loss"]))


def test_tiny_trm_learns_the_toy_task():
    assert_learns_the_toy_task(init_train_state(CFG, TC_EMA, TOTAL), step)


def test_checkpoint_round_trip_keeps_trained_and_averaged_weights(tmp_path):
    rng = np.random.default_rng(3)
    state = init_train_state(CFG, TC_EMA, TOTAL)
    for _ in range(2):
        state, _ = step(state, batch_of(rng, rng.integers(1, NUM_TRAIN + 1, 16)))
    host = jax.device_get(state)
    runs = ckpt.RunCheckpoints(tmp_path, max_to_keep=2)
    run = RunConfig(model=CFG, optim=TC_EMA)
    runs.save(state, ckpt.make_meta(run, TOTAL, 2, None))
    runs.close()
    restored, meta = ckpt.restore(tmp_path / "checkpoints", abstract_train_state(CFG, TC_EMA, TOTAL),
                                  run_config=run, total_steps=TOTAL)
    assert leaves_equal(jax.device_get(restored), host)
    assert jax.tree.structure(restored) == jax.tree.structure(host)
    assert meta["model_family"] == "trm" and ckpt.saved_model_config(meta, "x") == CFG
    # Evaluation, solvers and exports read the average.
    params, config = ckpt.load_params_for_eval(tmp_path)
    assert config == CFG
    assert leaves_equal(params["dense"], host.ema) and leaves_equal(params["puzzle_emb"], host.params["puzzle_emb"])
    # An HRM config cannot resume a TRM run.
    from tests.test_train import CFG as HRM_CFG
    with pytest.raises(ckpt.CheckpointMismatchError, match="model family: saved 'trm', now 'hrm'"):
        ckpt.restore(tmp_path, abstract_train_state(HRM_CFG, TC_EMA, TOTAL),
                     run_config=RunConfig(model=HRM_CFG, optim=TC_EMA), total_steps=TOTAL)


def test_loop_with_ema_resume_equals_continue_and_evaluates_the_average(tmp_path):
    data = make_dataset(tmp_path / "data")
    kwargs = dict(total_steps=TOTAL, eval_every=4, log_every=1, progress=False)
    straight = train(CFG, TC_EMA, data, tmp_path / "a", checkpoint_every=4, **kwargs)
    out_b = tmp_path / "b"
    train(CFG, TC_EMA, data, out_b, checkpoint_every=3, max_steps=5, **kwargs)
    shutil.rmtree(out_b / "checkpoints" / "5")
    resumed = train(CFG, TC_EMA, data, out_b, checkpoint_every=3, resume=True, **kwargs)
    rec_a, rec_b = train_records(tmp_path / "a"), train_records(out_b)
    for s in range(4, 9):
        assert rec_a[s] == rec_b[s], s
    assert leaves_equal(jax.device_get(straight["state"]), jax.device_get(resumed["state"]))  # EMA included

    final = jax.device_get(straight["state"])
    expected = evaluate(eval_params(final.params, final.ema), CFG, load_split(data, "test"), TC_EMA.global_batch_size)
    assert straight["eval"] == train_records(tmp_path / "a", "eval")[8]
    assert np.isclose(expected["all"]["lm_loss"], straight["eval"]["lm_loss"], rtol=1e-6)
    trained = evaluate(final.params, CFG, load_split(data, "test"), TC_EMA.global_batch_size)
    assert trained["all"]["lm_loss"] != expected["all"]["lm_loss"]  # the average, not the trained weights


def test_presets_and_cli_offer_the_trm_runs():
    from hrm_jax.presets import PRESETS, TRM_MODEL_PRESETS, TRM_TRAIN_PRESETS, preset, presets_for

    for task, names in (("sudoku", ("trm_sudoku_mlp", "trm_sudoku_att")), ("maze", ("trm_maze",)),
                        ("arc", ("trm_arc",))):
        for name in names:
            assert name in presets_for(task) and PRESETS[name].task == task
            run = preset(name)
            assert run.model == TRM_MODEL_PRESETS[name]() and run.optim == TRM_TRAIN_PRESETS[name]
    mlp, arc_train = TRM_TRAIN_PRESETS["trm_sudoku_mlp"], TRM_TRAIN_PRESETS["trm_arc"]
    assert (mlp.epochs, mlp.eval_interval, mlp.lr, mlp.puzzle_emb_lr, mlp.weight_decay, mlp.ema) == (
        50000, 5000, 1e-4, 1e-4, 1.0, True)
    assert (arc_train.epochs, arc_train.puzzle_emb_lr, arc_train.weight_decay, arc_train.ema_rate) == (
        100000, 1e-2, 0.1, 0.999)
    assert TRM_MODEL_PRESETS["trm_maze"]().L_cycles == 4 and TRM_MODEL_PRESETS["trm_sudoku_att"]().L_cycles == 6
