"""ARC: encoding, augmentation inverses, the builder's layout, voting and scoring, and the CLI end to end.

Independent references: the reference's encoding (np.pad, dataset/build_arc_dataset.py), its
dihedral transforms (dataset/common.py) and the arc_eval notebook's `crop` loop, transcribed here.
"""

import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrm_jax.arc_eval import ARCEvalError, collect_votes, grid_key, rank_candidates, score_predictions, score_votes
from hrm_jax.data.arc import (
    DIHEDRAL_INVERSE,
    IDENTITY,
    ARCDataError,
    Augmentation,
    crop,
    crop_sizes,
    dihedral_transform,
    encode_grid,
    load_tasks,
    parse_puzzle_name,
    random_augmentation,
)
from hrm_jax.data.arc_build import Source, build_arc_dataset
from hrm_jax.data.dihedral import DihedralError
from hrm_jax.data.format import load_split

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"


# Independent transcriptions of the reference --------------------------------------------------
def reference_dihedral(arr, tid):
    return [arr, np.rot90(arr, 1), np.rot90(arr, 2), np.rot90(arr, 3), np.fliplr(arr), np.flipud(arr), arr.T,
            np.fliplr(np.rot90(arr, 1))][tid]


def reference_encode(grid, pad_r, pad_c, size=30):
    nrow, ncol = grid.shape
    out = np.pad(grid + 2, ((pad_r, size - pad_r - nrow), (pad_c, size - pad_c - ncol)), constant_values=0)
    eos_row, eos_col = pad_r + nrow, pad_c + ncol
    if eos_row < size:
        out[eos_row, pad_c:eos_col] = 1
    if eos_col < size:
        out[pad_r:eos_row, eos_col] = 1
    return out.flatten()


def notebook_crop(tokens, size=30):
    grid = tokens.reshape(size, size)
    max_area, max_size, num_c = 0, (0, 0), size
    for num_r in range(1, size + 1):
        for c in range(1, num_c + 1):
            x = grid[num_r - 1, c - 1]
            if (x < 2) | (x > 11):
                num_c = c - 1
                break
        if num_r * num_c > max_area:
            max_area, max_size = num_r * num_c, (num_r, num_c)
    return grid[:max_size[0], :max_size[1]] - 2


@st.composite
def grids(draw, max_side=30):
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 10, (rows, cols)).astype(np.uint8)


# Augmentation -----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(grid=grids(), tid=st.integers(0, 7), seed=st.integers(0, 2**32 - 1))
def test_augmentation_inverse_is_exact(grid, tid, seed):
    colours = np.concatenate([[0], np.random.default_rng(seed).permutation(np.arange(1, 10))]).astype(np.uint8)
    aug = Augmentation(tid, colours)
    out = aug.apply(grid)
    np.testing.assert_array_equal(out, reference_dihedral(colours[grid], tid))
    np.testing.assert_array_equal(aug.invert(out), grid)
    # The name round trip gives the same augmentation (the notebook reads it back from the name).
    task, parsed = parse_puzzle_name(f"abc_{aug.suffix}")
    assert task == "abc" and parsed.tid == tid
    np.testing.assert_array_equal(parsed.colours, colours)
    assert (out == 0).sum() == (grid == 0).sum()  # background colour fixed


def test_dihedral_ids_are_the_reference_group():
    grid = np.arange(12).reshape(3, 4)
    for tid in range(8):
        np.testing.assert_array_equal(dihedral_transform(grid, tid), reference_dihedral(grid, tid))
        np.testing.assert_array_equal(dihedral_transform(dihedral_transform(grid, tid), DIHEDRAL_INVERSE[tid]), grid)
    images = {dihedral_transform(grid, t).tobytes() + bytes(dihedral_transform(grid, t).shape) for t in range(8)}
    assert len(images) == 8
    with pytest.raises(DihedralError, match="0..7"):
        dihedral_transform(grid, 8)


def test_random_augmentation_keeps_background_and_covers_transforms():
    rng = np.random.default_rng(0)
    augs = [random_augmentation(rng) for _ in range(400)]
    assert {a.tid for a in augs} == set(range(8))
    assert all(a.colours[0] == 0 and sorted(a.colours) == list(range(10)) for a in augs)
    assert parse_puzzle_name("007bbfb7")[1] is IDENTITY


