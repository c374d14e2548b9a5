"""`python -m export` (torch, from-torch, onnx, tensorrt), the solver backends and `sudoku solve`.

Checkpoints here are params-only orbax checkpoints of random weights (hrm_jax.checkpoint.save_params),
so nothing is trained. Backends must agree exactly on predictions and ACT steps (float32 everywhere;
the argmax margins of random weights are far above the ~1e-6 differences).
"""

import functools
import importlib.util
import json

import numpy as np
import pytest

import hrm_jax as H
from experiments import sudoku
from export.__main__ import main as export_main
from export.solvers import BackendUnavailableError, load_solver
from export.tensorrt import TensorRTUnavailableError, build_engine, calibration_batches
from hrm_jax.checkpoint import CheckpointError, load_params_for_eval, save_params
from tests.model_helpers import random_batch
from tests.test_export_torch import assert_trees_equal, random_params

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@functools.cache
def sudoku_case():
    """A Sudoku-shaped (81 cells, vocab 11) small model with random weights."""
    cfg = H.tiny(hidden_size=32, num_heads=2, H_layers=1, L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=3,
                 forward_dtype="float32")
    return cfg, random_params(cfg, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg, params = sudoku_case()
    root = tmp_path_factory.mktemp("ckpt") / "run"
    save_params(root, params, cfg)
    return root


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    args = ["onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--graph", "solve", "--no-check"]
    assert export_main(args) == 0
    return out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_orbax_to_torch_file_and_back_is_identical(checkpoint, tmp_path, suffix, capsys):
    cfg, params = sudoku_case()
    weights = tmp_path / f"model{suffix}"
    assert export_main(["torch", "--checkpoint", str(checkpoint), "--out", str(weights)]) == 0
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    back = tmp_path / "back"
    args = ["from-torch", str(weights), "--config-json", str(tmp_path / "cfg.json"), "--out", str(back)]
    assert export_main(args) == 0
    restored, restored_cfg = load_params_for_eval(back)
    assert restored_cfg == cfg
    assert_trees_equal(restored, params)
    assert "reference's key names" in capsys.readouterr().out


def test_from_torch_with_the_wrong_config_names_the_field(checkpoint, tmp_path, capsys):
    weights = tmp_path / "model.pt"
    export_main(["torch", "--checkpoint", str(checkpoint), "--out", str(weights)])
    code = export_main(["from-torch", str(weights), "--preset", "sudoku_extreme", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "config field hidden_size" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written
    code = export_main(["from-torch", str(weights), "--set", "hidden_size", "--out", str(tmp_path / "y")])
    assert code == 2 and "FIELD=VALUE" in capsys.readouterr().err


def test_save_params_refuses_to_overwrite(checkpoint):
    cfg, params = sudoku_case()
    with pytest.raises(CheckpointError, match="already holds a checkpoint for step 0"):
        save_params(checkpoint, params, cfg)


def test_onnx_cli_writes_both_graphs_and_checks_them(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main(["onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".segment.onnx").is_file()
    assert "predictions agree on 100.00% of cells" in printed
    logits_diff = float(printed.split("max |logits diff| ")[1].split()[0])
    assert logits_diff < 1e-4
    assert export_main(["onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.bin")]) == 2


@pytest.mark.parametrize("early_halt", [False, True])
def test_jax_torch_and_onnx_backends_agree(checkpoint, onnx_file, early_halt):
    cfg, _ = sudoku_case()
    batch = random_batch(cfg, 5, seed=8)
    results = {name: load_solver(name, checkpoint, onnx_path=onnx_file if name == "onnx" else None,
                                 early_halt=early_halt).solve(batch["inputs"], batch["puzzle_identifiers"])
               for name in ("jax", "torch", "onnx")}
    for name in ("torch", "onnx"):
        np.testing.assert_array_equal(results[name].predictions, results["jax"].predictions, err_msg=name)
        np.testing.assert_array_equal(results[name].steps, results["jax"].steps, err_msg=name)
    if not early_halt:
        np.testing.assert_allclose(results["onnx"].q_halt, results["jax"].q_halt, atol=1e-5)


def test_sudoku_solve_prints_the_same_grid_on_every_backend(checkpoint, onnx_file, capsys):
    puzzle = "..3.2.6..9..3.5..1..18.64....81.29..7.......8..67.82....26.95..8..2.3..9..5.1.3.."
    grids = {}
    for backend, extra in (("jax", []), ("torch", []), ("onnx", ["--onnx", str(onnx_file)])):
        code = sudoku.main(["solve", puzzle, "--checkpoint", str(checkpoint), "--backend", backend, *extra])
        out = capsys.readouterr().out
        assert code in (0, 1) and f"backend {backend}," in out
        grids[backend] = out.split("backend")[0]
    assert grids["torch"] == grids["jax"] == grids["onnx"]


def test_missing_runtimes_and_files_are_clear_errors(tmp_path, onnx_file, capsys):
    with pytest.raises(BackendUnavailableError, match="needs --engine FILE"):
        load_solver("tensorrt", None)
    with pytest.raises(ValueError, match="backend must be one of"):
        load_solver("tflite", None)
    code = export_main(["tensorrt", "--onnx", str(onnx_file), "--int8"])
    assert code == 2 and "--int8 needs --calib-data" in capsys.readouterr().err
    code = sudoku.main(["solve", "." * 81, "--backend", "tensorrt", "--engine", str(tmp_path / "none.engine")])
    assert code == 2 and "no such engine" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is absent")
def test_tensorrt_absent_says_how_to_install(onnx_file, tmp_path):
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        build_engine(onnx_file, tmp_path / "m.engine", precision="fp16")


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (it needs an NVIDIA GPU; see BUILD_NOTES)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_onnxruntime(onnx_file, tmp_path, precision):
    from export.onnx import OnnxSolver
    from export.tensorrt import TensorRTSolver

    engine = build_engine(onnx_file, tmp_path / f"m.{precision}.engine", precision=precision, max_batch=8)
    cfg, _ = sudoku_case()
    batch = random_batch(cfg, 7, seed=9)
    got = TensorRTSolver(engine).solve(batch["inputs"], batch["puzzle_identifiers"])
    want = OnnxSolver(onnx_file).solve(batch["inputs"], batch["puzzle_identifiers"])
    agreement = np.mean(got.predictions == want.predictions)
    assert agreement >= (1.0 if precision == "fp32" else 0.99), agreement
    np.testing.assert_array_equal(got.steps, want.steps)


def test_calibration_batches_are_full_distinct_and_seeded():
    inputs = np.arange(50 * 4).reshape(50, 4)
    ids = np.arange(50)
    batches = list(calibration_batches(inputs, ids, batch_size=8, max_batches=10))
    assert len(batches) == 6  # 50 // 8 full batches
    rows = np.concatenate([b["puzzle_identifiers"] for b in batches])
    assert len(set(rows.tolist())) == len(rows) == 48
    assert all(b["inputs"].dtype == np.int32 and b["inputs"].shape == (8, 4) for b in batches)
    np.testing.assert_array_equal(batches[0]["inputs"], inputs[batches[0]["puzzle_identifiers"]])
    again = list(calibration_batches(inputs, ids, batch_size=8, max_batches=10))
    np.testing.assert_array_equal(again[3]["inputs"], batches[3]["inputs"])
    with pytest.raises(ValueError, match="needs at least 64 puzzles"):
        next(calibration_batches(inputs, ids, batch_size=64, max_batches=1))
