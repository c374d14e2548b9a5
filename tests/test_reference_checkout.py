"""hrm_jax against the reference's own code (sapientinc/HRM), where a checkout of it is at hand.

Every other parity test compares against our transcriptions of the reference (tests/numpy_reference.py,
export/torch_model.py, export/torch_train.py). This one imports the reference's modules
(models/hrm/hrm_act_v1.py, models/losses.py, models/sparse_embedding.py) from a checkout and runs
them on the CPU in float32, so a misreading shared by all our transcriptions would show here. The
reference cannot be copied into this repository, and CI has no internet, so it is skipped unless
`HRM_REFERENCE_DIR` names a checkout (and pydantic, which the reference's config needs, is installed):

    git clone https://github.com/sapientinc/HRM /tmp/HRM
    make test-reference HRM_REFERENCE_DIR=/tmp/HRM   # installs pydantic, runs this file

flash-attn has no CPU build: a stand-in `flash_attn.flash_attn_func` computes the same non-causal
attention with torch's SDPA. The reference's AdamATan2 is a CUDA extension: the dense update uses
export.torch_train.adam_atan2_ (tested against hrm_jax's optimizer elsewhere); the sparse
sign-SGD, the model, the ACT wrapper and the loss head are the reference's.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pydantic", reason="the reference's model config is a pydantic model")

import hrm_jax as H  # noqa: E402
from benchmarks.reference_trainer import ReferenceTrainer  # noqa: E402
from export.convert import from_torch_state_dict, to_torch_state_dict  # noqa: E402
from hrm_jax.config import IMPLEMENTATION_FIELDS, TrainConfig  # noqa: E402
from tests.model_helpers import random_batch  # noqa: E402
from tests.test_export_torch import (  # noqa: E402
    JAX_STEP,
    PARITY_BATCH,
    PARITY_RTOL,
    VARIANTS,
    random_params,
    rel_err,
    small_config,
)
from tests.test_torch_train_step import (  # noqa: E402
    METRIC_RTOL,
    assert_trained_params_match,
    batches,
    train_jax,
    train_torch,
)

REFERENCE_DIR = os.environ.get("HRM_REFERENCE_DIR")
pytestmark = pytest.mark.skipif(
    not REFERENCE_DIR or not (Path(REFERENCE_DIR) / "models" / "hrm" / "hrm_act_v1.py").is_file(),
    reason="set HRM_REFERENCE_DIR to a checkout of github.com/sapientinc/HRM to compare with its code")

SEGMENTS = 4
TRAIN_STEPS = 5  # halt_max_steps 3: rows halt by step 3 and take new examples at step 4


def _sdpa_flash_attn_func(q, k, v, causal=False, **_):
    """flash_attn_func's contract ([batch, seq, heads, head_dim] in and out) through torch SDPA."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal)
    return out.transpose(1, 2).contiguous()


@pytest.fixture(scope="module")
def ref():
    """The reference's modules, imported from the checkout with the SDPA stand-in for flash-attn."""
    stand_in = types.ModuleType("flash_attn")
    stand_in.flash_attn_func = _sdpa_flash_attn_func
    sys.modules.setdefault("flash_attn", stand_in)
    sys.path.insert(0, REFERENCE_DIR)
    try:
        from models import losses, sparse_embedding  # noqa: PLC0415
        from models.hrm import hrm_act_v1  # noqa: PLC0415
    finally:
        sys.path.remove(REFERENCE_DIR)
    return types.SimpleNamespace(act=hrm_act_v1, losses=losses, sparse=sparse_embedding)


def reference_model(ref, cfg, params, batch_size):
    """ACTLossHead(HierarchicalReasoningModel_ACTV1) of the checkout holding hrm_jax's params."""
    # HRMConfig's fields carry the reference config's names; the kernel choices are ours alone.
    config = {k: v for k, v in cfg.to_dict().items() if k not in IMPLEMENTATION_FIELDS} | {"batch_size": batch_size}
    model = ref.losses.ACTLossHead(ref.act.HierarchicalReasoningModel_ACTV1(config), "stablemax_cross_entropy")
    model.load_state_dict(to_torch_state_dict(jax.device_get(params), cfg), strict=True)
    return model


def reference_carry(ref, z_H, z_L, steps, halted, batch):
    act = ref.act
    return act.HierarchicalReasoningModel_ACTV1Carry(
        act.HierarchicalReasoningModel_ACTV1InnerCarry(torch.tensor(z_H), torch.tensor(z_L)),
        torch.tensor(steps), torch.tensor(halted), {k: torch.tensor(v) for k, v in batch.items()})


