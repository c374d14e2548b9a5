"""TRM against a float64 NumPy transcription of the reference, the full-recursion gradient against
finite differences, the parameter counts of the paper's presets, and the ACT semantics of
no_ACT_continue (halting on q_halt > 0, no target Q) and of its False path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrm_jax import trm
from hrm_jax.config import ConfigError
from hrm_jax.presets import TRM_MODEL_PRESETS, tiny, trm_tiny
from hrm_jax.trm_config import TRMConfig
from tests import trm_numpy_reference as ref
from tests.model_helpers import exploration_halting_steps, random_batch, randomized_params, set_q_bias
from tests.numpy_reference import to_f64

STEP = jax.jit(trm.act_step, static_argnames=("config", "train"))


# The README's four models: trainable parameters as the reference counts them (puzzle table excluded).
@pytest.mark.parametrize("preset, count", [("trm_sudoku_mlp", 5_028_866), ("trm_sudoku_att", 6_828_034),
                                           ("trm_maze", 6_822_914), ("trm_arc", 6_829_058)])
def test_preset_parameter_counts(preset, count):
    cfg = TRM_MODEL_PRESETS[preset]()
    params = jax.eval_shape(lambda k: trm.init_params(cfg, k), jax.random.key(0))
    assert trm.count_params(params["dense"]) == count
    assert params["puzzle_emb"].shape == (cfg.num_puzzle_identifiers, 512)
    assert sorted(params["dense"]["L_level"]) == ["layers_0", "layers_1"]
    assert "H_level" not in params["dense"]


def test_sudoku_mlp_layout():
    cfg = TRM_MODEL_PRESETS["trm_sudoku_mlp"]()
    assert cfg.total_seq_len == 97 and cfg.sequence_intermediate_size == 512 and cfg.intermediate_size == 1536
    layer = jax.eval_shape(lambda k: trm.init_params(cfg, k), jax.random.key(0))["dense"]["L_level"]["layers_0"]
    assert sorted(layer) == ["mlp", "mlp_t"]
    assert layer["mlp_t"]["gate_up_proj"]["kernel"].shape == (97, 1024)
    assert layer["mlp_t"]["down_proj"]["kernel"].shape == (512, 97)


@pytest.mark.parametrize("changes, field", [
    ({"pos_encodings": "alibi"}, "pos_encodings"), ({"L_layers": 0}, "L_layers"),
    ({"puzzle_emb_ndim": 0, "puzzle_emb_len": 16}, "puzzle_emb_len"),
    ({"puzzle_emb_ndim": 600, "puzzle_emb_len": 1}, "puzzle_emb_len"), ({"mlp_t": 1}, "mlp_t"),
    ({"num_heads": 5}, "hidden_size"), ({"halt_exploration_prob": 1.5}, "halt_exploration_prob")])
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        trm_tiny(**changes)


def test_config_from_reference_arch_section():
    arch = {"name": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1", "loss": {"name": "x"},
            "batch_size": 768, "halt_exploration_prob": 0.1, "halt_max_steps": 16, "H_cycles": 3, "L_cycles": 6,
            "H_layers": 0, "L_layers": 2, "hidden_size": 512, "num_heads": 8, "expansion": 4, "puzzle_emb_ndim": 512,
            "pos_encodings": "none", "forward_dtype": "bfloat16", "mlp_t": True, "puzzle_emb_len": 16,
            "no_ACT_continue": True}
    cfg = TRMConfig.from_reference_arch(arch, seq_len=81, vocab_size=11, num_puzzle_identifiers=1)
    assert cfg == TRM_MODEL_PRESETS["trm_sudoku_mlp"]()
    assert TRMConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("mlp_t, pos", [(False, "rope"), (True, "none"), (False, "learned"), (False, "none")])
def test_block_matches_numpy_reference(mlp_t, pos):
    cfg = trm_tiny(hidden_size=32, num_heads=2, seq_len=10, mlp_t=mlp_t, pos_encodings=pos, L_layers=1)
    dense = randomized_params(cfg, seed=4)["dense"]
    h = jnp.asarray(np.random.default_rng(5).normal(size=(2, cfg.total_seq_len, 32)), jnp.float32)
    cos_sin = trm._cos_sin(cfg)
    got = jax.jit(trm.block_class(cfg)(cfg).apply)({"params": dense["L_level"]["layers_0"]}, h, cos_sin)
    want = ref.block(cfg, np.asarray(h, np.float64), to_f64(dense["L_level"]["layers_0"]), ref.rope_for(cfg))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("mlp_t, pos, puzzle_ndim, slots", [(False, "rope", 40, 2), (True, "none", 64, 3),
                                                            (False, "learned", 32, 0), (False, "rope", 0, 0)])
def test_segment_matches_numpy_reference(mlp_t, pos, puzzle_ndim, slots):
    cfg = trm_tiny(mlp_t=mlp_t, pos_encodings=pos, puzzle_emb_ndim=puzzle_ndim, puzzle_emb_len=slots,
                   num_puzzle_identifiers=3, hidden_size=32, num_heads=2, seq_len=10, H_cycles=3, L_cycles=2)
    params = randomized_params(cfg, seed=1)
    batch = random_batch(cfg, 3, seed=2)
    carry = trm.refresh_carry(params, cfg, trm.initial_carry(cfg, batch), batch)
    rows = trm.gather_puzzle_rows(params, cfg, batch["puzzle_identifiers"])
    got = jax.jit(trm.segment_forward, static_argnums=1)(params, cfg, carry, rows)
    want = ref.inner_forward(cfg, params, carry.z_H, carry.z_L, batch["inputs"], rows)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def _unflat(vector, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, i = [], 0
    for leaf in leaves:
        out.append(vector[i:i + leaf.size].reshape(leaf.shape))
        i += leaf.size
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("directions", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_full_last_recursion_gradient_matches_finite_differences(directions):
    """d(objective)/d(dense, x) through the whole last recursion (L_cycles + 1 net applications),
    the first H_cycles - 1 recursions held fixed: NumPy float64 central differences along random
    directions agree with jax's float32 gradient; the HRM-style 1-step gradient does not."""
    cfg = trm_tiny(hidden_size=16, num_heads=2, seq_len=6, H_cycles=3, L_cycles=2, L_layers=1)
    dense = randomized_params(cfg, seed=0)["dense"]
    rng = np.random.default_rng(0)
    shape = (2, cfg.total_seq_len, 16)
    z_H, z_L, x, probe_H, probe_L = (rng.normal(size=shape) for _ in range(5))

    def objective(out_H, out_L, lib):
        return lib.sum(out_H * probe_H) + lib.sum(lib.sin(out_L) * probe_L)

    def loss(dense, x):
        out_H, out_L = trm.inner_forward(dense, cfg, jnp.asarray(z_H, jnp.float32), jnp.asarray(z_L, jnp.float32), x)
        return objective(out_H, out_L, jnp)

    g_dense, g_x = jax.grad(loss, argnums=(0, 1))(dense, jnp.asarray(x, jnp.float32))
    grad = np.concatenate([_flat(g_dense), _flat(g_x)])

    d64 = to_f64(dense)
    # The prefix (no gradient there) at the unperturbed parameters, in float64.
    p_H, p_L = ref.recursions(cfg, d64, z_H, z_L, x, cfg.H_cycles - 1)
    theta0 = np.concatenate([_flat(d64), x.ravel()])
    n_dense = theta0.size - x.size

    def numpy_loss(theta):
        dense_t, x_t = _unflat(theta[:n_dense], d64), theta[n_dense:].reshape(shape)
        return objective(*ref.recursions(cfg, dense_t, p_H, p_L, x_t, 1), np)

    def one_step_loss(theta):  # HRM's approximation: only the final L- and H-update differentiated
        dense_t, x_t = _unflat(theta[:n_dense], d64), theta[n_dense:].reshape(shape)
        rope = ref.rope_for(cfg)
        zl = p_L
        for _ in range(cfg.L_cycles - 1):
            zl = ref.net(cfg, d64, zl, p_H + x, rope)
        zl = ref.net(cfg, dense_t, zl, p_H + x_t, rope)
        return objective(ref.net(cfg, dense_t, p_H, zl, rope), zl, np)

    eps = 1e-6
    for seed in range(directions):
        v = np.random.default_rng(100 + seed).normal(size=theta0.size)
        numeric = (numpy_loss(theta0 + eps * v) - numpy_loss(theta0 - eps * v)) / (2 * eps)
        one_step = (one_step_loss(theta0 + eps * v) - one_step_loss(theta0 - eps * v)) / (2 * eps)
        analytic = float(grad @ v)
        assert abs(analytic - numeric) <= 1e-3 * abs(numeric) + 1e-3, (analytic, numeric)
        assert abs(one_step - numeric) > 0.05 * abs(numeric)  # the full recursion is really differentiated


