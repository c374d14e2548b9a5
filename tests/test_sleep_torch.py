"""The torch sleep trainer (sage/sleep_torch.py) against the jax one, and a whole sleep cycle on a device
without JAX.

Tolerances (float32 on CPU, exploration off: the frameworks draw different random numbers): the per-step
loss within 1e-4 relative and every parameter within 2e-5 absolute after the steps, the bounds of
tests/test_torch_train_step.py (op order, float64 vs float32 stablemax); validation metrics that count
(exact and token accuracy, count) equal, since both frameworks predict the same tokens here, and the
losses within 1e-4 relative.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from hrm_jax.data.format import load_split
from hrm_jax.model import init_params
from hrm_jax.pretrained import load_model
from sage import replay, sleep, weights
from sage.backends import load_backend
from sage.experience import ExperienceStore, StoreConfig
from sage.sleep_jax import TRAINER as JAX
from sage.sleep_torch import TRAINER as TORCH
from sage.sleep_torch import TorchTrainerError
from tests.test_sleep import CFG, SLEEP, easy_sudokus
from tests.test_torch_train_step import METRIC_RTOL, assert_trained_params_match
from tests.test_trm_export import small_config as trm_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = CFG.replace(halt_exploration_prob=0.0, forward_dtype="float32")
PARITY = sleep.SleepConfig(steps=4, batch_size=8, lr=1e-3, weight_decay=0.1)  # CFG: rows halt at step 2


@pytest.fixture(scope="module")
def sudokus():
    return easy_sudokus()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def numpy_params(config, seed):
    return jax.tree.map(np.array, init_params(config, jax.random.PRNGKey(seed)))


def test_torch_fine_tune_equals_the_jax_one(sudokus):
    puzzles, solutions = sudokus
    params = numpy_params(QUIET, 1)
    runs = {}
    for trainer in (JAX, TORCH):
        stream = sleep.batches(puzzles[:40] + 1, solutions[:40] + 1, PARITY, np.random.default_rng(5))
        runs[trainer.name] = trainer.fine_tune(params, QUIET, stream, PARITY.train_config(), PARITY.steps)
    (jax_params, jax_losses), (torch_params, torch_losses) = runs["jax"], runs["torch"]
    assert len(torch_losses) == PARITY.steps
    np.testing.assert_allclose(torch_losses, jax_losses, rtol=METRIC_RTOL)
    assert_trained_params_match(params, jax.device_get(jax_params), torch_params)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(torch_params))


def test_torch_validation_equals_hrm_jax_evaluate(sudokus, tmp_path):
    puzzles, solutions = sudokus
    split = replay.sudoku_split(puzzles[40:77], solutions[40:77])  # 37 rows: the last batch of 16 is padded
    params = numpy_params(QUIET, 2)
    want = JAX.validate(params, QUIET, split, 16)
    got = TORCH.validate(params, QUIET, split, 16)
    assert got["count"] == want["count"] == 37
    for name in ("accuracy", "exact_accuracy", "copy_accuracy", "copy_exact_accuracy", "steps", "q_halt_accuracy"):
        assert got[name] == pytest.approx(want[name], abs=1e-6), name
    for name in ("lm_loss", "q_halt_loss"):
        assert got[name] == pytest.approx(want[name], rel=1e-4), name
    assert 0 < got["accuracy"] < 1  # not a degenerate model


def test_torch_trainer_refuses_what_it_cannot_read(tmp_path):
    split = replay.sudoku_split(np.zeros((1, 81), int), np.ones((1, 81), int))
    with pytest.raises(TorchTrainerError, match="trains HRM; this model is a TRMConfig"):
        TORCH.validate({}, trm_config(), split, 1)
    with pytest.raises(TorchTrainerError, match="seq_len: model 12 vs data 81"):
        TORCH.validate(numpy_params(QUIET.replace(seq_len=12), 0), QUIET.replace(seq_len=12), split, 1)


# A served model and two stores, written here (with JAX); the cycles run in a process where JAX is missing.
NO_JAX_CYCLES = textwrap.dedent("""
    import json, sys
    sys.modules["jax"] = None
    from sage.__main__ import main
    weights_dir, good, poisoned, heldout = sys.argv[1:5]
    common = ["--weights", weights_dir, "--heldout", heldout, "--steps", "30", "--batch-size", "16", "--lr", "1e-3",
              "--metric", "accuracy", "--experiences", "24", "--augmentations", "4", "--eval-batch-size", "32",
              "--trainer"]
    assert main(["sleep", *common, "jax", "--store", good]) == 2  # no JAX here: one line, exit 2
    fresh = ["--init-from", heldout, "--weights", weights_dir + "-new"]  # a data folder is not a model
    assert main(["sleep", *common, "torch", "--store", good, *fresh]) == 2
    codes = [main(["sleep", *common, trainer, "--store", store]) for trainer, store in
             (("torch", good), ("auto", poisoned))]
    from sage.backends import load_backend
    from sage.weights import read_current
    backend = load_backend(read_current(weights_dir)["path"], "torch", cache_dir=weights_dir + "-cache")
    loaded = [m for m in ("jax", "hrm_jax.model", "hrm_jax.checkpoint") if sys.modules.get(m) is not None]
    print(json.dumps({"codes": codes, "backend": backend.name, "loaded": loaded}))
