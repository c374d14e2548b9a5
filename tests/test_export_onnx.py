"""ONNX export (export/onnx.py) run by onnxruntime's CPUExecutionProvider against hrm_jax.

Error models (eps32 = 2**-23 = 1.2e-7; errors are max|got - want| / max|want|, and for the Q logits,
one value per row and possibly near 0 at batch 1, / max(1, max|want|)):

- One segment from a shared carry (`segment` graph, fed the carry hrm_jax reached): two float32
  implementations of the same formulas, each a few hundred roundings away from the exact value
  after normalisation. Bound RTOL_F32 = 2e-5 (168 eps32); measured worst 6.1e-6 (z_L, batch 7).
- A free-running rollout (`solve` graph, one graph for every segment): the carry's rounding feeds
  the next segment, so ONNX and jax drift apart by the sum of their own drifts, and which one drifts
  further depends on the CPU's kernels (jax alone was 1.1e-5 from float64 after 3 segments on an
  Intel Xeon, batch 7). Each is bounded against a float64 run of the torch module instead:
  FREE_RUNNING_RTOL = 1e-4 (measured worst 1.1e-5 over 1-8 segments and 4 draws; the drift does
  not grow with segments: each one ends in an RMSNorm). A wrong formula is O(1e-2) away. Argmax
  tokens and halting steps are compared exactly, on draws whose top-2 logit gap and |q_halt -
  q_continue| exceed twice the bound (checked, so a tie cannot flip on another CPU).
- float16 graphs <= 2e-2 against hrm_jax in float32 (fp16 activations, eps16 = 2**-10, rounded
  through H_cycles x L_cycles blocks).

bfloat16 graphs export but ORT's CPU provider has no bf16 kernels (Expand, MatMul): they are for
GPU runtimes, and the CPU solver refuses them with a clear message.
"""

import functools

import jax
import numpy as np
import onnx
import pytest
import torch

from export.onnx import OnnxExportError, OnnxSegment, OnnxSolver, export_onnx, read_metadata
from export.onnx_runtime import OnnxLoopSolver
from hrm_jax.evaluate import rollout
from tests.model_helpers import random_batch
from tests.test_export_torch import jax_rollout, random_params, rel_err, small_config, solve, torch_model

RTOL_F32, RTOL_F16 = 2e-5, 2e-2
FREE_RUNNING_RTOL = 1e-4
SEGMENTS = 3
VARIANTS = {"rope_puzzle_emb": dict(pos_encodings="rope", puzzle_emb_ndim=40),
            "learned": dict(pos_encodings="learned", puzzle_emb_ndim=0)}
ROLLOUT = jax.jit(rollout, static_argnames=("config", "loss_type"))


@functools.cache
def case(variant: str):
    cfg = small_config(halt_max_steps=SEGMENTS, **VARIANTS[variant])
    return cfg, random_params(cfg, seed=11)


@functools.cache
def exported(variant: str, graph: str, dtype: str, tmp_dir: str) -> str:
    """Exports once per (variant, graph, dtype) for the whole session."""
    cfg, params = case(variant)
    path = f"{tmp_dir}/{variant}-{graph}-{dtype}.onnx"
    export_onnx(torch_model(cfg, params, getattr(torch, dtype)), path, graph)
    return path


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx"))


