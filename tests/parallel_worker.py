"""Data-parallel checks on 2 CPU devices, run by tests/test_parallel.py in a subprocess (the device
count is fixed when jax starts): python -m tests.parallel_worker WORKDIR. Exits non-zero on failure."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hrm_jax import parallel  # noqa: E402
from hrm_jax.data.format import load_split  # noqa: E402
from hrm_jax.evaluate import EvaluationError, evaluate  # noqa: E402
from hrm_jax.train import TrainingError, init_train_state, parallel_train_step, put_state, train_step  # noqa: E402
from tests.test_train import CFG, NUM_TRAIN, TC, TOTAL, batch_of, make_dataset, train  # noqa: E402

# Exploration on half the rows, so the global-batch draws are exercised.
CFG_EXPLORE = CFG.replace(halt_exploration_prob=0.5)


def max_relative_gap(a, b) -> float:
    gaps = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) /
                  max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-12))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(gaps)


def check_step_parity() -> None:
    """Five steps on one device and split over two: same decisions, same numbers up to summation order."""
    mesh = parallel.data_mesh(2)
    rng = np.random.default_rng(3)
    batches = [batch_of(rng, rng.integers(1, NUM_TRAIN + 1, TC.global_batch_size)) for _ in range(5)]
    kwargs = dict(model_config=CFG_EXPLORE, train_config=TC, total_steps=TOTAL)
    single, split = init_train_state(**kwargs), put_state(init_train_state(**kwargs), mesh)
    step_split = parallel_train_step(mesh, CFG_EXPLORE, TC, TOTAL)
    for i, batch in enumerate(batches):
        single, want = train_step(single, batch, **kwargs)
        split, got = step_split(split, parallel.put_batch(batch, mesh))
        want, got = jax.device_get((want, got))
        for key in want:
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (i, key, got[key], want[key])
    assert len(split.carry.z_H.sharding.device_set) == 2, "the carry is not split over the devices"
    single, split = jax.device_get((single, split))
    # Decisions: every row halts at the same step and keeps the same example.
    np.testing.assert_array_equal(split.carry.halted, single.carry.halted)
    np.testing.assert_array_equal(split.carry.steps, single.carry.steps)
    np.testing.assert_array_equal(split.carry.current_data["inputs"], single.carry.current_data["inputs"])
    gap = max_relative_gap(split.params, single.params)
    assert gap <= 2e-5, f"parameters after 5 steps differ by {gap:.2g} (relative)"
    print(f"step parity: parameters within {gap:.2g} relative after 5 steps")


def check_loop_and_evaluation(workdir: str) -> None:
    data = make_dataset(os.path.join(workdir, "data"))
    common = dict(total_steps=TOTAL, eval_batch_size=8, progress=False, log_every=4)
    one = train(CFG_EXPLORE, TC, data, os.path.join(workdir, "one"), devices=1, **common)
    two = train(CFG_EXPLORE, TC, data, os.path.join(workdir, "two"), devices=2, **common)
    for key in ("lm_loss", "accuracy"):
        assert abs(two["train"][key] - one["train"][key]) <= 1e-4, (key, two["train"][key], one["train"][key])
        assert abs(two["eval"][key] - one["eval"][key]) <= 1e-4, (key, two["eval"][key], one["eval"][key])
    # A two-device run stopped at step 4 and resumed (from its orbax checkpoint) ends where the
    # uninterrupted one does.
    resumed_dir = os.path.join(workdir, "resumed")
    train(CFG_EXPLORE, TC, data, resumed_dir, devices=2, max_steps=4, **common)
    resumed = train(CFG_EXPLORE, TC, data, resumed_dir, devices=2, resume=True, **common)
    gap = max_relative_gap(jax.device_get(resumed["state"].params), jax.device_get(two["state"].params))
    assert resumed["step"] == TOTAL and gap <= 1e-6, (resumed["step"], gap)
    # Evaluation alone, split over the mesh, equals the one-device evaluation of the same parameters.
    params = jax.device_get(one["state"].params)
    split = load_split(data, "test")
    want = evaluate(params, CFG_EXPLORE, split, 8)["all"]
    got = evaluate(params, CFG_EXPLORE, split, 8, mesh=parallel.data_mesh(2))["all"]
    assert all(abs(got[k] - want[k]) <= 1e-5 for k in want), (got, want)
    print("loop, resume and evaluation: two devices match one")

    for kwargs, message in ((dict(devices=3), "this host has 2"),
                            (dict(devices=2, eval_batch_size=7), "eval batch size 7 cannot be split")):
        try:
            train(CFG_EXPLORE, TC, data, os.path.join(workdir, "bad"), **{**common, **kwargs})
        except TrainingError as err:
            assert message in str(err), str(err)
        else:
            raise AssertionError(f"train({kwargs}) did not refuse")
    try:
        evaluate(params, CFG_EXPLORE, split, 7, mesh=parallel.data_mesh(2))
    except EvaluationError as err:
        assert "batch_size 7 cannot be split evenly over 2 devices" in str(err), str(err)
    else:
        raise AssertionError("evaluate with batch 7 on 2 devices did not refuse")
    print("errors: clear messages")


if __name__ == "__main__":
    assert len(jax.devices()) == 2, jax.devices()
    check_step_parity()
    check_loop_and_evaluation(sys.argv[1])
