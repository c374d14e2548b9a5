"""benchmarks/memory_readout.py's pieces: the keys it writes and reads the fast memory with, on a fresh
tiny model (the benchmark's own numbers come from its script; this checks the path they take)."""

import jax
import numpy as np
import pytest

from benchmarks.memory_readout import StateKeys, episode, model_config, one_hot
from export.torch_train import model_from_params
from hrm_jax.model import init_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

LENGTH, SYMBOLS = 6, 8


@pytest.fixture(scope="module")
def inner():
    config = model_config(LENGTH, SYMBOLS, hidden=32)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    return model_from_params(params, config, "cpu").model.inner


@pytest.mark.parametrize("layer", ["embedding", "z_H"])
def test_state_keys_are_deterministic_distinct_and_centred(inner, layer):
    keys = StateKeys(inner, LENGTH * SYMBOLS, seed=0, layer=layer, momentum=1.0)  # momentum 1: m stays the first mean
    tokens = np.random.default_rng(1).integers(0, SYMBOLS, (16, LENGTH))
    first = keys(tokens)
    assert first.shape == (16, LENGTH * SYMBOLS)
    np.testing.assert_allclose(first.mean(0), 0, atol=1e-6)  # centred by the batch's own mean, the first time
    np.testing.assert_allclose(keys(tokens), first, rtol=1e-6, atol=1e-9)  # same input, same weights: same key
    unit = first / np.linalg.norm(first, axis=1, keepdims=True)
    off_diagonal = (unit @ unit.T)[~np.eye(16, dtype=bool)]
    assert off_diagonal.max() < 0.8  # below the memory's match threshold: every key gets its own slot


@pytest.mark.parametrize("layer", [None, "embedding", "z_H"])
def test_an_episode_studied_with_a_key_recalls_its_secrets(inner, layer):
    key_of = None if layer is None else StateKeys(inner, LENGTH * SYMBOLS, seed=0, layer=layer)
    data = episode(np.random.default_rng(2), 8, LENGTH, SYMBOLS, "recall", slots=64, key_of=key_of)
    assert data["recalled"].all()  # a fresh model's keys address 8 associations apart
    decoded = data["reads"].reshape(8, LENGTH, SYMBOLS).argmax(-1) + 1
    np.testing.assert_array_equal(decoded, data["labels"])
    assert data["reads"].shape == (8, LENGTH * SYMBOLS) and data["reads"].dtype == np.float32


def test_one_hot_concatenates_positions():
    np.testing.assert_array_equal(one_hot(np.array([[0, 2]]), 3), [[1, 0, 0, 0, 0, 1]])
