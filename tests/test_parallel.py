"""Data parallelism (hrm_jax/parallel.py) on two CPU devices: the checks run in a subprocess
(tests/parallel_worker.py), because jax fixes its device count when it starts."""

import os
import subprocess
import sys


def test_two_devices_match_one(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "tests.parallel_worker", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "step parity" in result.stdout and "errors: clear messages" in result.stdout
