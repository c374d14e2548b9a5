"""Checkpoints: a bit-exact round trip of the whole train state, params for evaluation, refusal of a
checkpoint written with another configuration, clear errors for missing or corrupt directories,
damaged checkpoints detected by their manifest and skipped for the previous good one."""

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrm_jax import checkpoint as ckpt
from hrm_jax import manifest
from hrm_jax.config import RunConfig, TrainConfig
from hrm_jax.optim import AdamATan2State
from hrm_jax.presets import tiny
from hrm_jax.train import TrainState, abstract_train_state, init_train_state, on_default_device
from tests.test_train import CFG, TC

TOTAL = 8
RUN = RunConfig(model=CFG, optim=TC)
SAMPLER_STATE = {"version": 1, "pass": 3, "rng": {"state": {"counter": [1, 2, 3, 2**63 + 5]}}, "start": 7}


def random_state(seed: int = 0) -> TrainState:
    """A fresh state with every leaf replaced by random values of its dtype (zeros would hide a
    restore that drops or swaps leaves)."""
    state = init_train_state(CFG, TC, TOTAL)
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        if x.dtype == np.bool_:
            return rng.random(x.shape) < 0.5
        if np.issubdtype(x.dtype, np.integer):
            return rng.integers(0, 100, x.shape).astype(x.dtype)
        return rng.normal(size=x.shape).astype(x.dtype)

    return on_default_device(jax.tree.map(lambda x: jnp.asarray(fill(x)), state))


def save(out_dir, state, *, best=False, **extra):
    runs = ckpt.RunCheckpoints(out_dir, max_to_keep=2)
    meta = ckpt.make_meta(RUN, TOTAL, int(state.step), SAMPLER_STATE, **extra)
    path = runs.save(state, meta, best=best)
    runs.close()
    return path


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact_and_keeps_types(tmp_path):
    state = random_state().replace(step=jnp.asarray(5, jnp.int32))
    host = jax.device_get(state)
    save(tmp_path, state, best_exact_accuracy=0.25)
    restored, meta = ckpt.restore(tmp_path / "checkpoints", abstract_train_state(CFG, TC, TOTAL),
                                  run_config=RUN, total_steps=TOTAL)
    assert_same_tree(restored, host)
    assert isinstance(restored.opt_state, AdamATan2State)  # not a list (restored with a target)
    assert meta["sampler"] == SAMPLER_STATE and meta["step"] == 5 and meta["best_exact_accuracy"] == 0.25
    assert ckpt.config_from_dict(type(CFG), meta["run_config"]["model"], "x") == CFG
    assert meta["run_config"]["optim"] == TC.to_dict() and meta["model_family"] == "hrm"


def test_periodic_keeps_newest_best_kept_apart_and_params_for_eval(tmp_path):
    states = [random_state(seed).replace(step=jnp.asarray(step, jnp.int32)) for seed, step in enumerate((1, 2, 3))]
    for state in states:
        save(tmp_path, state)
    best_path = save(tmp_path, states[0], best=True)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]  # max_to_keep=2
    assert os.listdir(tmp_path / "best") == ["1"]

    for path, expected in ((tmp_path, states[2]), (tmp_path / "checkpoints", states[2]),
                           (tmp_path / "checkpoints" / "2", states[1]), (tmp_path / "best", states[0]),
                           (best_path, states[0])):
        params, config = ckpt.load_params_for_eval(path)
        assert config == CFG
        assert_same_tree(params, jax.device_get(expected.params))


def test_gpu_kernel_choices_fall_back_to_xla_off_gpu(tmp_path):
    """A run trained with cuDNN attention and the Hopper kernels evaluates on this CPU (with XLA)."""
    gpu_config = CFG.replace(forward_dtype="bfloat16", attention_impl="cudnn", norm_impl="pallas", mlp_impl="pallas")
    params = jax.device_get(random_state().params)
    ckpt.save_params(tmp_path, params, gpu_config)
    loaded, config = ckpt.load_params_for_eval(tmp_path)
    assert config == gpu_config.replace(attention_impl="xla", norm_impl="xla", mlp_impl="xla")
    assert_same_tree(loaded, params)


def test_mismatched_config_is_refused_naming_each_field(tmp_path):
    save(tmp_path, random_state())
    abstract = abstract_train_state(CFG, TC, TOTAL)
    other_model, other_train = CFG.replace(hidden_size=64), TC.replace(lr=3e-4, seed=4)
    with pytest.raises(ckpt.CheckpointMismatchError) as info:
        ckpt.restore(tmp_path, abstract, run_config=RunConfig(model=other_model, optim=other_train),
                     total_steps=TOTAL)
    message = str(info.value)
    for part in ("model.hidden_size: saved 32, now 64", "optim.lr: saved 0.001, now 0.0003",
                 "optim.seed: saved 0, now 4", str(tmp_path)):
        assert part in message
    assert "num_heads" not in message  # only the differing fields
    with pytest.raises(ckpt.CheckpointMismatchError, match="total_steps: saved 8, now 9"):
        ckpt.restore(tmp_path, abstract, run_config=RUN, total_steps=9)


