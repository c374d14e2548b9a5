"""The train step (determinism, learning, the sparse puzzle-embedding update, the ACT carry across
batches) and the loop (logs, plot, checkpoints, a bit-exact resume after a simulated kill)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hrm_jax as H
from hrm_jax.checkpoint import CheckpointMismatchError
from hrm_jax.data.format import PuzzleDatasetMetadata, write_split
from hrm_jax.logging_utils import read_metrics
from hrm_jax.train import TIMING_METRICS, TrainingError, init_train_state, on_default_device, train_step
from hrm_jax.train import train as train_run

NUM_TRAIN, SEQ, VOCAB = 64, 8, 6
CFG = H.tiny(seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=NUM_TRAIN + 1, hidden_size=32, num_heads=2,
             H_layers=1, L_layers=1, halt_max_steps=3, expansion=2.0, puzzle_emb_ndim=32)
TC = H.TrainConfig(global_batch_size=16, epochs=10, eval_interval=None, lr=1e-3, lr_warmup_steps=0,
                   weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, seed=0)
TOTAL = 8  # schedule length for every test here, so train_step compiles once (lr is constant anyway)


def train(model, optim, data, out_dir, **loop):
    """hrm_jax.train.train on RunConfig(model, optim, LoopConfig(out_dir, **loop))."""
    return train_run(H.RunConfig(model=model, optim=optim, loop=H.LoopConfig(out_dir=str(out_dir), **loop)), data)


def task(inputs: np.ndarray) -> np.ndarray:
    """The toy task: every token maps to the next one cyclically (1..5); pad 0 stays 0 (ignored)."""
    return np.where(inputs == 0, 0, inputs % 5 + 1)


def make_examples(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = rng.integers(1, VOCAB, (n, SEQ))
    inputs[rng.random(n) < 0.3, -1] = 0  # some padded (unsupervised) cells
    return inputs.astype(np.int32), task(inputs).astype(np.int32)


def make_dataset(root, *, num_train=NUM_TRAIN, num_test=20, seed=0, difficulty=False) -> str:
    """Writes train/ and test/ splits: one example per puzzle, one puzzle per group, ids 1..n."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("test", num_test)):
        inputs, labels = make_examples(rng, n)
        ids = np.arange(1, n + 1) if split == "train" else rng.integers(1, num_train + 1, n)
        meta = PuzzleDatasetMetadata(seq_len=SEQ, vocab_size=VOCAB, pad_id=0, ignore_label_id=0,
                                     blank_identifier_id=0, num_puzzle_identifiers=num_train + 1,
                                     total_groups=n, mean_puzzle_examples=1.0, sets=("all",))
        arrays = {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids.astype(np.int32),
                  "puzzle_indices": np.arange(n + 1, dtype=np.int32), "group_indices": np.arange(n + 1, dtype=np.int32)}
        extra = {"all__difficulty": rng.random(n)} if difficulty else None
        write_split(root, split, meta, {"all": arrays}, extra)
    return str(root)


def batch_of(rng: np.random.Generator, ids: np.ndarray) -> dict[str, np.ndarray]:
    inputs, labels = make_examples(rng, len(ids))
    return {"inputs": inputs, "labels": np.where(labels == 0, -100, labels).astype(np.int32),
            "puzzle_identifiers": ids.astype(np.int32)}


def step(state, batch):
    return train_step(state, batch, model_config=CFG, train_config=TC, total_steps=TOTAL)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_train_step_is_deterministic_and_advances():
    rng = np.random.default_rng(1)
    batches = [batch_of(rng, rng.integers(1, NUM_TRAIN + 1, 16)) for _ in range(3)]
    runs = []
    for _ in range(2):
        state, history = init_train_state(CFG, TC, TOTAL), []
        for batch in batches:
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
        runs.append((jax.device_get(state), history))
    (state_a, hist_a), (state_b, hist_b) = runs
    assert leaves_equal(state_a, state_b)  # bitwise
    assert hist_a == hist_b
    assert int(state_a.step) == 3
    assert set(hist_a[0]) == {"lm_loss", "q_halt_loss", "q_continue_loss", "accuracy", "exact_accuracy",
                              "q_halt_accuracy", "steps", "count", "lr"}
    np.testing.assert_allclose(hist_a[0]["lr"], TC.lr, rtol=1e-6)  # no warm-up, min_ratio 1: constant
    assert np.all(np.isfinite([v for h in hist_a for v in h.values()]))