@pytest.mark.parametrize("index", range(len(VARIANTS)))
def test_every_eval_segment_matches_the_reference(ref, index):
    """Eval mode, each segment started from the carry hrm_jax reached (the first from all-halted,
    the last after every row halted at halt_max_steps, so it restarts them): z values, logits,
    Q logits within PARITY_RTOL, step counters and halting flags exactly."""
    cfg = small_config(halt_max_steps=SEGMENTS - 1, **VARIANTS[index])
    params, batch = random_params(cfg, seed=6), random_batch(cfg, PARITY_BATCH, seed=7)
    model = reference_model(ref, cfg, params, PARITY_BATCH).eval()
    carry = H.initial_carry(cfg, batch)
    for segment in range(SEGMENTS):
        start = reference_carry(ref, *(np.asarray(getattr(carry, n)) for n in ("z_H", "z_L", "steps", "halted")),
                                {k: np.asarray(v) for k, v in carry.current_data.items()})
        with torch.no_grad():
            got, _, _, outputs, _ = model(carry=start, batch={k: torch.tensor(v) for k, v in batch.items()},
                                          return_keys=["logits", "q_halt_logits", "q_continue_logits"])
        carry, want = JAX_STEP(params, cfg, carry, batch, None, train=False)
        errors = {"z_H": rel_err(got.inner_carry.z_H, np.asarray(carry.z_H)),
                  "z_L": rel_err(got.inner_carry.z_L, np.asarray(carry.z_L))}
        errors |= {name: rel_err(outputs[name], np.asarray(want[name]))
                   for name in ("logits", "q_halt_logits", "q_continue_logits")}
        assert max(errors.values()) <= PARITY_RTOL, (VARIANTS[index], segment + 1, errors)
        assert got.steps.tolist() == np.asarray(carry.steps).tolist()
        assert got.halted.tolist() == np.asarray(carry.halted).tolist()


@pytest.fixture(scope="module")
def training(ref):
    """TRAIN_STEPS steps of hrm_jax.train.train_step and of the reference's train_batch (world size
    1): its model and ACTLossHead, `((1 / global_batch_size) * loss).backward()`, the AdamATan2
    update and its CastedSparseEmbeddingSignSGD_Distributed, on the same warm-up/cosine schedule.
    Exploration is off (the frameworks draw different numbers); a random Q head without bias makes
    some rows halt early on q_halt > q_continue, so the carry holds rows at different steps."""
    cfg = small_config(puzzle_emb_ndim=32, halt_exploration_prob=0.0)
    tc = TrainConfig(global_batch_size=6, lr=3e-3, lr_warmup_steps=2, lr_min_ratio=0.3, weight_decay=0.5,
                     puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.2)
    total_steps = 10
    params = jax.tree.map(np.array, random_params(cfg, seed=4))  # copies: train_step donates its state
    params["dense"]["q_head"]["bias"][:] = 0.0  # q_halt vs q_continue then differs from row to row
    data = batches(cfg, tc.global_batch_size, TRAIN_STEPS)  # ~10% of the labels ignored

    state, jax_metrics = train_jax(cfg, tc, total_steps, params, data)
    model = reference_model(ref, cfg, params, tc.global_batch_size)
    ref_metrics = train_torch(ReferenceTrainer(ref, model, tc, total_steps), data, tc.global_batch_size)
    ref_params = from_torch_state_dict(model.state_dict(), cfg)
    return jax_metrics, ref_metrics, params, state.params, ref_params


def test_training_metrics_match_the_reference_every_step(training):
    jax_metrics, ref_metrics, *_ = training
    counts = [m["count"] for m in jax_metrics]
    assert any(0 < count < 6 for count in counts), f"some rows, not all, must halt at some step: {counts}"
    for step, (j, r) in enumerate(zip(jax_metrics, ref_metrics)):
        for name in ("lm_loss", "q_halt_loss", "q_continue_loss", "accuracy", "exact_accuracy", "q_halt_accuracy",
                     "steps", "count"):
            np.testing.assert_allclose(j[name], r[name], rtol=METRIC_RTOL, atol=1e-6, err_msg=f"step {step}: {name}")


def test_parameters_match_the_reference_after_training(training):
    """Every dense parameter (AdamATan2 on the reference's gradients) and the puzzle-embedding table
    (the reference's sparse sign-SGD), after TRAIN_STEPS steps."""
    _, _, start, jax_params, ref_params = training
    assert_trained_params_match(start, jax_params, ref_params)