def q_err(got, want):
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch_size", [1, 7])
def test_segment_graph_matches_jax_every_segment(tmp_dir, variant, batch_size):
    """Every segment started from the carry hrm_jax reached before it (the first from the initial
    all-halted carry): one segment's rounding, not a free-running drift (see the module docstring)."""
    cfg, params = case(variant)
    batch = random_batch(cfg, batch_size, seed=batch_size)
    want = jax_rollout(cfg, params, batch, SEGMENTS)
    runner = OnnxSegment(exported(variant, "segment", "float32", tmp_dir))
    carry = runner.initial_carry(batch_size)
    for segment in range(SEGMENTS):
        if segment > 0:
            carry = {name: want[segment - 1][name] for name in ("z_H", "z_L", "steps", "halted")}
        carry, out = runner.step(carry, batch["inputs"], batch["puzzle_identifiers"])
        errors = {"logits": rel_err(out["logits"], want[segment]["logits"]),
                  "q_halt": q_err(out["q_halt"], want[segment]["q_halt_logits"]),
                  "q_continue": q_err(out["q_continue"], want[segment]["q_continue_logits"]),
                  "z_H": rel_err(carry["z_H"], want[segment]["z_H"]),
                  "z_L": rel_err(carry["z_L"], want[segment]["z_L"])}
        print(f"{variant} b{batch_size} segment {segment + 1}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        assert max(errors.values()) <= RTOL_F32, errors
        np.testing.assert_array_equal(carry["steps"], np.full(batch_size, segment + 1))
    assert carry["halted"].all()  # eval halts exactly at halt_max_steps


def assert_decisions_have_margin(history, bound):
    """The draw has no near-tie a float32 drift of `bound` could flip: argmax tokens and the halting
    rule's comparison of every segment are then the same on any CPU."""
    for segment in history:
        top2 = np.sort(segment["logits"], axis=-1)[..., -2:]
        gap = float(np.min(top2[..., 1] - top2[..., 0]))
        q_gap = float(np.min(np.abs(segment["q_halt_logits"] - segment["q_continue_logits"])))
        assert gap > 2 * bound * float(np.max(np.abs(segment["logits"]))), gap
        assert q_gap > 2 * bound * max(1.0, float(np.max(np.abs(segment["q_halt_logits"])))), q_gap


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("early_halt", [False, True])
def test_solve_graph_matches_jax_rollout(tmp_dir, batch_size, early_halt):
    cfg, params = case("rope_puzzle_emb")
    batch = random_batch(cfg, batch_size, seed=20 + batch_size)
    assert_decisions_have_margin(jax_rollout(cfg, params, batch, SEGMENTS), FREE_RUNNING_RTOL)
    want = {k: np.asarray(v) for k, v in ROLLOUT(params, cfg, batch).items()}
    got = OnnxSolver(exported("rope_puzzle_emb", "solve", "float32", tmp_dir), early_halt=early_halt).solve(
        batch["inputs"], batch["puzzle_identifiers"])
    prefix = "early_" if early_halt else ""
    np.testing.assert_array_equal(got.predictions, want[prefix + "predictions"])
    np.testing.assert_array_equal(got.steps, want[prefix + "steps"].astype(np.int32))
    assert got.predictions.dtype == np.int32 and got.steps.dtype == np.int32
    truth = solve(torch_model(cfg, params, torch.float64), batch, early_halt=early_halt)
    errors = {"onnx": q_err(got.q_halt, truth.q_halt_logits.numpy())}
    if not early_halt:  # the rollout reports the last segment's Q; the early rule keeps the stopping one
        errors["jax"] = q_err(want["q_halt_logits"], truth.q_halt_logits.numpy())
    print(f"b{batch_size} early_halt={early_halt}: q_halt vs float64 "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= FREE_RUNNING_RTOL, errors


def test_early_halting_actually_stops_some_rows_early(tmp_dir):
    """Guards the early-halt test above against a parameter draw where no row halts early."""
    cfg, params = case("rope_puzzle_emb")
    batch = random_batch(cfg, 7, seed=27)
    steps = OnnxSolver(exported("rope_puzzle_emb", "solve", "float32", tmp_dir), early_halt=True).solve(
        batch["inputs"], batch["puzzle_identifiers"]).steps
    assert steps.min() < SEGMENTS, steps


@pytest.mark.parametrize("early_halt", [False, True])
def test_the_host_loop_over_the_segment_graph_gives_the_solve_graphs_answers(tmp_dir, early_halt):
    """OnnxLoopSolver drops halted rows from the batch; tokens and steps must equal the one-graph solve (on a draw
    where some rows halt early: test above), q_halt within one segment's rounding."""
    cfg, _ = case("rope_puzzle_emb")
    batch = random_batch(cfg, 7, seed=27)
    want = OnnxSolver(exported("rope_puzzle_emb", "solve", "float32", tmp_dir), early_halt=early_halt).solve(
        batch["inputs"], batch["puzzle_identifiers"])
    got = OnnxLoopSolver(exported("rope_puzzle_emb", "segment", "float32", tmp_dir), early_halt=early_halt).solve(
        batch["inputs"], batch["puzzle_identifiers"])
    np.testing.assert_array_equal(got.steps, want.steps)
    np.testing.assert_array_equal(got.predictions, want.predictions)
    assert q_err(got.q_halt, want.q_halt) <= RTOL_F32


def test_float16_graph_is_close_to_jax_float32(tmp_dir):
    cfg, params = case("rope_puzzle_emb")
    batch = random_batch(cfg, 7, seed=3)
    want = jax_rollout(cfg, params, batch, SEGMENTS)
    runner = OnnxSegment(exported("rope_puzzle_emb", "segment", "float16", tmp_dir))
    carry = runner.initial_carry(7)
    assert carry["z_H"].dtype == np.float16
    for _ in range(SEGMENTS):
        carry, out = runner.step(carry, batch["inputs"], batch["puzzle_identifiers"])
    err = rel_err(out["logits"].astype(np.float32), want[-1]["logits"])
    print(f"float16 graph, logits after {SEGMENTS} segments: rel err {err:.1e}")
    assert err <= RTOL_F16


def test_graphs_have_dynamic_batch_opset_and_metadata(tmp_dir):
    path = exported("rope_puzzle_emb", "solve", "float32", tmp_dir)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 18
    first_dims = [inp.type.tensor_type.shape.dim[0] for inp in proto.graph.input[:2]]
    assert all(dim.dim_param and not dim.dim_value for dim in first_dims), first_dims
    cfg, graph, dtype = read_metadata(path)
    assert (cfg, graph, dtype) == (case("rope_puzzle_emb")[0], "solve", "float32")


def test_bfloat16_graph_exports_and_the_cpu_solver_refuses_it_clearly(tmp_dir):
    path = exported("learned", "solve", "bfloat16", tmp_dir)
    onnx.checker.check_model(onnx.load(path))
    with pytest.raises(OnnxExportError, match="bfloat16.*float32 or float16"):
        OnnxSolver(path)


def test_wrong_graph_foreign_file_and_bad_inputs_are_clear_errors(tmp_dir, tmp_path):
    with pytest.raises(OnnxExportError, match="'segment' graph; the solver needs the 'solve' graph"):
        OnnxSolver(exported("rope_puzzle_emb", "segment", "float32", tmp_dir))
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [node], "g", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])])), foreign)
    with pytest.raises(OnnxExportError, match="not written by `python -m export onnx`"):
        OnnxSolver(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(OnnxExportError, match="not a readable ONNX model"):
        OnnxSolver(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="export one with"):
        OnnxSolver(tmp_path / "missing.onnx")
    solver = OnnxSolver(exported("rope_puzzle_emb", "solve", "float32", tmp_dir))
    cfg = case("rope_puzzle_emb")[0]
    with pytest.raises(ValueError, match=rf"inputs must have shape \[batch, {cfg.seq_len}\]"):
        solver.solve(np.zeros((2, cfg.seq_len + 1), np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="input tokens must lie in"):
        solver.solve(np.full((1, cfg.seq_len), cfg.vocab_size), np.zeros(1, np.int32))
