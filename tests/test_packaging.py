"""A wheel holds the bundled samples and the mailbox's C engine, a non-editable install runs the quick
starts and a solve from a directory that is not the repository (no ../shared, no source tree on the
path), and a wheel built without a C compiler still installs and falls back to the Python engine."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = ("hrm_jax/data/samples/sudoku_sample.txt", "hrm_jax/data/samples/arc/README.md",
           "hrm_jax/data/samples/arc/LICENSE-ARC-AGI.txt", "hrm_jax/data/samples/arc/LICENSE-ConceptARC.txt",
           "hrm_jax/data/samples/arc/arc-agi-1_training.json", "hrm_jax/data/samples/arc/arc-agi-1_evaluation.json",
           "hrm_jax/data/samples/arc/conceptarc.json",
           # the shipped model, its card and its held-out puzzles (hrm_jax.pretrained)
           "hrm_jax/weights/sudoku/model.safetensors", "hrm_jax/weights/sudoku/config.json",
           "hrm_jax/weights/sudoku/MODEL_CARD.md", "hrm_jax/weights/sudoku/heldout.txt")


def build_wheel(tmp: pathlib.Path, env: dict | None = None) -> pathlib.Path:
    """A wheel built from a copy of the tree (setuptools writes build/ and *.egg-info where it builds;
    an in-place sage._pbm of the checkout must not leak into the wheel)."""
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "_pbm*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, **(env or {})})
    (built,) = (tmp / "dist").glob("hrm_jax-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def has_c_compiler() -> bool:
    return shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is not None


def test_wheel_contains_the_samples_and_their_licences(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SAMPLES if name not in names]
    assert not missing, missing
    assert not any(name.startswith("tests/") for name in names)
    if has_c_compiler():  # the mailbox's C engine (optional: absent where nothing compiles it)
        assert [name for name in names if name.startswith("sage/_pbm.") and name.endswith(".so")], sorted(names)


def run(command, cwd, site, codes=(0,)):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HRM_ARC_DATA", "HRM_SUDOKU_DATA")}
    env |= {"PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu", "HRM_RUNS_DIR": str(cwd / "runs")}
    result = subprocess.run([sys.executable, "-m", *command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode in codes, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_installed_wheel_runs_the_quick_starts_and_a_solve_elsewhere(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere" / "deeper"  # ../shared does not exist here
    elsewhere.mkdir(parents=True)
    probe = run(["experiments.sudoku", "--help"], elsewhere, site)
    assert "quick start" in probe
    located = subprocess.run([sys.executable, "-c", "import hrm_jax, experiments; print(hrm_jax.__file__)"],
                             cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                             text=True, check=True).stdout
    assert located.startswith(str(site)), located  # the installed copy, not the checkout

    out = run(["experiments.arc", "--tasks", "2", "--num-aug", "2", "--steps", "4", "--no-progress"], elsewhere, site)
    assert "trained in" in out, out
    out = run(["experiments.sudoku", "--steps", "8", "--no-progress", "--out", str(elsewhere / "sudoku")],
              elsewhere, site)
    assert "from " + str(site) in out, out  # the bundled sample, located inside the installation
    puzzle = (site / "hrm_jax/data/samples/sudoku_sample.txt").read_text().splitlines()[6]
    # Exit code 1: an 8-step model rarely solves it; the solve itself must run and report.
    solved = run(["experiments.sudoku", "solve", "--checkpoint", str(elsewhere / "sudoku" / "best"), puzzle],
                 elsewhere, site, codes=(0, 1))
    assert "backend jax, ACT steps" in solved, solved
    shipped = run(["experiments.sudoku", "solve", "--model", "pretrained", puzzle], elsewhere, site, codes=(0, 1))
    assert "backend jax, ACT steps" in shipped, shipped
    out = run(["experiments.maze", "--steps", "4", "--no-progress", "--size", "9", "--min-path", "4"], elsewhere, site)
    assert "trained and evaluated" in out, out


# The checkout's own `pip install -e .` (make test) adds setuptools' editable finder to sys.meta_path, after the
# path finder: it would still find the checkout's built sage._pbm when the installed copy lacks it. A plain install
# has no such finder, so the probe removes it first.
MAILBOX_PROBE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path\n"
                 "    if 'editable' not in getattr(f, '__name__', type(f).__name__).lower()]\n"
                 "from sage.mailbox import Mailbox, native_engine_status; import sage, uuid\n"
                 "box = Mailbox.create('pkg-' + uuid.uuid4().hex[:8], record_size=8, capacity=2)\n"
                 "box.push(b'ok'); print(box.impl, box.pop().payload.decode(), sage.__file__)\n"
                 "box.unlink(); box.close()")


def probe_mailbox(site: pathlib.Path, cwd: pathlib.Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAGE_MAILBOX_IMPL")}
    return subprocess.run([sys.executable, "-c", MAILBOX_PROBE], cwd=cwd, env={**env, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, check=True, timeout=120).stdout.split()


def test_installed_wheel_uses_the_c_engine_and_a_wheel_built_without_a_compiler_the_python_one(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    impl, payload, where = probe_mailbox(site, tmp_path)
    assert (impl, payload) == ("native" if has_c_compiler() else "python", "ok") and where.startswith(str(site))

    plain = build_wheel(tmp_path / "nocc", env={"CC": "/bin/false"})  # the compiler fails: the extension is skipped
    assert not [name for name in zipfile.ZipFile(plain).namelist() if name.endswith(".so")]
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(bare), str(plain)],
                   check=True, capture_output=True, timeout=300)
    impl, payload, where = probe_mailbox(bare, tmp_path)
    assert (impl, payload) == ("python", "ok") and where.startswith(str(bare))
