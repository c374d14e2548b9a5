"""hrm_jax's TRM against the reference's own code (SamsungSAILMontreal/TinyRecursiveModels), where a
checkout of it is at hand.

The other TRM parity tests compare against our transcriptions (tests/trm_numpy_reference.py,
export/trm_torch_model.py). This one imports the reference's modules (models/recursive_reasoning/
trm.py, models/losses.py, models/sparse_embedding.py, models/ema.py; see benchmarks/trm_reference.py)
and runs them on the CPU in float32, so a misreading shared by our transcriptions would show here.
CI has no internet and the reference cannot be copied into this repository, so it is skipped unless
`TRM_REFERENCE_DIR` names a checkout:

    git clone https://github.com/SamsungSAILMontreal/TinyRecursiveModels /tmp/trm_ref
    TRM_REFERENCE_DIR=/tmp/trm_ref python -m pytest tests/test_trm_reference_checkout.py

pydantic (the reference's config class) is used if installed, else a stand-in. The reference trains
with AdamATan2, a CUDA extension: the dense update here is export.torch_train.adam_atan2_
(tested against hrm_jax's optimizer elsewhere); the model, ACT wrapper, loss head, sparse sign-SGD
and EMAHelper are the reference's.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import trm_reference  # noqa: E402
from benchmarks.reference_trainer import ReferenceTrainer  # noqa: E402
from export.convert import from_torch_state_dict  # noqa: E402
from hrm_jax import trm  # noqa: E402
from hrm_jax.config import TrainConfig  # noqa: E402
from tests.model_helpers import random_batch  # noqa: E402
from tests.test_export_torch import rel_err  # noqa: E402
from tests.test_torch_train_step import (  # noqa: E402
    METRIC_RTOL,
    assert_trained_params_match,
    batches,
    train_jax,
    train_torch,
)
from tests.test_trm_export import PARITY_RTOL, VARIANTS, random_params, small_config  # noqa: E402

REFERENCE_DIR = os.environ.get("TRM_REFERENCE_DIR")
pytestmark = pytest.mark.skipif(
    not REFERENCE_DIR or not (Path(REFERENCE_DIR) / trm_reference.REQUIRED_FILE).is_file(),
    reason="set TRM_REFERENCE_DIR to a checkout of github.com/SamsungSAILMontreal/TinyRecursiveModels")

SEGMENTS = 4
TRAIN_STEPS = 5  # halt_max_steps 3: rows halt by step 3 and take new examples at step 4
EMA_RATE = 0.9  # the runs use 0.999; a faster average makes five steps of it worth comparing
# Losses are batch sums of O(1); a q_halt_loss near 0.01 (saturated Q logits) moved 3e-6 after five
# steps of float32 training, 2e-4 of itself: the absolute bound is what a float32 sum can promise.
LOSS_ATOL = 1e-5
STEP = jax.jit(trm.act_step, static_argnames=("config", "train"))


@pytest.fixture(scope="module")
def ref():
    return trm_reference.load(REFERENCE_DIR)


def reference_carry(ref, carry):
    m = ref.trm
    arrays = {n: torch.tensor(np.asarray(getattr(carry, n))) for n in ("z_H", "z_L", "steps", "halted")}
    return m.TinyRecursiveReasoningModel_ACTV1Carry(
        m.TinyRecursiveReasoningModel_ACTV1InnerCarry(arrays["z_H"], arrays["z_L"]), arrays["steps"],
        arrays["halted"], {k: torch.tensor(np.asarray(v)) for k, v in carry.current_data.items()})


@pytest.mark.parametrize("index", range(len(VARIANTS)))
def test_every_eval_segment_matches_the_reference(ref, index):
    """Eval mode, each segment from the carry hrm_jax reached (the last one restarts every row):
    z values, logits and Q logits within PARITY_RTOL, step counts and halting flags exactly."""
    cfg = small_config(halt_max_steps=SEGMENTS - 1, **VARIANTS[index])
    params, batch = random_params(cfg, seed=6), random_batch(cfg, 5, seed=7)
    model = trm_reference.model(ref, cfg, params, 5).eval()
    carry = trm.initial_carry(cfg, batch)
    worst = 0.0
    for segment in range(SEGMENTS):
        with torch.no_grad():
            got, _, _, outputs, _ = model(carry=reference_carry(ref, carry),
                                          batch={k: torch.tensor(v) for k, v in batch.items()},
                                          return_keys=["logits", "q_halt_logits", "q_continue_logits"])
        carry, want = STEP(params, cfg, carry, batch, None, train=False)
        errors = {"z_H": rel_err(got.inner_carry.z_H, np.asarray(carry.z_H)),
                  "z_L": rel_err(got.inner_carry.z_L, np.asarray(carry.z_L))}
        errors |= {n: rel_err(outputs[n], np.asarray(want[n])) for n in ("logits", "q_halt_logits",
                                                                          "q_continue_logits")}
        worst = max(worst, *errors.values())
        assert max(errors.values()) <= PARITY_RTOL, (VARIANTS[index], segment + 1, errors)
        assert got.steps.tolist() == np.asarray(carry.steps).tolist()
        assert got.halted.tolist() == np.asarray(carry.halted).tolist()
    print(f"{VARIANTS[index]}: worst relative deviation over {SEGMENTS} segments {worst:.2e}")


@pytest.fixture(scope="module", params=[dict(mlp_t=True, pos_encodings="none"), dict(mlp_t=False,
                                                                                       pos_encodings="rope")],
                ids=["mlp_t", "attention"])
def training(ref, request):
    """TRAIN_STEPS steps of hrm_jax.train.train_step (EMA on) and of the reference's train_batch
    (world size 1) with its EMAHelper updated after every step, on the same warm-up/cosine schedule.
    Exploration is off (the frameworks draw different numbers); a random Q head without bias makes
    some rows halt early on q_halt > 0, so the carry holds rows at different steps."""
    cfg = small_config(halt_exploration_prob=0.0, puzzle_emb_ndim=32, **request.param)
    tc = TrainConfig(global_batch_size=6, lr=3e-3, lr_warmup_steps=2, lr_min_ratio=0.3, weight_decay=0.5,
                     puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.2, ema=True, ema_rate=EMA_RATE)
    total_steps = 10
    params = jax.tree.map(np.array, random_params(cfg, seed=4))
    params["dense"]["q_head"]["bias"][:] = 0.0
    data = batches(cfg, tc.global_batch_size, TRAIN_STEPS)

    state, jax_metrics = train_jax(cfg, tc, total_steps, params, data)
    model = trm_reference.model(ref, cfg, params, tc.global_batch_size)
    trainer = ReferenceTrainer(ref, model, tc, total_steps)
    ref_metrics = train_torch(trainer, data, tc.global_batch_size)
    ref_params = from_torch_state_dict(model.state_dict(), cfg)
    ref_ema = from_torch_state_dict(model.state_dict() | trainer.ema.state_dict(), cfg)["dense"]
    return jax_metrics, ref_metrics, params, state, ref_params, ref_ema


def test_training_metrics_match_the_reference_every_step(training):
    jax_metrics, ref_metrics, *_ = training
    counts = [m["count"] for m in jax_metrics]
    assert any(0 < count < 6 for count in counts), f"some rows, not all, must halt at some step: {counts}"
    assert all("q_continue_loss" not in m for m in jax_metrics + ref_metrics)  # no_ACT_continue
    worst = 0.0
    for step, (j, r) in enumerate(zip(jax_metrics, ref_metrics)):
        assert set(j) - {"lr"} == set(r), step
        for name in ("lm_loss", "q_halt_loss", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "count"):
            atol = LOSS_ATOL if name.endswith("loss") else 1e-6
            np.testing.assert_allclose(j[name], r[name], rtol=METRIC_RTOL, atol=atol, err_msg=f"step {step}: {name}")
            worst = max(worst, abs(j[name] - r[name]))
    print(f"counts per step {counts}; worst absolute metric deviation {worst:.2e}")


def test_parameters_and_ema_match_the_reference_after_training(training):
    """Every dense parameter (AdamATan2 on the reference's gradients), the puzzle-embedding table (its
    sparse sign-SGD) and the EMA of the dense parameters (its EMAHelper) after TRAIN_STEPS steps."""
    _, _, start, state, ref_params, ref_ema = training
    assert_trained_params_match(start, state.params, ref_params)
    assert_trained_params_match(start["dense"], state.ema, ref_ema)
    deviation = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(ref_ema)))
    param_dev = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)))
    print(f"max |param diff| {param_dev:.2e}, max |EMA diff| {deviation:.2e}")
