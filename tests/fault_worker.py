"""The training process the fault-injection tests kill (tests/test_faults.py): the toy task of
tests/test_train.py trained through the CLIs' run flags, so SIGTERM and bad folders take the CLI
path (one line, exit code 0 or 2). python -m tests.fault_worker DATA --out DIR [run flags]."""

import argparse
import json
import sys

from experiments import common
from tests.test_train import CFG, TC

# Long enough that kills land at many points: checkpoints every 2 steps and at each evaluation
# (every 4), log windows of 3 steps, so most checkpoints are taken inside a window.
TOTAL_STEPS = 24
RUN_FLAGS = ["--eval-every", "4", "--checkpoint-every", "2", "--log-every", "3", "--no-progress"]


@common.cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    common.add_train_flags(parser)
    args = parser.parse_args(argv)
    summary = common.run_training(CFG, TC, args.data, args.out, args, total_steps=TOTAL_STEPS)
    print(json.dumps({"step": summary["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
