"""Evaluation against numbers known by construction and against a step-by-step NumPy rollout:
padding excluded (batch sizes that do and do not divide the set), Q-head early halting, baselines,
per-group results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hrm_jax as H
from hrm_jax.data.format import PuzzleDatasetMetadata, load_split, write_split
from hrm_jax.data.sampler import eval_batches
from hrm_jax.evaluate import EvaluationError, difficulty_bands, evaluate
from tests import numpy_reference as ref
from tests.test_train import CFG, SEQ, VOCAB

N = 20
IGNORE = 5  # the dataset's ignore_label_id: token 5 in labels is unsupervised (-100 after loading)
STEP = jax.jit(H.act_step, static_argnames=("config", "train"))


def eval_split(tmp_path, seed=0):
    """20 examples; labels mostly 0/1 (so an all-zeros prediction gets known scores), some cells and
    one whole row ignored, a per-example difficulty array."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, VOCAB, (N, SEQ))
    labels = (rng.random((N, SEQ)) < 0.3).astype(np.int64)
    labels[:4] = 0  # rows an all-zeros prediction solves
    labels[4:8, :3] = inputs[4:8, :3]  # some cells the copy baseline gets
    labels[8:10] = inputs[8:10]  # rows the copy baseline solves (where no label is ignored)
    labels[rng.random((N, SEQ)) < 0.15] = IGNORE
    labels[10] = IGNORE  # no supervised cell: not counted
    meta = PuzzleDatasetMetadata(seq_len=SEQ, vocab_size=VOCAB, pad_id=0, ignore_label_id=IGNORE,
                                 blank_identifier_id=0, num_puzzle_identifiers=CFG.num_puzzle_identifiers,
                                 total_groups=N, mean_puzzle_examples=1.0, sets=("all",))
    arrays = {"inputs": inputs, "labels": labels, "puzzle_identifiers": rng.integers(1, 9, N).astype(np.int32),
              "puzzle_indices": np.arange(N + 1, dtype=np.int32), "group_indices": np.arange(N + 1, dtype=np.int32)}
    write_split(tmp_path, "test", meta, {"all": arrays}, {"all__difficulty": rng.random(N)})
    return load_split(tmp_path, "test")


def numpy_row_scores(pred, inputs, labels):
    """Per-row token accuracy and exactness over supervised cells, and which rows count."""
    mask = labels != -100
    counts = mask.sum(-1)
    correct = (mask & (pred == labels)).sum(-1)
    return correct / np.maximum(counts, 1), correct == counts, counts > 0


def bce(x, z):
    return np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))


def test_constructed_model_gives_known_numbers_whatever_the_batch_size(tmp_path):
    split = eval_split(tmp_path)
    params = H.init_params(CFG, jax.random.key(0))
    # lm_head 0: logits 0, so argmax predicts token 0 everywhere and stablemax is uniform (loss log V).
    # q_head 0 with bias (0.7, -0.3): q_halt 0.7 >= 0 always, and q_halt > q_continue at segment 1.
    params["dense"]["lm_head"]["kernel"] = jnp.zeros_like(params["dense"]["lm_head"]["kernel"])
    params["dense"]["q_head"] = {"kernel": jnp.zeros((CFG.hidden_size, 2)), "bias": jnp.array([0.7, -0.3])}

    labels = np.where(split["all"].labels == IGNORE, -100, split["all"].labels)
    inputs = np.asarray(split["all"].inputs)
    accuracy, exact, counted = numpy_row_scores(np.zeros_like(labels), inputs, labels)
    copy_accuracy, copy_exact, _ = numpy_row_scores(inputs, inputs, labels)
    expected = {"accuracy": accuracy[counted].mean(), "exact_accuracy": exact[counted].mean(),
                "q_halt_accuracy": exact[counted].mean(), "steps": CFG.halt_max_steps,
                "lm_loss": np.log(VOCAB), "q_halt_loss": bce(0.7, exact[counted]).mean(),
                "early_accuracy": accuracy[counted].mean(), "early_exact_accuracy": exact[counted].mean(),
                "early_steps": 1.0, "copy_accuracy": copy_accuracy[counted].mean(),
                "copy_exact_accuracy": copy_exact[counted].mean(), "count": counted.sum()}
    assert counted.sum() == N - 1 and 0 < expected["exact_accuracy"] < 1 and 0 < expected["copy_exact_accuracy"] < 1

    for batch_size in (5, 7):  # 7 leaves a padded last batch (6 real rows, 1 padding)
        got = evaluate(params, CFG, split, batch_size)
        assert list(got) == ["all"]
        assert set(got["all"]) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got["all"][name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def stepwise_reference(params, split, batch_size):
    """Segments one act_step at a time, early halting and scores in NumPy."""
    rows = {"pred": [], "early": [], "early_steps": [], "q_halt": [], "inputs": [], "labels": [], "lm": []}
    for item in eval_batches(split, batch_size):
        batch = {k: jnp.asarray(v) for k, v in item.batch.items()}
        carry = H.initial_carry(CFG, batch)
        preds, q = [], []
        for _ in range(CFG.halt_max_steps):
            carry, out = STEP(params, CFG, carry, batch, None, train=False)
            preds.append(np.argmax(np.asarray(out["logits"]), -1))
            q.append((np.asarray(out["q_halt_logits"]), np.asarray(out["q_continue_logits"])))
        halts = np.stack([h > c for h, c in q])  # [segments, B]
        first = np.where(halts.any(0), halts.argmax(0), CFG.halt_max_steps - 1)
        keep = item.valid
        logp = ref.log_stablemax(np.asarray(out["logits"], np.float64))
        labels = item.batch["labels"]
        nll = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0] * (labels != -100)
        rows["lm"].append((nll.sum(-1) / np.maximum((labels != -100).sum(-1), 1))[keep])
        rows["pred"].append(preds[-1][keep])
        rows["early"].append(np.stack(preds)[first, np.arange(len(first))][keep])
        rows["early_steps"].append(first[keep] + 1)
        rows["q_halt"].append(q[-1][0][keep])
        rows["inputs"].append(item.batch["inputs"][keep])
        rows["labels"].append(labels[keep])
    return {k: np.concatenate(v) for k, v in rows.items()}