def test_gradient_never_reaches_the_incoming_carry():
    cfg = trm_tiny(hidden_size=16, num_heads=2, seq_len=6, H_cycles=2, L_cycles=2, L_layers=1)
    dense = trm.init_params(cfg, jax.random.key(0))["dense"]
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, cfg.total_seq_len, 16)), jnp.float32)

    def loss(z_H, z_L):
        out_H, out_L = trm.inner_forward(dense, cfg, z_H, z_L, z)
        return jnp.sum(out_H * z) + jnp.sum(out_L * z)

    g_H, g_L = jax.grad(loss, argnums=(0, 1))(z, z)
    assert not np.any(np.asarray(g_H)) and not np.any(np.asarray(g_L))


def test_recursion_is_a_loop_not_unrolled():
    cfg = trm_tiny(H_cycles=4, L_cycles=6)
    dense = jax.eval_shape(lambda k: trm.init_params(cfg, k), jax.random.key(0))["dense"]
    z = jax.ShapeDtypeStruct((1, cfg.total_seq_len, cfg.hidden_size), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda d, a, b, c: trm.inner_forward(d, cfg, a, b, c))(dense, z, z, z))
    assert "while" in jaxpr or "scan" in jaxpr
    assert jaxpr.count("dot_general") < 28 * 2 * 4  # 28 net applications unrolled would be far more


