"""The processes of tests/test_multihost.py: the toy task of tests/test_train.py trained across processes on
jax's distributed runtime (CPU devices, gloo collectives), and the one-process runs it is compared with.

    python -m tests.multihost_worker multi WORKDIR --local-devices 2 [cluster flags]   (every process of the run)
    python -m tests.multihost_worker single WORKDIR --local-devices 4   (or 1: one process on 4 devices or one)
    python -m tests.multihost_worker die WORKDIR --local-devices 2 [cluster flags]     (process 1 is killed)

The processes join as the task CLIs do (experiments.common.join_cluster: flags, else HRM_* variables, else
SLURM's). WORKDIR/data must hold the toy dataset. Each process writes WORKDIR/<phase>_p<process>.npz (every
run's final state, one array per leaf, the carry gathered from all processes) and <phase>_p<process>.json
(single phases: single<devices>_p0).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time

# A schedule long enough for the stop-signal run; the other runs stop early (max_steps), so every run has the
# same (constant-rate) schedule and the step compiles once. A log window, so the processes' agreement point,
# and an evaluation with a checkpoint every three steps.
TOTAL, STEPS, EVERY = 60, 6, 3
LOOP = dict(total_steps=TOTAL, eval_every=EVERY, log_every=EVERY, eval_batch_size=8, progress=False,
            keep_checkpoints=4)


def parse(argv: list[str]) -> argparse.Namespace:
    from hrm_jax import cli, distributed  # noqa: PLC0415 (imports jax: only once XLA_FLAGS is set, see main)

    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("multi", "single", "die"))
    parser.add_argument("workdir")
    parser.add_argument("--local-devices", type=int, required=True)
    cli.add_config_flags(parser, distributed.ClusterConfig)
    args = parser.parse_args(argv)
    args.out_dir = args.workdir  # join_cluster insists on a shared run folder, as the CLIs do
    return args


def leaves(state) -> dict:
    import jax  # noqa: PLC0415

    from hrm_jax import parallel  # noqa: PLC0415

    host = parallel.fetch(state)
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]}


def save_states(path: str, states: dict) -> None:
    import numpy as np  # noqa: PLC0415

    np.savez(path, **{f"{run}|{key}": value for run, state in states.items() for key, value in leaves(state).items()})


def expect_refusal(run, message: str) -> None:
    from hrm_jax.train import TrainingError  # noqa: PLC0415

    try:
        run()
    except TrainingError as err:
        assert message in str(err), str(err)
    else:
        raise AssertionError(f"not refused: expected {message!r}")


def sigterm_once_logged(metrics_path: str) -> None:
    """SIGTERMs this process once process 0 has logged a record: a stop signal that reaches one process."""
    def watch() -> None:
        while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def multi(work: str, data: str, train, CFG, TC) -> dict:
    import jax  # noqa: PLC0415

    from hrm_jax import distributed  # noqa: PLC0415

    me = jax.process_index()
    expect_refusal(lambda: train(CFG, TC.replace(global_batch_size=6), data, os.path.join(work, "bad"), devices=2,
                                 **LOOP), "cannot be split evenly over 4 devices (2 processes x 2)")
    expect_refusal(lambda: train(CFG, TC.replace(seed=me), data, os.path.join(work, "bad"), devices=2, **LOOP),
                   "process 1 was started with other settings or data than process 0")
    full = train(CFG, TC, data, os.path.join(work, "multi_full"), devices=2, max_steps=STEPS, **LOOP)
    part = train(CFG, TC, data, os.path.join(work, "multi_part"), devices=2, max_steps=EVERY, **LOOP)
    if distributed.is_primary():  # the step-3 checkpoint, for the one-process resumes of the single phase
        shutil.copytree(os.path.join(work, "multi_part"), os.path.join(work, "from3"))
    distributed.barrier("copied")
    resumed = train(CFG, TC, data, os.path.join(work, "multi_part"), devices=2, max_steps=STEPS, resume=True, **LOOP)
    if me == 1:
        sigterm_once_logged(os.path.join(work, "signal", "metrics.jsonl"))
    stopped = train(CFG, TC, data, os.path.join(work, "signal"), devices=2, **LOOP)
    save_states(os.path.join(work, f"multi_p{me}.npz"),
                {"full": full["state"], "part": part["state"], "resumed": resumed["state"]})
    return {"steps": [full["step"], part["step"], resumed["step"]], "eval": full["eval"],
            "stopped": {"step": stopped["step"], "by": stopped["stopped_by"]}}


def single(work: str, data: str, train, CFG, TC, devices: int) -> dict:
    """One process on `devices` devices (none, the plain one-device step, for 1): an uninterrupted run, the
    two-process step-3 checkpoint restored, and resumed to the end."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from hrm_jax import checkpoint as ckpt  # noqa: PLC0415
    from hrm_jax import parallel  # noqa: PLC0415
    from hrm_jax.config import LoopConfig, RunConfig  # noqa: PLC0415
    from hrm_jax.train import abstract_train_state, restore_target  # noqa: PLC0415

    name = f"{devices}"
    ref = train(CFG, TC, data, os.path.join(work, f"single_ref{name}"), devices=devices, max_steps=STEPS, **LOOP)
    run = RunConfig(model=CFG, optim=TC, loop=LoopConfig(**LOOP))
    target = restore_target(abstract_train_state(CFG, TC, TOTAL), parallel.data_mesh(devices) if devices > 1 else None)
    restored, meta = ckpt.restore(os.path.join(work, "from3", ckpt.PERIODIC_DIR), target, run_config=run,
                                  total_steps=TOTAL)
    assert meta["step"] == EVERY, meta["step"]
    # The evaluation / solver path reads the same parameters onto this process's first device.
    params, _ = ckpt.load_params_for_eval(os.path.join(work, "from3"))
    for got, want in zip(jax.tree.leaves(parallel.fetch(params)), jax.tree.leaves(parallel.fetch(restored.params))):
        assert np.array_equal(got, want), "load_params_for_eval differs from the restored state"
    shutil.copytree(os.path.join(work, "from3"), os.path.join(work, f"resumed{name}"))
    resumed = train(CFG, TC, data, os.path.join(work, f"resumed{name}"), devices=devices, max_steps=STEPS,
                    resume=True, **LOOP)
    save_states(os.path.join(work, f"single{name}_p0.npz"),
                {f"ref{name}": ref["state"], f"restored{name}": restored, f"resumed{name}": resumed["state"]})
    return {"eval": ref["eval"]}


def die(work: str, data: str, train, CFG, TC) -> dict:
    """Process 1 dies at once (kill -9); process 0 trains and must be stopped by the runtime, not hang."""
    import jax  # noqa: PLC0415

    if jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    train(CFG, TC, data, os.path.join(work, "dead_peer"), devices=2, max_steps=STEPS, **LOOP)
    raise AssertionError("process 0 finished a run whose peer was dead")


def main(argv: list[str]) -> int:
    devices = argv[argv.index("--local-devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    args = parse(argv)
    from experiments import common  # noqa: PLC0415

    common.join_cluster(args)
    import jax  # noqa: PLC0415

    from tests.test_train import CFG, TC, train  # noqa: PLC0415

    data = os.path.join(args.workdir, "data")
    if args.phase == "single":
        report, name = single(args.workdir, data, train, CFG, TC, args.local_devices), f"single{args.local_devices}"
    else:
        report, name = {"multi": multi, "die": die}[args.phase](args.workdir, data, train, CFG, TC), args.phase
    with open(os.path.join(args.workdir, f"{name}_p{jax.process_index()}.json"), "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