def test_matches_stepwise_rollout_with_early_halting_and_groups(tmp_path):
    split = eval_split(tmp_path, seed=1)
    params = H.init_params(CFG, jax.random.key(1))
    # A random puzzle embedding (position 0, which the Q-head reads) and Q-head, so that rows halt
    # early at different segments (measured: 6, 6 and 8 rows at segments 1, 2, 3).
    rng = np.random.default_rng(1)
    params["puzzle_emb"] = jnp.asarray(rng.normal(0, 1, params["puzzle_emb"].shape), jnp.float32)
    params["dense"]["q_head"] = {"kernel": jnp.asarray(rng.normal(0, 0.5, (CFG.hidden_size, 2)), jnp.float32),
                                 "bias": jnp.zeros(2)}
    expected = stepwise_reference(params, split, 7)
    assert len(np.unique(expected["early_steps"])) == 3  # the case exercises early halting

    groups = difficulty_bands(split, num_bands=2)
    metrics, predictions = evaluate(params, CFG, split, 7, group_by=groups, return_predictions=True)
    np.testing.assert_array_equal(predictions["predictions"], expected["pred"])
    np.testing.assert_array_equal(predictions["early_predictions"], expected["early"])
    np.testing.assert_array_equal(predictions["early_steps"], expected["early_steps"])
    np.testing.assert_array_equal(predictions["labels"], expected["labels"])

    accuracy, exact, counted = numpy_row_scores(expected["pred"], expected["inputs"], expected["labels"])
    _, early_exact, _ = numpy_row_scores(expected["early"], expected["inputs"], expected["labels"])
    q_correct = (expected["q_halt"] >= 0) == exact
    for name, select in [("all", counted)] + [(f"group/{g}", counted & (groups == g)) for g in np.unique(groups)]:
        got = metrics[name]
        assert got["count"] == select.sum()
        np.testing.assert_allclose(got["accuracy"], accuracy[select].mean(), rtol=1e-6)
        np.testing.assert_allclose(got["exact_accuracy"], exact[select].mean(), rtol=1e-6)
        np.testing.assert_allclose(got["early_exact_accuracy"], early_exact[select].mean(), rtol=1e-6)
        np.testing.assert_allclose(got["early_steps"], expected["early_steps"][select].mean(), rtol=1e-6)
        np.testing.assert_allclose(got["q_halt_accuracy"], q_correct[select].mean(), rtol=1e-6)
        np.testing.assert_allclose(got["lm_loss"], expected["lm"][select].mean(), rtol=1e-5)
    assert set(metrics) == {"all"} | {f"group/{g}" for g in np.unique(groups)}


def test_difficulty_bands_and_errors(tmp_path):
    split = eval_split(tmp_path)
    values = np.asarray(split["all"].extra["difficulty"])
    bands = difficulty_bands(split, num_bands=2)
    low = values <= np.median(values)
    assert len(np.unique(bands[low])) == 1 and len(np.unique(bands[~low])) == 1
    assert bands[low][0].startswith("b1:") and bands[~low][0].startswith("b2:")
    assert difficulty_bands(split, key="no_such_array") is None

    params = jax.eval_shape(lambda k: H.init_params(CFG, k), jax.random.key(0))
    with pytest.raises(EvaluationError, match=r"group_by must hold one label per example .*\(20,\)"):
        evaluate(params, CFG, split, 5, group_by=np.zeros(3))
    with pytest.raises(EvaluationError, match="seq_len: model 9 vs data 8"):
        evaluate(params, CFG.replace(seq_len=9), split, 5)
    with pytest.raises(EvaluationError, match="batch_size"):
        evaluate(params, CFG, split, 0)