def assert_learns_the_toy_task(state, step_fn) -> None:
    """40 steps of step_fn(state, batch) on fresh toy batches halve the lm loss and take the halted rows'
    token accuracy past 0.9 (measured for HRM: lm_loss ~2.1 -> ~0.35, token accuracy 1.0)."""
    rng = np.random.default_rng(2)
    losses, accuracy = [], []
    for _ in range(40):
        state, metrics = step_fn(state, batch_of(rng, rng.integers(1, NUM_TRAIN + 1, 16)))
        losses.append(float(metrics["lm_loss"]))
        accuracy.append((float(metrics["accuracy"]), float(metrics["count"])))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    late = [a for a, c in accuracy[-5:] if c > 0]
    assert late and np.mean(late) > 0.9


def test_loss_drops_on_a_fixed_task():
    assert_learns_the_toy_task(init_train_state(CFG, TC, TOTAL), step)


def test_puzzle_table_sparse_update_and_carry_keeps_unhalted_examples():
    rng = np.random.default_rng(3)
    state = init_train_state(CFG, TC, TOTAL)
    table = rng.normal(0, 0.5, state.params["puzzle_emb"].shape).astype(np.float32)
    # Committed like the state (an uncommitted leaf would make train_step compile again).
    state = state.replace(params=on_default_device({**state.params, "puzzle_emb": jnp.asarray(table)}))
    ids = np.array([5, 5, 7, 9] * 4)  # duplicates: their gradients are summed (tests/test_optim.py)
    state, _ = step(state, batch_of(rng, ids))
    got = np.asarray(state.params["puzzle_emb"], np.float64)
    untouched = np.setdiff1d(np.arange(NUM_TRAIN + 1), ids)
    np.testing.assert_array_equal(got[untouched], table[untouched])  # bitwise
    # Batch rows: p <- p (1 - lr wd) - lr sign(g) (the reference's sparse sign-SGD), so the step divided by
    # lr is a sign, and every row has gradient (the puzzle slot feeds the whole sequence).
    lr, wd = TC.puzzle_emb_lr, TC.puzzle_emb_weight_decay
    signs = (table[[5, 7, 9]] * (1 - lr * wd) - got[[5, 7, 9]]) / lr
    np.testing.assert_allclose(signs, np.round(signs), atol=1e-4)
    assert set(np.unique(np.round(signs))) == {-1.0, 1.0}

    # Q starts at q_halt == q_continue (bias -5 both), so no row halts before halt_max_steps = 3:
    # the next batch's examples are dropped and its rows (ids 20..35) never touched
    # (the reference replaces only halted rows of the carry).
    assert not np.any(np.asarray(state.carry.halted))
    before = np.asarray(state.params["puzzle_emb"]).copy()
    state, _ = step(state, batch_of(rng, np.arange(20, 36)))
    after = np.asarray(state.params["puzzle_emb"])
    np.testing.assert_array_equal(after[20:36], before[20:36])
    assert not np.allclose(after[[5, 7, 9]], before[[5, 7, 9]])
    np.testing.assert_array_equal(np.asarray(state.carry.current_data["puzzle_identifiers"]), ids)


def train_records(out_dir, split="train", timing=False):
    """step -> metrics; the wall-clock fields are dropped unless `timing`."""
    return {r["step"]: {k: v for k, v in r["metrics"].items() if timing or k not in TIMING_METRICS}
            for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["split"] == split}


