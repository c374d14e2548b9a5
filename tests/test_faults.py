"""Fault injection: a training process killed with SIGKILL at random points and inside checkpoint
writes, several times in a row and resumed each time, ends bit for bit where an uninterrupted run
with the same seed ends (parameters, optimizer state, carry, rng, every logged metric); SIGTERM
saves the current step and exits 0; a damaged checkpoint falls back to the previous one; a folder
holding a run without a checkpoint is never started over without --restart.

The killed process is tests/fault_worker.py (the toy task of tests/test_train.py, CPU, 24 steps)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hrm_jax import checkpoint as ckpt
from hrm_jax import manifest
from hrm_jax.config import RunConfig
from hrm_jax.train import TrainingError, abstract_train_state
from tests import fault_worker
from tests.test_train import CFG, TC, leaves_equal, make_dataset, train, train_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = fault_worker.TOTAL_STEPS
LOOP = {"eval_every": 4, "checkpoint_every": 2, "log_every": 3, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run (same flags as the worker), in this process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(CFG, TC, data, out, total_steps=TOTAL, **LOOP)
    return out


def launch(data, out, *flags, fault=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(ckpt.FAULT_ENV, None)
    if fault:
        env[ckpt.FAULT_ENV] = fault
    command = [sys.executable, "-m", "tests.fault_worker", data, "--out", str(out), *fault_worker.RUN_FLAGS, *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_step(out) -> int:
    """The last step in metrics.jsonl (complete lines only: the file is being written)."""
    try:
        lines = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("\n")), default=0)


def kill_at(process, out, target: int, delay: float) -> int:
    """SIGKILLs the process `delay` s after it has logged step >= target; returns its exit code."""
    while process.poll() is None and logged_step(out) < target:
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    return process.returncode


def steps(out) -> list[int]:
    return sorted(int(name) for name in os.listdir(pathlib.Path(out) / "checkpoints") if name.isdigit())


def final_state(out):
    state, _ = ckpt.restore(out, abstract_train_state(CFG, TC, TOTAL), run_config=RunConfig(model=CFG, optim=TC),
                            total_steps=TOTAL, step=TOTAL)
    return jax.device_get(state)


def assert_same_run(out, reference):
    assert steps(out)[-1] == TOTAL
    assert leaves_equal(final_state(out), final_state(reference))  # params, opt_state, carry, rng, step
    for split in ("train", "eval"):
        assert train_records(out, split) == train_records(reference, split), split  # every record, bitwise
    assert sorted(train_records(out)) == [*range(3, TOTAL + 1, 3)]


def flip_a_byte(step_dir):
    files = [os.path.join(r, n) for r, _, names in os.walk(step_dir) for n in names if n != manifest.MANIFEST_FILE]
    path = max(files, key=os.path.getsize)
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 3] ^= 0x40
    pathlib.Path(path).write_bytes(bytes(data))


def run_with_kills(data, out, random_kills: int, seed: int) -> list[int]:
    """Deterministic kills inside two saves, then `random_kills` at random points, then a corrupted
    latest checkpoint; returns the exit codes."""
    codes = [launch(data, out, fault="write@4").wait(timeout=300)]
    assert steps(out) == [2]  # orbax never lists the step whose write was killed
    codes.append(launch(data, out, "--resume", fault="manifest@6").wait(timeout=300))
    assert steps(out)[-1] == 6 and ckpt.step_problem(str(out / "checkpoints" / "6")) is not None
    rng = np.random.default_rng(seed)
    for _ in range(random_kills):
        resumed_from = max(steps(out))
        codes.append(kill_at(launch(data, out, "--resume"), out, int(rng.integers(resumed_from + 1, TOTAL - 1)),
                             float(rng.uniform(0.0, 0.3))))
    flip_a_byte(out / "checkpoints" / str(max(steps(out))))
    return codes


def check_kill_loop(data, reference, out, random_kills, seed):
    codes = run_with_kills(data, out, random_kills, seed)
    assert codes[:2] == [-signal.SIGKILL] * 2
    assert sum(code == -signal.SIGKILL for code in codes[2:]) >= max(1, random_kills // 2), codes
    summary = train(CFG, TC, data, out, total_steps=TOTAL, resume=True, **LOOP)
    assert summary["step"] == TOTAL and summary["stopped_by"] is None
    damaged = [name for name in os.listdir(out / "checkpoints") if ".damaged-" in name]
    assert any(name.startswith("6.damaged-") for name in damaged) and len(damaged) >= 2, damaged
    assert_same_run(out, reference)


def test_kill_nine_repeatedly_then_resume_matches_uninterrupted_run(data, reference, tmp_path):
    check_kill_loop(data, reference, tmp_path / "run", random_kills=1, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_nine_many_times(data, reference, tmp_path, seed):
    check_kill_loop(data, reference, tmp_path / "run", random_kills=8, seed=seed)


def test_sigterm_saves_the_current_step_and_exits_zero(data, reference, tmp_path):
    out = tmp_path / "run"
    process = launch(data, out)
    while process.poll() is None and logged_step(out) < 7:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    line = stdout.strip().splitlines()[-1]
    stopped = int(line.split(" at step ")[1].split(",")[0])
    assert line.startswith("stopped by SIGTERM at step ") and line.endswith(f"--out {out} --resume"), line
    assert 7 <= stopped < TOTAL and steps(out)[-1] == stopped
    assert ckpt.step_problem(str(out / "checkpoints" / str(stopped))) is None
    train(CFG, TC, data, out, total_steps=TOTAL, resume=True, **LOOP)
    assert_same_run(out, reference)


def test_a_run_without_checkpoint_is_never_overwritten(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 3, "split": "train", "metrics": {"lm_loss": 1.0}}\n')
    (out / "best").mkdir()
    (out / "best" / "note").write_text("kept")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for resume in (True, False):
        with pytest.raises(TrainingError, match="restart=True"):
            train(CFG, TC, data, out, total_steps=TOTAL, resume=resume, **LOOP)
    code = fault_worker.main([data, "--out", str(out), "--resume", *fault_worker.RUN_FLAGS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no resumable checkpoint (metrics.jsonl (1 records), best/ (note))" in err and "--restart" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    summary = train(CFG, TC, data, out, total_steps=4, restart=True, **LOOP)
    assert summary["step"] == 4
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert {aside / p.relative_to(out): b for p, b in before.items()} == {
        p: p.read_bytes() for p in aside.rglob("*") if p.is_file()}
