"""TRM export: the torch module's keys are the reference's, params <-> state dict round trips
exactly (with or without `_orig_mod.`), the torch module and the ONNX segment graph equal hrm_jax
per segment from a shared carry (1e-5 relative), and every solver backend reads a TRM checkpoint
and gives the same answer."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.convert import (  # noqa: E402
    CheckpointMismatchError,
    expected_shapes,
    from_torch_state_dict,
    num_trainable,
    to_torch_state_dict,
)
from export.trm_torch_model import TRMTorch, torch_module  # noqa: E402
from hrm_jax import trm  # noqa: E402
from hrm_jax.presets import TRM_MODEL_PRESETS, trm_tiny  # noqa: E402
from tests.model_helpers import random_batch  # noqa: E402
from tests.test_export_torch import rel_err  # noqa: E402

PARITY_RTOL = 1e-5
SEGMENTS = 3
JAX_STEP = jax.jit(trm.act_step, static_argnames=("config", "train"))
VARIANTS = [dict(mlp_t=False, pos_encodings="rope"), dict(mlp_t=True, pos_encodings="none"),
            dict(mlp_t=False, pos_encodings="learned")]


def small_config(**overrides):
    base = dict(seq_len=9, vocab_size=7, num_puzzle_identifiers=3, hidden_size=32, num_heads=2, L_layers=2,
                H_cycles=2, L_cycles=2, halt_max_steps=SEGMENTS, puzzle_emb_ndim=40, puzzle_emb_len=2)
    return trm_tiny(**(base | overrides))


def random_params(cfg, seed=0):
    """The init's random weights, with the zero/constant-initialised leaves (Q head, puzzle table)
    randomised too, so that a swapped or dropped tensor shows."""
    rng = np.random.default_rng(seed)
    params = jax.device_get(trm.init_params(cfg, jax.random.key(seed)))

    def fill(x):
        x = np.array(x)
        return rng.normal(0, 0.3, x.shape).astype(np.float32) if np.all(x == x.flat[0]) else x

    return jax.tree.map(fill, params)


def loaded(cfg, params):
    model = torch_module(cfg)
    model.load_state_dict(to_torch_state_dict(params, cfg), strict=True)
    return model


@pytest.mark.parametrize("preset", sorted(TRM_MODEL_PRESETS))
def test_state_dict_has_the_reference_keys_and_size(preset):
    cfg = TRM_MODEL_PRESETS[preset]()
    model = TRMTorch(cfg)
    keys = set(model.state_dict())
    mixer = ("mlp_t.gate_up_proj", "mlp_t.down_proj") if cfg.mlp_t else ("self_attn.qkv_proj", "self_attn.o_proj")
    want = {f"model.inner.{k}" for k in ("H_init", "L_init", "embed_tokens.embedding_weight", "lm_head.weight",
                                         "q_head.weight", "q_head.bias", "puzzle_emb.weights")}
    want |= {f"model.inner.L_level.layers.{i}.{m}.weight" for i in range(2)
             for m in (*mixer, "mlp.gate_up_proj", "mlp.down_proj")}
    assert keys == want
    assert set(expected_shapes(cfg)) == {k.removeprefix("model.inner.") for k in want}
    assert num_trainable(model.state_dict()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == {"trm_sudoku_mlp": 5_028_866, "trm_sudoku_att": 6_828_034,
                                                          "trm_maze": 6_822_914, "trm_arc": 6_829_058}[preset]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix", ["model.inner.", "_orig_mod.model.inner.", ""])
def test_params_round_trip_exactly(variant, prefix):
    cfg = small_config(**variant)
    params = random_params(cfg, seed=1)
    back = from_torch_state_dict(to_torch_state_dict(params, cfg, prefix=prefix), cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_mismatched_state_dict_names_the_field():
    cfg = small_config(mlp_t=True, pos_encodings="none")
    sd = to_torch_state_dict(random_params(cfg), cfg)
    with pytest.raises(CheckpointMismatchError, match="mlp_t: config has False, checkpoint implies True"):
        from_torch_state_dict(sd, cfg.replace(mlp_t=False, pos_encodings="rope"))


@pytest.mark.parametrize("index", range(len(VARIANTS)))
def test_torch_module_matches_jax_every_segment_from_the_same_carry(index):
    cfg = small_config(**VARIANTS[index])
    params, batch = random_params(cfg, seed=6), random_batch(cfg, 5, seed=7)
    model = loaded(cfg, params)
    carry = trm.initial_carry(cfg, batch)
    for segment in range(SEGMENTS + 1):  # the last one restarts every row (all halted at the limit)
        start = [torch.from_numpy(np.array(getattr(carry, n))) for n in ("z_H", "z_L", "steps", "halted")]
        data = [torch.from_numpy(np.array(carry.current_data[k])) for k in ("inputs", "puzzle_identifiers")]
        with torch.no_grad():
            z_H, z_L, steps, halted, *_, logits, q_halt, q_cont = model(
                *start, *data, torch.from_numpy(batch["inputs"]), torch.from_numpy(batch["puzzle_identifiers"]))
        carry, want = JAX_STEP(params, cfg, carry, batch, None, train=False)
        errors = {"z_H": rel_err(z_H, np.asarray(carry.z_H)), "z_L": rel_err(z_L, np.asarray(carry.z_L)),
                  "logits": rel_err(logits, np.asarray(want["logits"])),
                  "q_halt": rel_err(q_halt, np.asarray(want["q_halt_logits"])),
                  "q_cont": rel_err(q_cont, np.asarray(want["q_continue_logits"]))}
        assert max(errors.values()) <= PARITY_RTOL, (VARIANTS[index], segment, errors)
        assert steps.tolist() == np.asarray(carry.steps).tolist()
        assert halted.tolist() == np.asarray(carry.halted).tolist()


def test_early_halt_uses_q_halt_above_zero():
    from hrm_jax.evaluate import rollout

    cfg = small_config(mlp_t=True, pos_encodings="none", halt_max_steps=4)
    params = random_params(cfg, seed=2)
    params["dense"]["q_head"]["bias"] = np.array([0.0, 50.0], np.float32)  # q_continue never wins under TRM
    batch = random_batch(cfg, 8, seed=3)
    out = jax.jit(rollout, static_argnames=("config", "loss_type"))(params, cfg, batch)
    result = loaded(cfg, params).solve(torch.from_numpy(batch["inputs"]), torch.from_numpy(batch["puzzle_identifiers"]),
                                       early_halt=True)
    np.testing.assert_array_equal(result.steps.numpy(), np.asarray(out["early_steps"]).astype(np.int32))
    assert result.steps.min() < 4 < len(set(result.steps.tolist())) + 2  # rows stop early, not all at once
    np.testing.assert_array_equal(result.logits.argmax(-1).numpy(), np.asarray(out["early_predictions"]))


def test_onnx_segment_graph_matches_jax(tmp_path):
    pytest.importorskip("onnxruntime")
    from export.onnx import OnnxSegment, export_onnx, read_metadata

    cfg = small_config(mlp_t=True, pos_encodings="none", forward_dtype="float32")
    params, batch = random_params(cfg, seed=8), random_batch(cfg, 4, seed=9)
    path = export_onnx(loaded(cfg, params), tmp_path / "trm.segment.onnx", "segment")
    assert read_metadata(path)[0] == cfg
    runner = OnnxSegment(path)
    carry = trm.initial_carry(cfg, batch)
    for _ in range(SEGMENTS):
        feed = {n: np.asarray(getattr(carry, n)) for n in ("z_H", "z_L", "steps", "halted")}
        got_carry, got = runner.step(feed, batch["inputs"], batch["puzzle_identifiers"])
        carry, want = JAX_STEP(params, cfg, carry, batch, None, train=False)
        assert rel_err(got["logits"], np.asarray(want["logits"])) <= PARITY_RTOL
        assert rel_err(got_carry["z_H"], np.asarray(carry.z_H)) <= PARITY_RTOL
        assert rel_err(got["q_halt"], np.asarray(want["q_halt_logits"])) <= PARITY_RTOL


def test_every_solver_backend_reads_a_trm_checkpoint_and_prints_the_same_grid(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from experiments import sudoku
    from hrm_jax.checkpoint import save_params

    cfg = small_config(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, mlp_t=True, pos_encodings="none",
                       halt_max_steps=2, H_cycles=1, L_cycles=1, L_layers=1)
    save_params(tmp_path / "ckpt", jax.device_get(random_params(cfg, seed=11)), cfg)
    puzzle = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
    outputs = {}
    for backend in ("jax", "torch", "onnx"):
        code = sudoku.main(["solve", puzzle, "--checkpoint", str(tmp_path / "ckpt"), "--backend", backend])
        out = capsys.readouterr().out
        assert code == 1 and f"backend {backend}, ACT steps 2" in out, out  # random weights: not a solution
        outputs[backend] = [line for line in out.splitlines() if "|" in line or "+" in line]  # the grid
    assert outputs["jax"] == outputs["torch"] == outputs["onnx"]
    assert len(outputs["jax"]) == 11


@pytest.mark.slow  # ~45 s on 2 loaded cores (the segment graph's export); TRMConfig.halts is tested in test_trm.py
def test_onnx_host_loop_halts_by_the_configs_rule_with_act_continue(tmp_path):
    """With no_ACT_continue=False TRM halts as HRM does (q_halt > q_continue): the ONNX host loop over the segment
    graph must stop each row where the torch module's solve does, on a draw where the two rules disagree."""
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx
    from export.onnx_runtime import OnnxLoopSolver

    cfg = small_config(no_ACT_continue=False, halt_max_steps=4, L_layers=1)
    params, batch = random_params(cfg, seed=12), random_batch(cfg, 16, seed=13)
    inputs, ids = torch.from_numpy(batch["inputs"]), torch.from_numpy(batch["puzzle_identifiers"])
    want = loaded(cfg, params).solve(inputs, ids, early_halt=True)
    other_rule = loaded(cfg.replace(no_ACT_continue=True), params).solve(inputs, ids, early_halt=True)
    assert not torch.equal(want.steps, other_rule.steps), "the rules agree on this draw: the test could not fail"
    path = export_onnx(loaded(cfg, params), tmp_path / "trm.segment.onnx", "segment")
    got = OnnxLoopSolver(path, early_halt=True).solve(batch["inputs"], batch["puzzle_identifiers"])
    np.testing.assert_array_equal(got.steps, want.steps.numpy())
    np.testing.assert_array_equal(got.predictions, want.logits.argmax(-1).numpy())
