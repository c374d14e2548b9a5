"""The torch training step (export/torch_train.py) computes what hrm_jax.train.train_step computes.

Float32 on CPU, exploration off (the two frameworks draw different random numbers), random weights
with a live Q head, puzzle embeddings on, a few ignored labels, and enough steps that rows halt and
the carry refreshes. Compared after every step: the loss and metric sums; at the end: every dense
parameter (AdamATan2 with weight decay on a warm-up/cosine schedule) and the puzzle-embedding table
(sparse sign-SGD). Tolerances: float32 differences of op order and of float64 (torch) vs float32
(jax) stablemax, measured at ~1e-6 relative.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.train_step import random_batches
from export.convert import from_torch_state_dict, numpy_params_from_torch
from export.torch_train import TorchTrainer, model_from_params, schedule_values
from hrm_jax.config import TrainConfig
from hrm_jax.losses import IGNORE_LABEL_ID, reduce_metrics
from hrm_jax.optim import lr_schedule
from hrm_jax.train import init_train_state, train_step
from tests.test_export_torch import random_params, small_config

STEPS = 5  # halt_max_steps 3: rows halt at step 3 and reload at step 4
METRIC_RTOL = 1e-4
PARAM_ATOL = 2e-5  # parameters move ~lr = 3e-3 per step


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def batches(config, batch_size, count):
    """The benchmark's random batches as NumPy, with ~10% of the labels ignored."""
    rng = np.random.default_rng(1)
    out = [jax.tree.map(np.array, b) for b in random_batches(config, batch_size, count)]
    for batch in out:
        batch["labels"][rng.random(batch["labels"].shape) < 0.1] = IGNORE_LABEL_ID
    return out


def train_jax(config, train_config, total_steps, params, data):
    """hrm_jax.train.train_step over `data` from `params` (and the EMA, when on, from their dense part)
    -> (the final state on the host, the metrics of every step)."""
    state = init_train_state(config, train_config, total_steps).replace(params=jax.device_put(params))
    if state.ema is not None:
        state = state.replace(ema=jax.device_put(jax.tree.map(np.array, params["dense"])))
    history = []
    for batch in data:
        state, metrics = train_step(state, batch, model_config=config, train_config=train_config,
                                    total_steps=total_steps)
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.device_get(state), history


def train_torch(trainer, data, global_batch_size, device="cpu"):
    """trainer.step over `data` (this benchmark's TorchTrainer, or a reference checkout's ReferenceTrainer),
    its batches on `device` -> the metrics of every step, reduced as hrm_jax reduces its own."""
    history = []
    for batch in data:
        sums = trainer.step({k: torch.from_numpy(v).to(device) for k, v in batch.items()})
        reduced = reduce_metrics({k: np.asarray(v.detach().cpu()) for k, v in sums.items()}, global_batch_size)
        history.append({k: float(v) for k, v in reduced.items()})
    return history


@pytest.fixture(scope="module")
def runs():
    config = small_config(puzzle_emb_ndim=32, halt_exploration_prob=0.0)
    train_config = TrainConfig(global_batch_size=6, lr=3e-3, lr_warmup_steps=2, lr_min_ratio=0.3, weight_decay=0.5,
                               puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.2)
    total_steps = 10
    # NumPy copies: train_step donates its state, which would delete arrays shared with `params`.
    params = jax.tree.map(np.array, random_params(config, seed=4))
    data = batches(config, train_config.global_batch_size, STEPS)

    state, jax_metrics = train_jax(config, train_config, total_steps, params, data)
    trainer = TorchTrainer(model_from_params(params, config, "cpu"), train_config, total_steps)
    torch_metrics = train_torch(trainer, data, train_config.global_batch_size)
    torch_params = from_torch_state_dict(trainer.inner.state_dict(prefix="model.inner."), config)
    return jax_metrics, torch_metrics, params, state.params, torch_params, trainer


def test_metrics_match_every_step(runs):
    jax_metrics, torch_metrics, *_ = runs
    counts = [m["count"] for m in jax_metrics]
    assert counts[0] == 0 and counts[2] > 0, f"no row halted by step 3: {counts}"  # the carry logic is exercised
    for step, (j, t) in enumerate(zip(jax_metrics, torch_metrics)):
        for name in ("lm_loss", "q_halt_loss", "q_continue_loss", "accuracy", "exact_accuracy", "steps", "count"):
            np.testing.assert_allclose(t[name], j[name], rtol=METRIC_RTOL, atol=1e-6, err_msg=f"step {step}: {name}")