def _act_cfg(**kw):
    base = dict(hidden_size=16, num_heads=2, seq_len=5, H_cycles=2, L_cycles=1, L_layers=1, halt_max_steps=4,
                puzzle_emb_ndim=16, puzzle_emb_len=2, num_puzzle_identifiers=4)
    return trm_tiny(**(base | kw))


def test_no_act_continue_halts_on_positive_q_halt_alone():
    cfg = _act_cfg(halt_exploration_prob=0.0)
    batch = random_batch(cfg, 3)
    base = trm.init_params(cfg, jax.random.key(0))
    # q_halt > 0 halts even though q_continue is larger (HRM would continue).
    carry, out = STEP(set_q_bias(base, 0.5, 3.0), cfg, trm.initial_carry(cfg, batch), batch, jax.random.key(0),
                      train=True)
    assert bool(carry.halted.all()) and "target_q_continue" not in out
    # q_halt < 0 continues even though q_continue is smaller, until the step limit.
    carry = trm.initial_carry(cfg, batch)
    for step in range(1, cfg.halt_max_steps + 1):
        carry, out = STEP(set_q_bias(base, -0.5, -3.0), cfg, carry, batch, jax.random.key(step), train=True)
        assert bool(carry.halted.all()) == (step == cfg.halt_max_steps)


