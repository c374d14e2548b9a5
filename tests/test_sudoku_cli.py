"""The Sudoku front door end to end on a tiny scale: build -> train -> eval -> quick start, and
clear one-line errors for bad input."""

import json

import jax
import pytest

from experiments import sudoku
from hrm_jax.data.sudoku import SAMPLE_PATH

SOURCE = SAMPLE_PATH


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sudoku.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("build", "train", "eval", "solve"):
        assert command in out


@pytest.mark.parametrize("puzzle, message", [
    ("123", "81 cells"),
    ("x" + "." * 80, "bad character 'x' at position 0"),
    ("11" + "." * 79, "contradict"),
])
def test_bad_puzzle_is_one_clear_line(capsys, puzzle, message):
    assert sudoku.main(["solve", puzzle, "--checkpoint", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_bad_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sudoku.main(["train", "--data", "x", "--preset", "nope"])
    assert exit_info.value.code == 2


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    assert sudoku.main(["train", "--data", str(tmp_path / "none"), "--preset", "quickstart"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def _raise(error):
    def run(*args, **kwargs):
        raise error
    return run


@pytest.mark.parametrize("status", ["Out of memory while trying to allocate 26158132600 bytes.",  # XLA:GPU
                                    "Out of memory allocating 26158132600 bytes."])  # XLA:CPU
def test_out_of_device_memory_is_one_clear_line(built, tmp_path, monkeypatch, capsys, status):
    """XLA's allocation failure (the paper's batch 768 on the CPU asks for 24 GiB) names the flags
    that make the run fit; other runtime errors keep their traceback (real bugs)."""
    oom = jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: {status}")
    monkeypatch.setattr("hrm_jax.train.train", _raise(oom))
    args = ["train", "--data", str(built), "--preset", "quickstart", "--no-progress", "--out"]
    assert sudoku.main(args + [str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory on cpu device") and "24.4 GiB" in err
    assert "--global-batch-size" in err and "--devices" in err and "--resume" in err and "\n" not in err
    monkeypatch.setattr("hrm_jax.train.train", _raise(jax.errors.JaxRuntimeError("INTERNAL: a compiler bug")))
    with pytest.raises(jax.errors.JaxRuntimeError, match="compiler bug"):
        sudoku.main(args + [str(tmp_path / "run2")])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "sudoku"
    assert sudoku.main(["build", "--out", str(data), "--source", str(SOURCE), "--train-size", "12",
                        "--num-aug", "2", "--test-size", "6", "--workers", "1"]) == 0
    return data


def test_build_train_eval_resume(built, tmp_path, capsys):
    report = json.loads((built / "build_report.json").read_text())
    assert report["train"]["examples"] == 12 * 3 and report["test"]["puzzles"] == 6
    run = tmp_path / "run"
    base = ["train", "--data", str(built), "--preset", "quickstart", "--out", str(run), "--global-batch-size", "8",
            "--no-progress", "--lr-warmup-steps", "1"]
    args = base + ["--max-steps", "2", "--eval-every", "2"]
    assert sudoku.main(args) == 0
    out = capsys.readouterr().out
    assert "held-out evaluation" in out and "copy exact" in out
    assert (run / "curves.png").stat().st_size > 1000 and (run / "metrics.jsonl").exists()
    # A used run folder is refused without --resume, with one line naming the fix.
    assert sudoku.main(args) == 2
    assert "resume" in capsys.readouterr().err
    assert sudoku.main(base + ["--max-steps", "3", "--eval-every", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert sudoku.main(["eval", "--checkpoint", str(run / "best"), "--data", str(built), "--batch-size", "4",
                        "--json", str(tmp_path / "eval.json")]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["all"]["count"] == 6 and 0.0 <= results["all"]["accuracy"] <= 1.0
    assert any(name.startswith("group/") for name in results)  # per-difficulty bands


def test_quickstart_runs_end_to_end(built, tmp_path, capsys):
    assert sudoku.main(["--data", str(built), "--out", str(tmp_path / "qs"), "--steps", "4", "--no-progress",
                        "--shipped-puzzles", "2"]) == 0
    out = capsys.readouterr().out
    # First the shipped model on held-out puzzles (the three shown are ones it solves), then the CPU demo.
    assert out.index("The shipped Sudoku model") < out.index("Now training a small model")
    assert out.count("ACT steps, valid") == 3 and "NOT valid" not in out.split("exact accuracy on the first")[0]
    assert "best checkpoint:" in out and "plot:" in out
    assert (tmp_path / "qs" / "best").is_dir()


def test_solve_prints_grid_steps_and_validity(built, tmp_path, capsys):
    run = tmp_path / "run"
    assert sudoku.main(["train", "--data", str(built), "--preset", "quickstart", "--out", str(run),
                        "--global-batch-size", "8", "--max-steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    puzzle = SOURCE.read_text().splitlines()[-1].strip()
    code = sudoku.main(["solve", puzzle, "--checkpoint", str(run / "best"), "--bench", "2"])
    out = capsys.readouterr().out
    # An untrained model does not solve it: exit code 1 and the verdict say so honestly.
    assert code == 1 and "NOT a valid solution" in out and "ACT steps 4" in out
    assert out.count("|") == 18 and "latency per puzzle" in out
