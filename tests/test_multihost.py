"""Training across processes (hrm_jax/distributed.py, the multi-process paths of parallel.py, train.py and
checkpoint.py): two processes on localhost with 2 CPU devices each, against one process with 4 devices and
with 1, through tests/multihost_worker.py; the cluster resolution (flags > environment > SLURM) and the
one-line errors of the CLIs.

Every subprocess runs under a timeout and every run under a heartbeat timeout, so a process that hangs or
dies fails the test instead of hanging CI.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hrm_jax import checkpoint as ckpt
from hrm_jax.distributed import Cluster, ClusterConfig, DistributedError, resolve
from hrm_jax.logging_utils import read_metrics
from hrm_jax.train import TIMING_METRICS
from tests.test_train import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A two-process run and a one-process run on the same devices differ only in how the cross-device sums (the
# gradient psum, the metric sums) are associated: gloo's ring over the processes, XLA:CPU's in-process
# all-reduce; against one device, in how the batch's rows are summed. Reassociating a sum perturbs it by a few
# eps32 (1.2e-7) of the terms' magnitudes, so a gradient element by a relative rho = kappa * few eps32 (kappa:
# the cancellation in its sum). AdamATan2's update is normalised (atan2(m, sqrt(v)) per element), so it moves by
# about lr * rho whatever the parameter's size, and after k steps a parameter is off by about k * lr * rho.
# Bound: rho = 1e-3 (cancellation up to ~2800x), k = 6, lr = 1e-3: 6e-6 absolute on every parameter (all are
# float32 below 5 in magnitude). Measured: 1.1e-7 against 4 devices, 1.9e-7 against one (and 2.4e-7 between one
# process's 4-device and 1-device runs: a second process adds nothing); BUILD_NOTES, "Training across hosts".
# The sign-SGD puzzle-embedding rows move by exactly +-lr: they match bit for bit unless a row gradient's sign
# flips, which would exceed the bound by far, as would a flipped first (sign-like) AdamATan2 step.
PARAM_BOUND = 6 * 1e-3 * 1e-3
EVAL_BOUND = 1e-4  # eval metrics (means over 20 rows) of parameters within PARAM_BOUND of each other
PROCESS_TIMEOUT = 420  # seconds for one worker; each phase takes under a minute on 2 cores
HEARTBEAT = "30"  # the two-process phase: generous on a loaded machine; a peer that dies fails within it
DEAD_PEER_HEARTBEAT = "5"
_CLUSTER_ENV = ("HRM_", "SLURM_", "JAX_COORDINATOR")
SLURM_PORT_BASE = 65535 - 2**12 + 1  # jax's SLURM detection: port = SLURM_JOB_ID % 4096 + this


def clean_env(**extra: str) -> dict:
    """This environment without cluster variables (CI may itself run under SLURM), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV)}
    return {**env, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def free_port(low: int = 20000, high: int = 60000) -> int:
    for port in range(low + os.getpid() % 997, high):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def launch(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(processes: list[subprocess.Popen], timeout: float = PROCESS_TIMEOUT) -> list[tuple[int, str]]:
    """(return code, stderr tail) of each process; kills every one still running after `timeout` seconds."""
    deadline, results = time.monotonic() + timeout, []
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            _, err = process.communicate()
            err += f"\n[killed after {timeout} s]"
        results.append((process.returncode, err[-3000:]))
    return results


def two_processes(phase: str, work, port: int, heartbeat: str = HEARTBEAT) -> list[tuple[int, str]]:
    """Process 0 joins through the flags, process 1 through SLURM's variables (jax's own detection)."""
    flags = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "0"]
    slurm = dict(SLURM_JOB_ID=str(port - SLURM_PORT_BASE), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                 SLURM_PROCID="1", SLURM_LOCALID="1")
    common = [phase, str(work), "--local-devices", "2", "--heartbeat-timeout", heartbeat]
    return finish([launch(common + flags, clean_env()),
                   launch(common, clean_env(**slurm))])


def states(path) -> dict[str, dict[str, np.ndarray]]:
    runs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in np.load(path).items():
        run, leaf = key.split("|", 1)
        runs.setdefault(run, {})[leaf] = value
    return runs


def param_gap(a: dict, b: dict) -> tuple[float, str]:
    """The largest |a - b| over the parameters, and the leaf where it is."""
    gaps = {k: float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if k.startswith(".params")}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def assert_equal_states(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differing, f"{what}: {differing[:5]} differ"


def assert_same_decisions(a: dict, b: dict, what: str) -> None:
    """Halting: every row halted at the same step and holds the same example."""
    for leaf in (".carry.halted", ".carry.steps", ".carry.current_data['inputs']", ".step", ".rng"):
        np.testing.assert_array_equal(a[leaf], b[leaf], err_msg=f"{what}: {leaf}")


def train_records(path) -> list[tuple[int, str, dict]]:
    return [(r["step"], r["split"], {k: v for k, v in r["metrics"].items() if k not in TIMING_METRICS})
            for r in read_metrics(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process phase, then the one-process phase that resumes its step-3 checkpoint."""
    work = tmp_path_factory.mktemp("multihost")
    make_dataset(work / "data")
    port = free_port(SLURM_PORT_BASE, 65535)
    for (code, err), who in zip(two_processes("multi", work, port), ("process 0", "process 1")):
        assert code == 0, f"{who} of the two-process phase failed ({code}):\n{err}"
    run_single(work, 4)
    return work


def run_single(work, devices: int) -> None:
    ((code, err),) = finish([launch(["single", str(work), "--local-devices", str(devices)], clean_env())])
    assert code == 0, f"the one-process phase on {devices} device(s) failed ({code}):\n{err}"


def check_against_one_process(multi: dict, one: dict, devices: int) -> None:
    """One process on `devices` devices against the two processes: the same decisions and parameters up to
    summation order; the two-process step-3 checkpoint restored exactly, and resumed to where the
    uninterrupted two-process run ends."""
    ref, restored, resumed = (one[f"{kind}{devices}"] for kind in ("ref", "restored", "resumed"))
    assert_same_decisions(multi["full"], ref, f"2x2 vs 1x{devices}")
    gap, leaf = param_gap(multi["full"], ref)
    assert gap <= PARAM_BOUND, f"2x2 vs 1x{devices}: {leaf} differs by {gap:.3g}"
    print(f"2x2 vs 1x{devices}: parameters within {gap:.2g} (worst leaf {leaf})")
    assert_equal_states(restored, multi["part"], f"restored on 1x{devices} vs the state the two processes saved")
    assert_same_decisions(resumed, multi["full"], f"resumed on 1x{devices} vs 2x2")
    gap, leaf = param_gap(resumed, multi["full"])
    assert gap <= PARAM_BOUND, f"resumed on 1x{devices} vs 2x2 uninterrupted: {leaf} differs by {gap:.3g}"


def test_two_processes_match_one_and_resume_on_another_process_count(runs):
    p0, p1 = states(runs / "multi_p0.npz"), states(runs / "multi_p1.npz")
    # The replicas of both processes are identical, bit for bit.
    for run in p0:
        assert_equal_states(p0[run], p1[run], f"{run}: process 0 vs process 1")
    # Resumed with the same process count: bit for bit the uninterrupted run.
    assert_equal_states(p0["resumed"], p0["full"], "2x2 resumed at step 3 vs uninterrupted")
    check_against_one_process(p0, states(runs / "single4_p0.npz"), 4)


@pytest.mark.slow
def test_one_device_matches_and_resumes_the_two_process_run(runs):
    run_single(runs, 1)
    check_against_one_process(states(runs / "multi_p0.npz"), states(runs / "single1_p0.npz"), 1)


def test_process_zero_alone_logs_and_checkpoints_are_written_once(runs):
    full = train_records(runs / "multi_full" / "metrics.jsonl")
    # One record per log window and evaluation: nothing duplicated by the second process.
    assert [(step, split) for step, split, _ in full] == [(3, "train"), (3, "eval"), (6, "train"), (6, "eval")]
    assert (runs / "multi_full" / "curves.png").stat().st_size > 0
    assert sorted(os.listdir(runs / "multi_full")) == ["best", "checkpoints", "curves.png", "metrics.jsonl"]
    # The resumed run rewrote exactly the records of the uninterrupted one.
    assert train_records(runs / "multi_part" / "metrics.jsonl") == full
    # Evaluation reduced over both processes: all 20 test rows counted once, the metrics of one process.
    reports = [json.loads((runs / f"multi_p{p}.json").read_text()) for p in (0, 1)]
    single = json.loads((runs / "single4_p0.json").read_text())
    assert reports[0]["eval"] == reports[1]["eval"] and reports[0]["eval"]["count"] == 20
    for key, value in single["eval"].items():
        assert abs(reports[0]["eval"][key] - value) <= EVAL_BOUND, (key, reports[0]["eval"][key], value)
    # Checkpoints: written once, complete, with their manifests.
    for step in (3, 6):
        assert ckpt.step_problem(str(runs / "multi_full" / ckpt.PERIODIC_DIR / str(step))) is None


def test_a_stop_signal_to_one_process_stops_all_at_the_same_step(runs):
    reports = [json.loads((runs / f"multi_p{p}.json").read_text())["stopped"] for p in (0, 1)]
    step = reports[0]["step"]
    assert reports[1]["step"] == step and step % 3 == 0 and 3 <= step < 60, reports
    assert reports[0]["by"] == "a signal to another process" and reports[1]["by"] == "SIGTERM", reports
    assert ckpt.step_problem(str(runs / "signal" / ckpt.PERIODIC_DIR / str(step))) is None


def test_a_dead_peer_ends_the_others_instead_of_hanging(tmp_path):
    """Process 1 is killed (-9) just after joining; process 0 is stopped by the runtime within the heartbeat
    timeout (5 s), not left waiting in a collective."""
    make_dataset(tmp_path / "data")
    started = time.monotonic()
    (code0, err0), (code1, _) = two_processes("die", tmp_path, free_port(SLURM_PORT_BASE, 65535),
                                                  DEAD_PEER_HEARTBEAT)
    elapsed = time.monotonic() - started
    assert code1 == -9, code1
    assert code0 != 0 and "[killed after" not in err0, err0
    assert elapsed < 120, f"process 0 took {elapsed:.0f} s to stop"


# Cluster resolution and errors ----------------------------------------------------------------------
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
         "SLURM_LOCALID": "1"}


def test_resolution_order_is_flags_then_environment_then_slurm():
    assert resolve(ClusterConfig(), {}) is None  # nothing set: one process
    flags = ClusterConfig(coordinator="node0:1234", num_processes=2, process_id=1)
    env = {"HRM_COORDINATOR": "envhost:99", "HRM_NUM_PROCESSES": "4", "HRM_PROCESS_ID": "3",
           "JAX_COORDINATOR_ADDRESS": "jaxhost:98", **SLURM}
    assert resolve(flags, env) == Cluster("node0:1234", 2, 1, {k: "flag" for k in ("coordinator", "num_processes",
                                                                                   "process_id")})
    got = resolve(ClusterConfig(process_id=0), env)
    assert (got.coordinator, got.num_processes, got.process_id) == ("envhost:99", 4, 0)
    assert got.sources == {"coordinator": "HRM_COORDINATOR", "num_processes": "HRM_NUM_PROCESSES", "process_id": "flag"}
    # jax's variable for the address, after ours.
    got = resolve(ClusterConfig(num_processes=2, process_id=0), {"JAX_COORDINATOR_ADDRESS": "jaxhost:98"})
    assert got.coordinator == "jaxhost:98" and got.sources["coordinator"] == "JAX_COORDINATOR_ADDRESS"
    # A SLURM step of several tasks: what is not given is left to jax's own detection (None).
    got = resolve(ClusterConfig(), SLURM)
    assert (got.coordinator, got.num_processes, got.process_id) == (None, None, None)
    assert set(got.sources.values()) == {"slurm"}
    got = resolve(ClusterConfig(coordinator="head:777"), {**SLURM, "HRM_PROCESS_ID": "5"})
    assert (got.coordinator, got.num_processes, got.process_id) == ("head:777", None, 5)
    assert got.sources == {"coordinator": "flag", "num_processes": "slurm", "process_id": "HRM_PROCESS_ID"}
    # One process: a plain run, under SLURM too (sbatch with one task), or when asked for explicitly.
    assert resolve(ClusterConfig(), {**SLURM, "SLURM_NTASKS": "1"}) is None
    assert resolve(ClusterConfig(num_processes=1), SLURM) is None
    incomplete = {k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}  # not a job step jax recognises
    with pytest.raises(DistributedError, match="--coordinator"):
        resolve(ClusterConfig(num_processes=2, process_id=0), incomplete)


@pytest.mark.parametrize(("config", "env", "message"), [
    (ClusterConfig(num_processes=2), {}, r"num_processes \(from flag\) given, --coordinator \(or \$HRM_COORDINATOR\) "
                                         r"and --process-id \(or \$HRM_PROCESS_ID\) missing"),
    (ClusterConfig(coordinator="node0", num_processes=2, process_id=0), {}, "'node0' .* is not HOST:PORT"),
    (ClusterConfig(coordinator="node0:99999", num_processes=2, process_id=0), {}, "is not HOST:PORT"),
    (ClusterConfig(coordinator="node0:5", num_processes=2, process_id=2), {}, "process_id=2 .* must be 0 to 1"),
    (ClusterConfig(coordinator="node0:5", num_processes=0, process_id=0), {}, "num_processes=0 .* at least 1"),
    (ClusterConfig(num_processes=1, process_id=1), {}, "the only process id is 0"),
    (ClusterConfig(), {"HRM_NUM_PROCESSES": "two"}, "HRM_NUM_PROCESSES='two' is not an integer"),
])
def test_bad_cluster_settings_name_the_setting_and_the_fix(config, env, message):
    with pytest.raises(DistributedError, match=message):
        resolve(config, env)


def test_bad_timeouts_are_refused():
    with pytest.raises(DistributedError, match="coordinator_timeout=0 must be a positive number"):
        ClusterConfig(coordinator_timeout=0)
    with pytest.raises(DistributedError, match=r"heartbeat_timeout=-5 must be .* \(--heartbeat-timeout\)"):
        ClusterConfig(heartbeat_timeout=-5)


def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from experiments import sudoku  # noqa: PLC0415 (the CLI imports the whole package)

    for name in list(os.environ):
        if name.startswith(_CLUSTER_ENV):
            monkeypatch.delenv(name)
    code = sudoku.main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_refuses_bad_cluster_flags_with_one_line(tmp_path, monkeypatch, capsys):
    train = ["train", "--data", str(tmp_path / "data")]
    code, err = run_cli(train + ["--out", str(tmp_path / "run"), "--num-processes", "2", "--process-id", "0"],
                        monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 0 and "--coordinator (or $HRM_COORDINATOR) missing" in err, err
    code, err = run_cli(train + ["--coordinator", "localhost:5", "--num-processes", "2", "--process-id", "1"],
                        monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 0 and "needs --out DIR, the same folder for every process" in err, err
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(train + ["--out", str(tmp_path / "run"), "--coordinator", f"localhost:{port}",
                                     "--num-processes", "2", "--process-id", "0"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 0 and f"port {port} is already in use on this host" in err, err
    assert not (tmp_path / "run").exists()


def test_a_process_that_cannot_join_exits_with_one_line(tmp_path):
    """Nobody hosts the coordinator (process 1), nobody else joins (process 0): exit code 2 after the timeout,
    one line saying which side is missing, instead of jax's abort with a C++ stack trace. Joining after jax
    is in use is refused at once."""
    def cli(process_id: str, port: int) -> subprocess.Popen:
        argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / f"run{process_id}"),
                "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", process_id,
                "--coordinator-timeout", "3"]
        return subprocess.Popen([sys.executable, "-m", "experiments.sudoku", *argv], cwd=ROOT, env=clean_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    lonely_port, empty_port = free_port(), free_port(40000)
    # And a script that used jax before joining: a DistributedError saying so, not a hang.
    late = ("import jax; jax.devices(); from hrm_jax import distributed as d\n"
            f"cluster = d.resolve(d.ClusterConfig(coordinator='localhost:{free_port(50000)}', num_processes=2, "
            "process_id=1, coordinator_timeout=30))\n"
            "try:\n    d.initialize(cluster)\nexcept d.DistributedError as err:\n    print(err)")
    late_process = subprocess.Popen([sys.executable, "-c", late], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    results = finish([cli("0", lonely_port), cli("1", empty_port)], timeout=120)
    late_out, _ = late_process.communicate(timeout=120)
    assert "before anything else uses jax" in late_out, late_out
    expected = [f"only part of the 2 processes joined the coordinator at localhost:{lonely_port} within 3",
                f"no coordinator answers at localhost:{empty_port} after 3"]
    for (code, err), phrase in zip(results, expected):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and phrase in lines[0], err
    assert "process ids 1 to 1" in results[0][1] and "start process 0 (it hosts the coordinator)" in results[1][1]