# Encoding and crop ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(grid=grids(), data=st.data())
def test_encode_matches_reference_and_crop_round_trips(grid, data):
    row = data.draw(st.integers(0, 30 - grid.shape[0]))
    col = data.draw(st.integers(0, 30 - grid.shape[1]))
    tokens = encode_grid(grid, row, col)
    np.testing.assert_array_equal(tokens, reference_encode(grid, row, col))
    np.testing.assert_array_equal(crop(encode_grid(grid)), grid)  # test examples sit at the corner


def test_encoding_by_hand():
    tokens = encode_grid(np.array([[0, 9, 3], [5, 0, 1]], np.uint8), 1, 2, size=5).reshape(5, 5)
    np.testing.assert_array_equal(tokens, [[0, 0, 0, 0, 0],
                                           [0, 0, 2, 11, 5],
                                           [0, 0, 7, 2, 3],
                                           [0, 0, 1, 1, 1],
                                           [0, 0, 0, 0, 0]])
    with pytest.raises(ARCDataError, match="does not fit"):
        encode_grid(np.zeros((3, 3), np.uint8), 28, 0)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), noise=st.floats(0.0, 0.2))
def test_crop_matches_the_notebook_on_noisy_predictions(seed, noise):
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 10, (rng.integers(1, 31), rng.integers(1, 31))).astype(np.uint8)
    tokens = encode_grid(grid).astype(np.int64)
    flip = rng.random(900) < noise  # a model's mistakes: markers and pads anywhere
    tokens[flip] = rng.integers(0, 12, int(flip.sum()))
    expected = notebook_crop(tokens)
    np.testing.assert_array_equal(crop(tokens), expected)
    assert tuple(crop_sizes(tokens[None])[0]) == expected.shape


# Task files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, message", [
    ({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []}, "equal length"),
    ({"train": [{"input": [[10]], "output": [[1]]}], "test": []}, "0..9"),
    ({"train": [{"input": [[0] * 31], "output": [[1]]}], "test": []}, "larger than 30x30"),
    ({"train": [], "test": []}, "at least one"),
    ({"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "needs 'input' and 'output'"),
])
def test_bad_task_files_name_the_problem(tmp_path, task, message):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"t1": task}))
    with pytest.raises(ARCDataError, match=message) as info:
        load_tasks(path)
    assert "t1" in str(info.value)


# The builder ------------------------------------------------------------------------------------
def _write_tasks(path, tasks):
    path.write_text(json.dumps(tasks))
    return str(path)


def _random_task(rng, n_train, n_test, side):
    pair = lambda: {"input": rng.integers(0, 10, (rng.integers(1, side + 1), rng.integers(1, side + 1))).tolist(),  # noqa: E731
                    "output": rng.integers(0, 10, (rng.integers(1, side + 1), rng.integers(1, side + 1))).tolist()}
    return {"train": [pair() for _ in range(n_train)], "test": [pair() for _ in range(n_test)]}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("arc")
    rng = np.random.default_rng(1)
    train = _write_tasks(root / "train.json", {"a1": _random_task(rng, 2, 1, 6), "a2": _random_task(rng, 3, 1, 6)})
    evaluation = _write_tasks(root / "eval.json", {"e1": _random_task(rng, 2, 2, 6)})
    # A 1x1 task of colour 0 only: every augmentation equals it, so its group holds just itself.
    blank = _write_tasks(root / "blank.json", {"b1": {"train": [{"input": [[0]], "output": [[0]]}], "test": []}})
    out = root / "built"
    report = build_arc_dataset(out, [Source(train, "train"), Source(blank, "train"), Source(evaluation, "eval")],
                               num_aug=5, seed=3)
    return out, report


def test_tiny_build_has_the_reference_layout(tiny_build):
    out, report = tiny_build
    train, test = load_split(out, "train"), load_split(out, "test")
    names = json.loads((out / "identifiers.json").read_text())
    meta = train.metadata
    sizes = (meta.seq_len, meta.vocab_size, meta.pad_id, meta.ignore_label_id, meta.blank_identifier_id)
    assert sizes == (900, 12, 0, 0, 0)
    # 3 tasks x 6 puzzles + b1 (all its augmentations are duplicates) + blank id 0.
    assert names[0] == "<blank>" and len(names) == meta.num_puzzle_identifiers == 3 * 6 + 1 + 1
    assert report["tasks_not_full"] == 1 and meta.total_groups == 4 and test.metadata.total_groups == 1
    t, s = train["all"], test["all"]
    assert np.array_equal(np.sort(t.puzzle_identifiers), np.arange(1, len(names)))  # each id once in train
    sizes = np.diff(t.puzzle_indices)
    expected = {"a1": 3, "a2": 4, "e1": 2, "b1": 1}  # "train" tasks bring their test pairs to train
    for pid, size in zip(t.puzzle_identifiers, sizes):
        assert size == expected[parse_puzzle_name(names[pid])[0]]
    assert all(names[pid].startswith("e1") for pid in s.puzzle_identifiers) and len(s.puzzle_identifiers) == 6
    assert t.inputs.dtype == np.uint8 and t.inputs.shape == (int(sizes.sum()), 900)