def test_with_act_continue_halts_on_q_comparison_and_bootstraps_target():
    cfg = _act_cfg(halt_exploration_prob=0.0, no_ACT_continue=False, halt_max_steps=2)
    batch = random_batch(cfg, 4)
    base = trm.init_params(cfg, jax.random.key(0))
    carry, _ = STEP(set_q_bias(base, 0.5, 3.0), cfg, trm.initial_carry(cfg, batch), batch, jax.random.key(0),
                    train=True)
    assert not bool(carry.halted.any())
    params = randomized_params(cfg, seed=3)
    carry, out = STEP(params, cfg, trm.initial_carry(cfg, batch), batch, jax.random.key(1), train=True)
    rows = trm.gather_puzzle_rows(params, cfg, carry.current_data["puzzle_identifiers"])
    *_, next_q = jax.jit(trm.segment_forward, static_argnums=1)(params, cfg, carry, rows)  # from the new carry
    expected = jax.nn.sigmoid(np.maximum(next_q[:, 0], next_q[:, 1]))  # step 1 of 2: not the last
    np.testing.assert_allclose(out["target_q_continue"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("no_act_continue", [True, False])
def test_halting_rule_of_the_config_on_numpy_and_jax(no_act_continue):
    """TRMConfig.halts, which every backend applies (jax act_segment and rollout, the torch module, the ONNX host
    loop): q_halt > 0 under no_ACT_continue, else HRM's q_halt > q_continue, elementwise on any array type."""
    cfg = _act_cfg(no_ACT_continue=no_act_continue)
    q_halt, q_cont = np.array([0.5, 0.5, -0.5, -0.5, 0.0]), np.array([3.0, -3.0, -3.0, 3.0, -1.0])
    want = [True, True, False, False, False] if no_act_continue else [False, True, True, False, True]
    assert cfg.halts(q_halt, q_cont).tolist() == want
    assert np.asarray(jax.jit(cfg.halts)(jnp.asarray(q_halt), jnp.asarray(q_cont))).tolist() == want
    hrm = tiny()
    assert hrm.halts(q_halt, q_cont).tolist() == [False, True, True, False, True]


def test_eval_always_runs_halt_max_steps():
    cfg = _act_cfg()
    params = set_q_bias(trm.init_params(cfg, jax.random.key(0)), 5.0, -5.0)
    batch = random_batch(cfg, 3)
    carry = trm.initial_carry(cfg, batch)
    for step in range(1, cfg.halt_max_steps + 1):
        carry, out = STEP(params, cfg, carry, batch, None, train=False)
        assert bool(carry.halted.all()) == (step == cfg.halt_max_steps)
        assert "target_q_continue" not in out


@pytest.mark.slow  # the exploration is HRM's function (tests/test_model.py checks it in the default run)
def test_exploration_minimum_steps_cover_two_to_max():
    cfg = _act_cfg(halt_exploration_prob=1.0, halt_max_steps=5)
    assert exploration_halting_steps(cfg, STEP) == {2, 3, 4, 5}


def test_puzzle_embedding_fills_slot_zero_then_zeros():
    cfg = _act_cfg(puzzle_emb_ndim=16, puzzle_emb_len=3, hidden_size=16)
    params = randomized_params(cfg)
    batch = random_batch(cfg, 2)
    rows = trm.gather_puzzle_rows(params, cfg, batch["puzzle_identifiers"])
    embed = jax.jit(lambda p, i, r: trm.TRMInner(cfg).apply({"params": p}, i, r, method=trm.TRMInner.embed))
    x = embed(params["dense"], batch["inputs"], rows)
    assert x.shape == (2, 3 + cfg.seq_len, 16)
    np.testing.assert_allclose(x[:, 0], 4.0 * np.asarray(rows), rtol=1e-6)  # sqrt(hidden) = 4
    np.testing.assert_array_equal(x[:, 1:3], 0)