""")


def test_sleep_cycles_with_the_torch_trainer_without_jax(sudokus, tmp_path):
    """Served model: a tiny HRM fine-tuned 30 steps by the torch trainer, published as a model folder. Then,
    with JAX unimportable: `--trainer jax` is refused in one line; a cycle on the server's experiences
    (half verified answers, half solver-labelled) is accepted and publishes version 1, which the server's
    torch backend loads; a cycle on a bad teacher's labels (`--trainer auto`, which picks torch here) is
    rejected by the gate and version 1 stays."""
    puzzles, solutions = sudokus
    params, _ = sleep.fine_tune(numpy_params(CFG, 0), CFG, puzzles[:48] + 1, solutions[:48] + 1,
                                SLEEP, np.random.default_rng(3), trainer=TORCH)
    served = str(tmp_path / "served")
    sleep.publish(served, params, CFG, {"source": "test"}, version=0, fmt="folder")
    replay.write_sudoku_split(tmp_path / "data", "test", puzzles[72:], solutions[72:])
    rng = np.random.default_rng(4)
    with ExperienceStore(tmp_path / "good.db", StoreConfig(recent_capacity=100)) as good, \
            ExperienceStore(tmp_path / "poisoned.db", StoreConfig(recent_capacity=100)) as poisoned:
        for i in range(48, 72):
            answer = solutions[i] if i % 2 else rng.integers(1, 10, 81)
            good.add("sudoku", replay.sudoku_payload(puzzles[i], answer), float(rng.random()))
            bad = {**replay.sudoku_payload(puzzles[i], None), "label": solutions[i] % 9 + 1}
            poisoned.add("sudoku", bad, 0.5, provenance="solver-labelled")
    out = subprocess.run([sys.executable, "-c", NO_JAX_CYCLES, served, str(tmp_path / "good.db"),
                          str(tmp_path / "poisoned.db"), str(tmp_path / "data")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    accepted, rejected, result = (json.loads(line) for line in lines)
    assert result["codes"] == [0, 0] and result["backend"] == "torch" and result["loaded"] == []
    assert "the jax trainer needs JAX" in out.stderr and "--trainer torch" in out.stderr
    assert "not a model folder" in out.stderr and "needs JAX" in out.stderr  # --init-from a data folder
    assert all(len(line) < 400 for line in out.stderr.splitlines() if line.startswith("sage sleep:"))

    assert accepted["accepted"] and accepted["trainer"] == "torch" and accepted["published_version"] == 1
    assert accepted["provenance"] == {"verified": 12, "solver-labelled": 12}
    assert accepted["after"]["accuracy"] >= accepted["before"]["accuracy"] - 0.01
    assert not rejected["accepted"] and rejected["trainer"] == "torch" and "fell from" in rejected["reason"]
    assert rejected["after"]["accuracy"] < rejected["before"]["accuracy"] - 0.01
    current = weights.read_current(served)
    assert current["version"] == 1 and current["trainer"] == "torch" and current["parent"] == 0

    # Version 1 as JAX reads it: its own evaluation gives the accuracy the torch trainer validated with.
    new_params, config = load_model(current["path"])
    assert config == CFG
    heldout = load_split(tmp_path / "data", "test")
    jax_after = JAX.validate(new_params, CFG.replace(forward_dtype="float32"), heldout, 32)
    assert jax_after["accuracy"] == pytest.approx(accepted["after"]["accuracy"], abs=1e-6)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params))]
    assert sum(moved) >= len(moved) // 2
    np.testing.assert_array_equal(new_params["buffers"]["H_init"], params["buffers"]["H_init"])
    # What a server with --weights-dir builds from the version (the onnx export of a folder version:
    # tests/test_sage_hot_swap.py, slow).
    built = load_backend(current["path"], "torch", cache_dir=tmp_path / "cache")
    assert built.config == CFG