def test_train_records_carry_throughput_and_wall_time(tmp_path):
    data = make_dataset(tmp_path / "data")
    summary = train(CFG, TC, data, tmp_path / "a", total_steps=TOTAL, max_steps=4, eval_every=2, log_every=2,
                    progress=False)
    records = train_records(tmp_path / "a", timing=True)
    assert sorted(records) == [2, 4]
    assert 0 < records[2]["elapsed_s"] < records[4]["elapsed_s"]
    assert all(r["steps_per_s"] > 0 for r in records.values())
    assert summary["train"]["elapsed_s"] == records[4]["elapsed_s"]


def test_loop_resume_matches_uninterrupted_run(tmp_path):
    data = make_dataset(tmp_path / "data")
    kwargs = dict(total_steps=TOTAL, eval_every=4, log_every=1, progress=False)
    straight = train(CFG, TC, data, tmp_path / "a", checkpoint_every=4, **kwargs)

    # Run to step 5 with a checkpoint at 3, then "kill": lose the step-5 checkpoint and everything
    # in memory; the resumed run must drop the logged steps 4-5 and redo them identically.
    out_b = tmp_path / "b"
    first = train(CFG, TC, data, out_b, checkpoint_every=3, max_steps=5, **kwargs)
    assert first["step"] == 5 and max(train_records(out_b)) == 5
    shutil.rmtree(out_b / "checkpoints" / "5")
    del first
    resumed = train(CFG, TC, data, out_b, checkpoint_every=3, resume=True, **kwargs)

    assert straight["step"] == resumed["step"] == 8
    rec_a, rec_b = train_records(tmp_path / "a"), train_records(out_b)
    assert sorted(rec_b) == list(range(1, 9))
    for s in range(4, 9):
        assert rec_a[s] == rec_b[s], s  # bitwise (floats round-trip exactly through JSON)
    assert leaves_equal(jax.device_get(straight["state"]), jax.device_get(resumed["state"]))
    assert train_records(tmp_path / "a", "eval")[8] == train_records(out_b, "eval")[8]

    # The summary and the files a person opens.
    assert set(train_records(tmp_path / "a", "eval")) == {4, 8}
    assert straight["eval"] == train_records(tmp_path / "a", "eval")[8]
    with open(straight["paths"]["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["4", "8"]
    assert len(os.listdir(tmp_path / "a" / "best")) == 1
    best_eval = max(train_records(tmp_path / "a", "eval").values(), key=lambda m: m["exact_accuracy"])
    assert straight["best_exact_accuracy"] == best_eval["exact_accuracy"]

    # A new run into a used out_dir, or a resume with another config, is refused by name.
    with pytest.raises(TrainingError, match="resume=True"):
        train(CFG, TC, data, out_b, **kwargs)
    with pytest.raises(CheckpointMismatchError, match=r"optim\.lr: saved 0\.001, now 0\.002"):
        train(CFG, TC.replace(lr=2e-3), data, out_b, resume=True, **kwargs)


def test_early_stop_and_data_mismatch(tmp_path):
    data = make_dataset(tmp_path / "data")
    # exact accuracy >= 0 holds at the first log with halted rows: the run stops there and saves.
    summary = train(CFG, TC, data, tmp_path / "run", total_steps=TOTAL, log_every=1, early_stop_exact=0.0,
                    eval_split=None, progress=False)
    assert summary["stopped_early"] and summary["step"] < TOTAL
    assert os.listdir(tmp_path / "run" / "checkpoints") == [str(summary["step"])]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    assert last["step"] == summary["step"] and last["metrics"]["exact_accuracy"] >= 0.0
    with pytest.raises(ValueError, match="vocab_size: model 7 vs data 6"):
        train(CFG.replace(vocab_size=7), TC, data, tmp_path / "bad", total_steps=5, progress=False)
