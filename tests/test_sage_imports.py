"""sage's salience, store, memory, weights pointer and CLI dispatch import without JAX (an edge
device may serve through another backend); sage.sleep and sage.replay import hrm_jax's JAX-free parts
(configs, datasets, the Sudoku solver) and neither JAX nor torch: the trainer a cycle picks imports its own."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numpy_only_modules_do_not_import_jax():
    code = ("import sys, sage.salience, sage.experience, sage.fast_memory, sage.weights, sage.__main__; "
            "print(sorted(m for m in ('jax', 'hrm_jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sleep_imports_without_jax_or_torch():
    code = ("import sys; sys.modules['jax'] = None; sys.modules['torch'] = None\n"
            "import sage.sleep, sage.replay\n"
            "print(sorted(m for m in ('jax', 'torch', 'orbax', 'flax') if sys.modules.get(m) is not None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
