"""The training process the fault-injection tests kill (tests/test_faults.py): the toy task of
tests/test_train.py trained through the CLIs' loop flags and exit path, so SIGTERM and bad folders
behave as in the task CLIs (one line, exit code 0 or 2).
python -m tests.fault_worker DATA --out DIR [loop flags]."""

import argparse
import json
import sys

from experiments import common
from hrm_jax import cli
from hrm_jax.config import LoopConfig, RunConfig
from tests.test_train import CFG, TC

# Long enough that kills land at many points: checkpoints every 2 steps and at each evaluation
# (every 4), log windows of 3 steps, so most checkpoints are taken inside a window.
TOTAL_STEPS = 24
RUN_FLAGS = ["--eval-every", "4", "--checkpoint-every", "2", "--log-every", "3", "--no-progress"]


@cli.cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    cli.add_config_flags(parser, LoopConfig)
    args = parser.parse_args(argv)
    loop = cli.config_from_flags(LoopConfig(total_steps=TOTAL_STEPS), args)
    summary = common.train_or_exit(RunConfig(model=CFG, optim=TC, loop=loop), args.data)
    print(json.dumps({"step": summary["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