def assert_trained_params_match(start, jax_params, other_params):
    """Every leaf of `other_params` within PARAM_ATOL of hrm_jax's, which moved well beyond it from `start`."""
    other_leaves = dict(jax.tree_util.tree_leaves_with_path(other_params))
    for path, want in jax.tree_util.tree_leaves_with_path(jax_params):
        np.testing.assert_allclose(np.asarray(other_leaves[path]), np.asarray(want), rtol=0, atol=PARAM_ATOL,
                                   err_msg=jax.tree_util.keystr(path))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(jax_params)))
    assert moved > 10 * PARAM_ATOL, "the steps barely moved the parameters: the comparison would be vacuous"


def test_parameters_match_after_the_steps(runs):
    _, _, start, jax_params, torch_params, _ = runs
    assert_trained_params_match(start, jax_params, torch_params)


def test_trainer_counts_steps_and_keeps_a_detached_carry(runs):
    *_, trainer = runs
    assert trainer.step_count == STEPS
    assert not trainer.carry.z_H.requires_grad and not trainer.carry.z_L.requires_grad


@settings(max_examples=15, deadline=None)
@given(warmup=st.integers(0, 50), total=st.integers(1, 400), min_ratio=st.floats(0.0, 1.0), lr=st.floats(1e-6, 1.0))
def test_schedule_values_are_hrm_jax_schedule(warmup, total, min_ratio, lr):
    """The NumPy schedule (no JAX) is hrm_jax.optim.lr_schedule at every step, to float32 rounding (a few ulp:
    the same float32 operations, sin from another library)."""
    tc = TrainConfig(lr=lr, lr_warmup_steps=warmup, lr_min_ratio=min_ratio)
    want = np.asarray(lr_schedule(lr, warmup, total, min_ratio)(np.arange(total + 1)))
    np.testing.assert_allclose(schedule_values(lr, tc, total), want, rtol=1e-6, atol=1e-6 * lr)


def test_numpy_params_equal_the_jax_conversion(runs):
    *_, trainer = runs
    config = trainer.config
    state = trainer.inner.state_dict(prefix="model.inner.")
    for got, want in zip(jax.tree.leaves(numpy_params_from_torch(state, config)),
                         jax.tree.leaves(from_torch_state_dict(state, config))):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, np.asarray(want))


def test_the_step_runs_without_jax():
    """A device without JAX trains with export.torch_train: jax made unimportable in a fresh process."""
    code = ("import sys; sys.modules['jax'] = None\n"
            "import numpy as np, torch\n"
            "from export.torch_train import TorchTrainer, model_from_params\n"
            "from export.convert import numpy_params_from_torch\n"
            "from export.torch_model import HRMTorch\n"
            "from hrm_jax.config import HRMConfig, TrainConfig\n"
            "import json; cfg = HRMConfig(**json.loads(sys.argv[1]))\n"
            "torch.manual_seed(0)\n"
            "model = HRMTorch(cfg)\n"
            "for p in model.parameters(): torch.nn.init.normal_(p, std=0.1)\n"
            "trainer = TorchTrainer(model_from_params(numpy_params_from_torch(model.state_dict(), cfg), cfg), \n"
            "                       TrainConfig(global_batch_size=3, lr=1e-2, lr_warmup_steps=0), 4)\n"
            "batch = {'inputs': torch.randint(0, 5, (3, cfg.seq_len), dtype=torch.int32), \n"
            "         'labels': torch.randint(0, 5, (3, cfg.seq_len), dtype=torch.int32),\n"
            "         'puzzle_identifiers': torch.zeros(3, dtype=torch.int32)}\n"
            "before = trainer.inner.lm_head.weight.detach().clone()\n"
            "losses = [float(trainer.step(batch)['lm_loss']) for _ in range(2)]\n"
            "assert np.isfinite(losses).all() and not torch.equal(before, trainer.inner.lm_head.weight)\n"
            "assert 'jax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')\n")
    config = small_config(vocab_size=5, forward_dtype="float32").to_dict()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_given_puzzle_rows_replace_the_table_and_ride_in_the_carry():
    """The opt-in batch["puzzle_rows"]: given the table's own rows, the first step is the default step
    (same loss and dense update); the rows then stay with their example in the ACT carry, and the table
    is never trained."""
    config = small_config(puzzle_emb_ndim=32, halt_exploration_prob=0.0)
    train_config = TrainConfig(global_batch_size=6, lr=3e-3, lr_warmup_steps=2, puzzle_emb_lr=1e-2)
    params = jax.tree.map(np.array, random_params(config, seed=4))
    table = torch.from_numpy(params["puzzle_emb"])
    default, given = (TorchTrainer(model_from_params(params, config, "cpu"), train_config, 10) for _ in range(2))
    carried = 0  # rows that kept their example (and rows) into a step
    for step, batch in enumerate(batches(config, train_config.global_batch_size, STEPS)):
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        carried += 0 if given.carry is None else int((~given.carry.halted).sum())
        got = given.step({**batch, "puzzle_rows": table[batch["puzzle_identifiers"].long()]})
        assert torch.equal(given.carry.puzzle_rows, table[given.carry.puzzle_identifiers.long()])
        if step == 0:
            want = default.step(batch)
            assert float(got["lm_loss"]) == pytest.approx(float(want["lm_loss"]), rel=1e-6)
            for a, b in zip(given.params, default.params):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert carried > 0
    assert torch.equal(given.inner.puzzle_emb.weights, table)