def test_missing_empty_and_corrupt_checkpoints_name_the_path(tmp_path):
    abstract = abstract_train_state(CFG, TC, TOTAL)
    kwargs = dict(run_config=RUN, total_steps=TOTAL)
    missing = tmp_path / "nowhere"
    with pytest.raises(ckpt.CheckpointError, match=f"{missing}: no such checkpoint directory"):
        ckpt.restore(missing, abstract, **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_params_for_eval(tmp_path / "empty")

    step_dir = save(tmp_path / "run", random_state())
    shutil.rmtree(os.path.join(step_dir, "params"))
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint \(steps found: \[\d+\]\)"):
        ckpt.restore(tmp_path / "run", abstract, **kwargs)
    with pytest.raises(ckpt.CheckpointError, match=f"{step_dir}: damaged checkpoint \\(params/.* is missing\\)"):
        ckpt.load_params_for_eval(step_dir)
    os.remove(os.path.join(step_dir, manifest.MANIFEST_FILE))  # as if the save had been killed before it
    with pytest.raises(ckpt.CheckpointError, match="no hrm_manifest.json: the save did not finish"):
        ckpt.load_params_for_eval(step_dir)
    shutil.rmtree(os.path.join(step_dir, "meta"))
    with pytest.raises(ckpt.CheckpointError, match=str(tmp_path / "run")):
        ckpt.read_meta(tmp_path / "run")


# Format 1 (before the run configuration was one tree) -------------------------------------------
FORMAT1 = pathlib.Path(__file__).parent / "fixtures" / "checkpoint_format1"
# The tiny config tests/fixtures/make_checkpoint_format1.py saved it with.
FORMAT1_RUN = RunConfig(
    model=tiny(seq_len=4, vocab_size=5, hidden_size=8, num_heads=2, H_layers=1, L_layers=1, H_cycles=1,
               L_cycles=1, halt_max_steps=2, expansion=1.0),
    optim=TrainConfig(global_batch_size=2, epochs=1, eval_interval=None, lr=1e-3, lr_warmup_steps=1))


def format1_leaves(abstract) -> list[np.ndarray]:
    """The values the fixture's script wrote: its generator filled the leaves in tree order."""
    rng = np.random.default_rng(0)
    out = []
    for leaf in jax.tree_util.tree_leaves(abstract):
        if leaf.dtype == np.bool_:
            out.append(rng.random(leaf.shape) < 0.5)
        elif np.issubdtype(leaf.dtype, np.integer):
            out.append(rng.integers(0, 3, leaf.shape).astype(leaf.dtype))
        else:
            out.append((rng.integers(-8, 8, leaf.shape) / 4).astype(leaf.dtype))
    return out


def test_checkpoint_of_format_1_still_loads_and_resumes(tmp_path):
    """A checkpoint written by the code before RunConfig (tests/fixtures/make_checkpoint_format1.py run
    on that code) restores for evaluation and for resuming, compared against the new config tree."""
    run_dir = tmp_path / "old"
    shutil.copytree(FORMAT1, run_dir)  # orbax may touch files; keep the fixture pristine
    meta = ckpt.read_meta(run_dir)
    assert meta["model_family"] == "hrm" and meta["run_config"]["optim"] == FORMAT1_RUN.optim.to_dict()
    params, config = ckpt.load_params_for_eval(run_dir)
    assert config == FORMAT1_RUN.model
    abstract = abstract_train_state(FORMAT1_RUN.model, FORMAT1_RUN.optim, 4)
    state, meta = ckpt.restore(run_dir / "checkpoints", abstract, run_config=FORMAT1_RUN, total_steps=4)
    expected = format1_leaves(abstract)
    expected[0] = np.asarray(3, np.int32)  # TrainState.step, its first leaf, was then set to 3
    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(state)), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert_same_tree(params, jax.device_get(state.params))
    assert meta["step"] == 3 and meta["best_exact_accuracy"] == 0.5
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"optim\.lr: saved 0\.001, now 0\.002"):
        ckpt.restore(run_dir, abstract, run_config=FORMAT1_RUN.replace(optim=FORMAT1_RUN.optim.replace(lr=2e-3)),
                     total_steps=4)


def _largest_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
             if name != manifest.MANIFEST_FILE]
    return max(files, key=os.path.getsize)


def _flip_byte(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(step_dir):
    path = _largest_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _drop_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "train_state"))


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, _drop_item])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    runs = ckpt.RunCheckpoints(tmp_path, max_to_keep=3)
    states = {step: random_state(step).replace(step=jnp.asarray(step, jnp.int32)) for step in (2, 4)}
    paths = {step: runs.save(state, ckpt.make_meta(RUN, TOTAL, step, SAMPLER_STATE))
             for step, state in states.items()}
    assert all(manifest.problem(path) is None for path in paths.values())
    damage(paths[4])
    assert ckpt.step_problem(paths[4]) is not None

    # Readers skip it (nothing moved); the trainer's latest_step moves it aside and falls back.
    params, _ = ckpt.load_params_for_eval(tmp_path)
    assert_same_tree(params, jax.device_get(states[2].params))
    with pytest.raises(ckpt.CheckpointError, match=f"{paths[4]}: damaged checkpoint"):
        ckpt.load_params_for_eval(paths[4])
    assert runs.latest_step() == 2
    aside = [name for name in os.listdir(tmp_path / "checkpoints") if name.startswith("4.damaged-")]
    assert len(aside) == 1 and not os.path.exists(paths[4])
    restored, meta = ckpt.restore(tmp_path, abstract_train_state(CFG, TC, TOTAL), run_config=RUN,
                                  total_steps=TOTAL)
    assert meta["step"] == 2
    assert_same_tree(restored, jax.device_get(states[2]))
    # Step 4 can be saved again (the damaged copy no longer counts as saved).
    runs.save(states[4], ckpt.make_meta(RUN, TOTAL, 4, SAMPLER_STATE))
    assert runs.latest_step() == 4 and manifest.problem(paths[4]) is None
    runs.close()