def test_tiny_build_augments_and_translates_as_the_reference(tiny_build):
    out, _ = tiny_build
    names = json.loads((out / "identifiers.json").read_text())
    tasks = {t.name: t for t in load_tasks(out.parent / "eval.json")}
    test = load_split(out, "test")["all"]
    seen = set()
    for p, pid in enumerate(test.puzzle_identifiers):
        task, aug = parse_puzzle_name(names[pid])
        rows = range(test.puzzle_indices[p], test.puzzle_indices[p + 1])
        for (inp, out_grid), r in zip(tasks[task].test, rows):
            # Test examples sit at the corner: the crop gives the augmented grid exactly.
            np.testing.assert_array_equal(crop(test.inputs[r]), aug.apply(inp))
            np.testing.assert_array_equal(crop(test.labels[r]), aug.apply(out_grid))
        seen.add(bytes(np.asarray(test.inputs[test.puzzle_indices[p]:test.puzzle_indices[p + 1]]).tobytes()))
    assert len(seen) == 6  # no duplicate augmentation
    train = load_split(out, "train")["all"]
    at_corner = np.asarray(train.inputs[:, 0]) >= 2  # a grid at the corner starts with a colour token
    for p in range(len(train.puzzle_identifiers)):
        block = at_corner[train.puzzle_indices[p]:train.puzzle_indices[p + 1]]
        assert block.any()  # the reference keeps one example per puzzle untranslated
    assert not at_corner.all()  # and moves the others


# Voting and scoring -----------------------------------------------------------------------------
def test_rank_candidates_by_count_then_mean_q():
    a, b, c = grid_key(np.array([[1]])), grid_key(np.array([[2]])), grid_key(np.array([[3]]))
    ranked = rank_candidates([(a, 0.9), (b, 0.2), (b, 0.4), (c, 0.5), (c, 0.3), (a, 0.0)])
    # counts: a 2 (mean .45), b 2 (mean .3), c 2 (mean .4): ties broken by mean q.
    assert [k for k, _, _ in ranked] == [a, c, b]
    assert ranked[0][1] == 2 and ranked[0][2] == pytest.approx(0.45)
    ranked = rank_candidates([(b, 0.1), (a, 0.99), (b, 0.1), (b, 0.1)])
    assert [k for k, _, _ in ranked] == [b, a]  # three weak votes beat one confident vote


def _predictions(rows, names):
    """rows: (name, input grid, label grid, predicted grid or None, q logit), grids already augmented."""
    ids = {n: i for i, n in enumerate(names)}
    blank = np.zeros(900, np.int64)
    return {"inputs": np.stack([encode_grid(r[1]) for r in rows]),
            "labels": np.stack([encode_grid(r[2]) for r in rows]),
            "predictions": np.stack([encode_grid(r[3]) if r[3] is not None else blank for r in rows]),
            "puzzle_identifiers": np.array([ids[r[0]] for r in rows]),
            "q_halt_logits": np.array([r[4] for r in rows], np.float32)}