def train_torch_on(device, config, params, data, train_config, total_steps=10):
    """TorchTrainer from `params` on `device` over `data` -> (its metrics per step, its final params)."""
    trainer = TorchTrainer(model_from_params(params, config, device), train_config, total_steps)
    history = train_torch(trainer, data, train_config.global_batch_size, device)
    state = {k: v.cpu() for k, v in trainer.inner.state_dict(prefix="model.inner.").items()}
    return history, from_torch_state_dict(state, config)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


@needs_cuda
def test_the_step_on_cuda_equals_hrm_jax_in_float32(runs):
    """On CUDA the trainer keeps every tensor of its step (schedules, update counts, sparse embedding
    gradients, carry) on the device, and computes what hrm_jax computes: the same bounds as on the CPU.
    TF32 is off (torch's default for matmuls), so float32 means float32."""
    assert not torch.backends.cuda.matmul.allow_tf32
    jax_metrics, _, start, jax_params, *_ = runs
    config = small_config(puzzle_emb_ndim=32, halt_exploration_prob=0.0)
    train_config = TrainConfig(global_batch_size=6, lr=3e-3, lr_warmup_steps=2, lr_min_ratio=0.3, weight_decay=0.5,
                               puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.2)
    history, cuda_params = train_torch_on("cuda", config, start, batches(config, 6, STEPS), train_config)
    for step, (j, t) in enumerate(zip(jax_metrics, history)):
        for name in ("lm_loss", "q_halt_loss", "accuracy", "count"):
            np.testing.assert_allclose(t[name], j[name], rtol=METRIC_RTOL, atol=1e-6, err_msg=f"step {step}: {name}")
    assert_trained_params_match(start, jax_params, cuda_params)


@needs_cuda
def test_the_step_on_cuda_in_bfloat16_follows_float32():
    """The shipped model's forward_dtype, bfloat16, on CUDA (what `sage sleep --trainer torch` runs on a
    GPU) follows the float32 step: the first three steps' lm_loss within 3% (on the CPU the same
    comparison differs by at most 1.2%; later steps drift further apart as bfloat16's rounding, ~0.4%
    per operation, changes the updates) and 20 steps on one batch lower the loss as float32's do."""
    config = small_config(puzzle_emb_ndim=32, halt_exploration_prob=0.0)
    train_config = TrainConfig(global_batch_size=6, lr=3e-3, lr_warmup_steps=2, puzzle_emb_lr=1e-2)
    params = jax.tree.map(np.array, random_params(config, seed=4))
    data = batches(config, 6, 1) * 20  # one batch again and again: the loss must fall
    f32, _ = train_torch_on("cuda", config, params, data, train_config, total_steps=20)
    bf16, _ = train_torch_on("cuda", config.replace(forward_dtype="bfloat16"), params, data, train_config,
                             total_steps=20)
    for step, (a, b) in enumerate(zip(f32[:3], bf16[:3])):
        np.testing.assert_allclose(b["lm_loss"], a["lm_loss"], rtol=0.03, err_msg=f"step {step}")
    for history in (f32, bf16):
        assert history[-1]["lm_loss"] < 0.85 * history[0]["lm_loss"], [h["lm_loss"] for h in history]
