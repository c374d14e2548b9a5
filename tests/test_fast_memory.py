"""The fast-weight memory: recall after distractors, the gate's effect on the stored trace (and how
renormalising every column would erase it), the episode trace, the adaptive gate, save/reload."""

import numpy as np
import pytest

from benchmarks.fast_memory import capacity_curve
from sage.fast_memory import FastMemory, FastMemoryConfig, FastMemoryError, recall_accuracy

D, R = 64, 64


def pairs(rng, n, d=D):
    return rng.standard_normal((n, d)), rng.standard_normal((n, d))


def fill(memory, keys, values, gate=1.0):
    for k, v in zip(keys, values):
        memory.begin_episode()
        assert memory.write(k, v, gate)


@pytest.mark.parametrize("distractors", [0, 20, 48])
def test_recall_after_distractors(distractors):
    rng = np.random.default_rng(0)
    memory = FastMemory(FastMemoryConfig(dim=D, slots=R, gate_warmup=10**6))
    keys, values = pairs(rng, 8 + distractors)
    fill(memory, keys, values)
    # The first 8 are recalled exactly among all stored values while the slots last (56 <= 64).
    assert recall_accuracy(memory, keys[:8], values) == 1.0
    out = memory.read(keys[0])
    cos = out @ values[0] / np.linalg.norm(out) / np.linalg.norm(values[0])
    assert cos > 0.99


def test_overflow_forgets_the_least_used_first():
    rng = np.random.default_rng(1)
    memory = FastMemory(FastMemoryConfig(dim=D, slots=16, gate_warmup=10**6))
    keys, values = pairs(rng, 48)
    fill(memory, keys, values)
    newest_first = np.concatenate([values[-16:], values[:-16]])
    assert recall_accuracy(memory, keys[-16:], newest_first) == 1.0  # the newest survive
    assert recall_accuracy(memory, keys[:16], values) < 0.2  # the oldest were overwritten


def _strength(gate, renormalise_values=False):
    rng = np.random.default_rng(2)
    memory = FastMemory(FastMemoryConfig(dim=D, slots=R, gate_warmup=10**6))
    k, v = rng.standard_normal(D), rng.standard_normal(D)
    v /= np.linalg.norm(v)  # a unit value: below the cap, which would otherwise clip the strong write
    memory.write(k, v, gate)
    if renormalise_values:  # the public version: every column rescaled to unit norm after the gated write
        norms = np.linalg.norm(memory.values, axis=0)
        memory.values = np.where(norms > 0, memory.values / np.where(norms > 0, norms, 1), 0)
    return float(memory.read(k) @ v)


def test_a_larger_gate_gives_a_stronger_trace():
    weak, strong = _strength(0.3), _strength(0.9)
    # The value strength scales with the gate; measured 0.297 vs 0.900 (the address is ~0.99 sharp either way).
    assert strong / weak > 2.5 and strong == pytest.approx(0.9, abs=0.01)
    # Renormalising every column afterwards gives equal traces: measured 0.989 vs 1.000, the gate is erased.
    weak_n, strong_n = _strength(0.3, True), _strength(0.9, True)
    assert strong_n / weak_n < 1.05


def test_cap_bounds_value_norms_without_touching_weaker_columns():
    rng = np.random.default_rng(3)
    memory = FastMemory(FastMemoryConfig(dim=D, slots=4, max_value_norm=2.0, decay=0.0, gate_warmup=10**6))
    k, v = rng.standard_normal(D), rng.standard_normal(D)
    for _ in range(5):
        memory.write(k, 5.0 * v / np.linalg.norm(v), 1.0)
    assert np.linalg.norm(memory.values, axis=0).max() == pytest.approx(2.0)
    other = FastMemory(FastMemoryConfig(dim=D, slots=4, max_value_norm=2.0, decay=0.0, gate_warmup=10**6))
    other.write(k, v / np.linalg.norm(v), 0.5)
    assert np.linalg.norm(other.values, axis=0).max() == pytest.approx(0.5)


def test_eligibility_trace_binds_an_episode():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((2, D))
    values = np.linalg.qr(rng.standard_normal((D, 2)))[0].T * 3.0  # orthogonal, norm 3
    bound = FastMemory(FastMemoryConfig(dim=D, slots=R, gate_warmup=10**6))
    bound.begin_episode()
    for k, v in zip(keys[:2], values[:2]):
        bound.write(k, v, 1.0)
    apart = FastMemory(FastMemoryConfig(dim=D, slots=R, gate_warmup=10**6))
    fill(apart, keys[:2], values[:2])
    unit_b = values[1] / 3.0
    # Reading the first key recalls kappa * e = 0.3 of the second value (norm 3) and all of its own.
    assert bound.read(keys[0]) @ unit_b == pytest.approx(0.3 * 3.0, rel=0.02)
    assert bound.read(keys[0]) @ values[0] / 3.0 == pytest.approx(3.0 * (1 - 0.005), rel=0.02)
    assert abs(apart.read(keys[0]) @ unit_b) < 0.01


def test_adaptive_gate_commits_the_salient_writes():
    rng = np.random.default_rng(5)
    memory = FastMemory(FastMemoryConfig(dim=8, slots=8, gate_warmup=20, gate_quantile=0.75))
    committed = [memory.write(rng.standard_normal(8), rng.standard_normal(8), float(g)) for g in rng.random(400)]
    assert all(committed[:20])
    assert 0.15 < np.mean(committed[100:]) < 0.35  # the top quarter
    with pytest.raises(FastMemoryError, match="dim=8"):
        memory.write(np.ones(3), np.ones(8), 0.5)
    with pytest.raises(FastMemoryError, match="non-zero"):
        memory.read(np.zeros(8))


def test_save_reload_identical(tmp_path):
    rng = np.random.default_rng(6)
    memory = FastMemory(FastMemoryConfig(dim=16, slots=8, gate_warmup=3, seed=7))
    keys, values = pairs(rng, 12, d=16)
    for k, v in zip(keys, values):
        memory.write(k, v, float(rng.random()))
    memory.save(tmp_path / "m.npz")
    again = FastMemory.load(tmp_path / "m.npz")
    assert again.config == memory.config and list(again.gates) == list(memory.gates)
    for name in ("keys", "values", "usage", "trace"):
        np.testing.assert_array_equal(getattr(again, name), getattr(memory, name))
    k, v = rng.standard_normal(16), rng.standard_normal(16)
    assert memory.write(k, v, 0.9) == again.write(k, v, 0.9)
    np.testing.assert_array_equal(memory.read(keys[0]), again.read(keys[0]))
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(FastMemoryError, match="not a saved FastMemory"):
        FastMemory.load(tmp_path / "bad.npz")


def test_capacity_curve_of_the_benchmark():

    rows = capacity_curve(dim=32, slots=16, counts=[8, 16, 32], seeds=2)
    # One slot per association until the slots run out, then the least-used (oldest) are overwritten.
    np.testing.assert_allclose(rows["recall"], [1.0, 1.0, 0.5])
    np.testing.assert_allclose(rows["recall_newest_quarter"], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(rows["recall_oldest_quarter"], [1.0, 1.0, 0.0])
