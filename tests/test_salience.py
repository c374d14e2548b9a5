"""SNARC salience: cold start, the limits of constant and changing streams, conflict, and the
[0, 1] / simplex invariants under random input."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage.salience import (
    COMPONENTS,
    ModelReport,
    SalienceConfig,
    SalienceError,
    SalienceScorer,
    percentile_rank,
    token_entropy,
)


def test_cold_start_values():
    scorer = SalienceScorer()
    s = scorer.score({"a": [1.0, 2.0, 3.0]})["a"]
    assert (s.surprise, s.novelty, s.arousal, s.reward, s.conflict) == (0.5, 1.0, 0.5, 0.5, 0.0)
    np.testing.assert_allclose(scorer.weights, np.full(5, 0.2))
    assert s.total == pytest.approx(0.2 * (0.5 + 1.0 + 0.5 + 0.5 + 0.0))


def test_constant_stream_drives_surprise_and_novelty_to_zero():
    scorer = SalienceScorer()
    for _ in range(20):
        s = scorer.score({"a": [0.3, -1.0, 2.0]})["a"]
    assert s.surprise == 0.0 and s.novelty == pytest.approx(0.0, abs=1e-12)
    assert s.arousal == 0.5  # a typical magnitude


def test_step_change_spikes_surprise():
    rng = np.random.default_rng(0)
    scorer = SalienceScorer()
    before = [scorer.score({"a": 1.0 + 0.01 * rng.standard_normal(4)})["a"].surprise for _ in range(100)]
    spike = scorer.score({"a": 5.0 + 0.01 * rng.standard_normal(4)})["a"]
    assert np.mean(before[50:]) < 0.7
    assert spike.surprise == 1.0  # larger than every recent error
    assert spike.arousal == 1.0  # and the largest magnitude


def test_model_uncertainty_enters_surprise():
    sure = ModelReport(q_halt_logit=12.0, token_entropy=0.0, steps=1, max_steps=16, vocab_size=11)
    no_logits = ModelReport.from_record({"q_halt_logit": 0.0, "steps": 8, "max_steps": 16, "vocab_size": 11})
    assert no_logits.uncertainty() == pytest.approx((1.0 + 0.5) / 2)
    unsure = ModelReport.from_record({"q_halt_logit": 0.0, "token_entropy": math.log(11), "steps": 16,
                                      "max_steps": 16, "vocab_size": 11})
    assert sure.uncertainty() == pytest.approx((1 - math.tanh(6)) / 3 + 1 / 48, abs=1e-9)
    assert unsure.uncertainty() == pytest.approx(1.0)
    a, b = SalienceScorer(), SalienceScorer()
    for _ in range(5):
        low = a.score({"p": [1.0, 0.0]}, reports={"p": sure})["p"]
        high = b.score({"p": [1.0, 0.0]}, reports={"p": unsure})["p"]
    assert low.surprise < 0.05 and high.surprise == pytest.approx(0.5)  # (0 + 1) / 2
    with pytest.raises(SalienceError, match="lacks"):
        ModelReport.from_record({"steps": 1})


def test_token_entropy_matches_the_formula():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    expected = np.mean([-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)), np.log(3)])
    assert token_entropy(logits) == pytest.approx(expected, rel=1e-12)


def test_reward_is_the_outcome_memory_of_similar_experiences():
    scorer = SalienceScorer(SalienceConfig(outcome_neighbours=3))
    rng = np.random.default_rng(1)
    good, bad = np.eye(8)[0], np.eye(8)[1]
    for _ in range(5):
        scorer.score({"p": good + 0.01 * rng.random(8)}, outcomes={"p": 1.0})
        scorer.score({"p": bad + 0.01 * rng.random(8)}, outcomes={"p": 0.0})
    assert scorer.score({"p": good})["p"].reward == pytest.approx(1.0)
    assert scorer.score({"p": bad})["p"].reward == pytest.approx(0.0)
    assert scorer.score({"p": bad}, outcomes={"p": 0.7})["p"].reward == pytest.approx(0.7)


def _two_streams(scorer, steps, sign, rng, start=0):
    conflicts = []
    for t in range(start, start + steps):
        x = math.sin(0.3 * t) + 0.1 * rng.standard_normal()
        out = scorer.score({"x": [x], "y": [sign * x + 0.1 * rng.standard_normal()]})
        assert out["x"].conflict == pytest.approx(out["y"].conflict)
        conflicts.append(out["x"].conflict)
    return conflicts


def test_streams_turning_anticorrelated_raise_conflict():
    rng = np.random.default_rng(2)
    scorer = SalienceScorer()
    steady = _two_streams(scorer, 400, +1, rng)
    turned = _two_streams(scorer, 30, -1, rng, start=400)
    assert max(steady[200:]) < 0.2
    assert max(turned) > 0.6  # the fast correlation is near -1 while the expectation is still near +1
    single = SalienceScorer()
    assert single.score({"x": [1.0]})["x"].conflict == 0.0


def test_learn_moves_weight_to_the_component_that_predicts_usefulness():
    scorer = SalienceScorer()
    rng = np.random.default_rng(3)
    for _ in range(200):
        useful = rng.random() < 0.5
        s = scorer.score({"p": rng.standard_normal(4)}, outcomes={"p": float(useful)})["p"]
        scorer.learn(s, float(useful))
    w = dict(zip(COMPONENTS, scorer.weights))
    assert w["reward"] == max(w.values()) and w["reward"] > 0.5  # reward equals usefulness here
    assert scorer.weights.sum() == pytest.approx(1.0)


def test_bad_input_is_named():
    scorer = SalienceScorer()
    scorer.score({"a": [1.0, 2.0]})
    with pytest.raises(SalienceError, match="has 3 values"):
        scorer.score({"a": [1.0, 2.0, 3.0]})
    with pytest.raises(SalienceError, match="non-finite"):
        scorer.score({"a": [np.nan, 1.0]})
    with pytest.raises(SalienceError, match="outcome"):
        scorer.score({"a": [1.0, 2.0]}, outcomes={"a": 2.0})


def test_percentile_rank():
    assert percentile_rank(2.0, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.5 / 4)
    assert percentile_rank(9.0, []) == 0.5


_values = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(_values, min_size=3, max_size=3), st.lists(_values, min_size=2, max_size=2),
                          st.none() | st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=25))
def test_scores_in_unit_interval_and_weights_on_the_simplex(steps):
    scorer = SalienceScorer()
    for a, b, outcome, useful in steps:
        out = scorer.score({"a": a, "b": b}, outcomes={} if outcome is None else {"a": outcome})
        for s in out.values():
            values = np.append(s.vector(), s.total)
            assert np.all((values >= 0) & (values <= 1)), s
        scorer.learn(out["a"], useful)
        assert np.all(scorer.weights > 0) and scorer.weights.sum() == pytest.approx(1.0, abs=1e-12)