def test_scoring_a_constructed_example():
    rng = np.random.default_rng(0)
    g = lambda: rng.integers(1, 10, (3, 4)).astype(np.uint8)  # noqa: E731
    x1, y1, x2, y2, z1, zy1, wrong1, wrong2 = (g() for _ in range(8))
    aug = Augmentation(1, np.array([0, 3, 1, 2, 5, 4, 9, 8, 7, 6], np.uint8))
    names = ["<blank>", "T", f"T_{aug.suffix}", "U"]
    rows = [
        # Task T, test input 1: the right answer gets 2 votes (one through the augmentation), wrong1 gets 1.
        ("T", x1, y1, y1, 0.0), (f"T_{aug.suffix}", aug.apply(x1), aug.apply(y1), aug.apply(y1), 0.0),
        ("T", x1, y1, wrong1, 5.0),
        # Test input 2: wrong2 and y2 tie on count; y2 has the larger mean q -> ranked first.
        ("T", x2, y2, wrong2, -2.0), (f"T_{aug.suffix}", aug.apply(x2), aug.apply(y2), aug.apply(y2), 2.0),
        ("T", x2, y2, None, 9.0),  # no grid: dropped
        # Task U: the copy of the input is the answer; the model says something else twice, then the answer.
        ("U", z1, z1, wrong1, 0.0), ("U", z1, z1, wrong1, 0.0), ("U", z1, z1, z1, 0.0),
    ]
    scores = score_predictions(_predictions(rows, names), names, ks=(1, 2))
    assert scores["tasks"] == 2 and scores["test_inputs"] == 3
    assert scores["per_task"]["T"]["right@1"] == [True, True]
    assert scores["per_task"]["U"]["right@1"] == [False] and scores["per_task"]["U"]["right@2"] == [True]
    assert scores["pass@1"] == 0.5 and scores["pass@2"] == 1.0
    assert scores["copy_pass"] == 0.5 and scores["copy_prize_pass"] == 0.5
    assert scores["attempts"]["T"][0]["attempt_1"] == y1.tolist()
    assert scores["attempts"]["T"][0]["attempt_2"] == wrong1.tolist()
    # Keeping the empty grid (the notebook's way) lets it take pass@1 of input 2 (q 9 vs 2: count ties).
    kept = score_predictions(_predictions(rows, names), names, ks=(1, 2), drop_invalid=False)
    assert kept["per_task"]["T"]["right@1"] == [True, False] and kept["pass@1"] == 0.0


def test_prize_score_counts_fractions():
    a, b = grid_key(np.array([[1]])), grid_key(np.array([[2]]))
    answers = {"T": {a: a, b: a}}  # two test inputs, both with answer a
    votes = {"T": {a: [(a, 0.5)], b: [(b, 0.5)]}}
    scores = score_votes(answers, votes, ks=(2,))
    assert scores["pass@2"] == 0.0 and scores["prize_pass@2"] == 0.5 and scores["copy_prize_pass"] == 0.5


def test_mismatched_identifiers_are_reported():
    x, y = np.ones((2, 2), np.uint8), np.full((2, 2), 2, np.uint8)
    names = ["<blank>", "T", "T_t1_0123456789"]
    preds = _predictions([("T", x, y, y, 0.0), ("T_t1_0123456789", np.eye(2, dtype=np.uint8) + 3, y, y, 0.0)], names)
    with pytest.raises(ARCEvalError, match="matches no test input"):
        collect_votes(preds, names)


# The CLI end to end (CI-sized) ------------------------------------------------------------------
@pytest.mark.skipif(not (DATA / "arc-agi-1_training.json").is_file(), reason="needs the ARC task files")
def test_cli_build_train_eval(tmp_path, capsys, monkeypatch):
    from experiments import arc
    from hrm_jax import presets

    # A smaller model than the quick start's keeps compilation (most of this test's time) short.
    small = presets.run_arc_quickstart().replace(model=presets.tiny(
        seq_len=36, vocab_size=12, hidden_size=32, num_heads=2, H_layers=1, L_layers=1, H_cycles=1, L_cycles=1,
        halt_max_steps=2, puzzle_emb_ndim=32))
    monkeypatch.setitem(presets.PRESETS, "arc_quickstart", presets.Preset("arc", lambda: small))

    data = tmp_path / "data"
    assert arc.main(["build", "--out", str(data), "--max-tasks", "1", "--num-aug", "2", "--grid-size", "6",
                     "--source-dir", str(DATA)]) == 0
    assert json.loads((data / "build_report.json").read_text())["tasks"] == 3
    run = tmp_path / "run"
    assert arc.main(["train", "--data", str(data), "--preset", "quickstart", "--out", str(run), "--max-steps", "2",
                     "--global-batch-size", "4", "--eval-every", "2", "--no-progress"]) == 0
    assert arc.main(["eval", "--checkpoint", str(run / "best"), "--data", str(data), "--batch-size", "4",
                     "--json", str(tmp_path / "s.json"), "--attempts", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "copy the input (baseline)" in out and "pass@2" in out
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["tasks"] == 1 and 0.0 <= scores["pass@2"] <= 1.0
    attempts = json.loads((tmp_path / "a.json").read_text())
    assert len(attempts) == 1 and set(next(iter(attempts.values()))[0]) == {"attempt_1", "attempt_2"}
    # A bad request is one line naming the fix.
    assert arc.main(["build", "--out", str(tmp_path / "x"), "--dataset", "arc2"]) == 2
    assert "--eval" in capsys.readouterr().err
