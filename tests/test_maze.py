"""The maze generator, label checker, augmentation and builder against independent references, and
the maze CLI end to end on a tiny scale."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import maze as maze_cli
from hrm_jax.data import maze
from hrm_jax.data.format import load_split


# ----------------------------------------------------------------------------- independent references
def reference_distance(open_: np.ndarray, start, goal) -> int:
    """Shortest 4-neighbour distance by set-based frontier expansion (no queue, no path counts);
    -1 when unreachable."""
    seen, frontier, steps = {tuple(start)}, {tuple(start)}, 0
    while frontier:
        if tuple(goal) in frontier:
            return steps
        frontier = {(r + dr, c + dc) for r, c in frontier for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= r + dr < open_.shape[0] and 0 <= c + dc < open_.shape[1]
                    and open_[r + dr, c + dc] and (r + dr, c + dc) not in seen}
        seen |= frontier
        steps += 1
    return -1


def path_cells(inputs: np.ndarray, labels: np.ndarray) -> list[tuple[int, int]]:
    """The marked path as an ordered cell list S..G, found by following adjacency; asserts it is a
    simple connected walk."""
    start = tuple(np.argwhere(inputs == maze.START)[0])
    goal = tuple(np.argwhere(inputs == maze.GOAL)[0])
    left = {tuple(x) for x in np.argwhere(labels == maze.PATH)} | {goal}
    walk = [start]
    while walk[-1] != goal:
        r, c = walk[-1]
        nexts = [n for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)) if n in left]
        assert len(nexts) == 1, f"path breaks or branches at {walk[-1]}"
        left.discard(nexts[0])
        walk.append(nexts[0])
    assert not (left - {goal}), "marked cells off the path"
    return walk


def assert_unique_shortest(inputs: np.ndarray, labels: np.ndarray) -> int:
    """The marked path is a shortest S-G path, and the only one: blocking any of its inner cells
    makes S-G strictly longer (if another shortest path existed, blocking a cell of ours that it
    avoids would keep the distance). Returns the length."""
    open_ = inputs != maze.WALL
    walk = path_cells(inputs, labels)
    assert all(open_[cell] for cell in walk)
    length = reference_distance(open_, walk[0], walk[-1])
    assert len(walk) - 1 == length
    for cell in walk[1:-1]:
        blocked = open_.copy()
        blocked[cell] = False
        other = reference_distance(blocked, walk[0], walk[-1])
        assert other == -1 or other > length, f"another shortest path avoids {cell}"
    return length


REFERENCE_DIHEDRAL = [  # the reference's dataset/common.py dihedral_transform, written out
    lambda a: a, lambda a: np.rot90(a, k=1), lambda a: np.rot90(a, k=2), lambda a: np.rot90(a, k=3),
    np.fliplr, np.flipud, lambda a: a.T, lambda a: np.fliplr(np.rot90(a, k=1))]


# ----------------------------------------------------------------------------- generator properties
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(5, 14), loop_prob=st.sampled_from([0.0, 0.05, 0.3]))
def test_generated_label_is_the_unique_shortest_path(seed, size, loop_prob):
    min_path = size  # reachable for every size here
    inputs, labels, length = maze.generate_maze(size, min_path, np.random.default_rng(seed), loop_prob=loop_prob)
    assert inputs.shape == labels.shape == (size, size)
    assert (inputs == maze.START).sum() == 1 and (inputs == maze.GOAL).sum() == 1
    assert set(np.unique(inputs)) <= {maze.WALL, maze.OPEN, maze.START, maze.GOAL}
    assert length > min_path  # the threshold
    assert assert_unique_shortest(inputs, labels) == length
    assert maze.check_label(inputs, labels) == length


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(4, 20))
def test_generator_is_deterministic_for_a_seed(seed, size):
    a = maze.generate_maze(size, 2, np.random.default_rng(seed))
    b = maze.generate_maze(size, 2, np.random.default_rng(seed))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(2, 12), density=st.floats(0.0, 0.6))
def test_bfs_matches_reference_on_random_grids(seed, size, density):
    rng = np.random.default_rng(seed)
    open_ = rng.random((size, size)) >= density
    open_[0, 0] = True
    dist, paths = maze.bfs(open_, (0, 0))
    for r in range(size):
        for c in range(size):
            expected = reference_distance(open_, (0, 0), (r, c)) if open_[r, c] else -1
            assert dist[r, c] == expected
    assert ((paths > 0) == (dist >= 0)).all()
    # Path counts (capped at 2) by brute force over predecessors, on the reference distances.
    order = np.argsort(np.where(dist >= 0, dist, 10**6), axis=None, kind="stable")
    count = np.zeros((size, size), np.int64)
    count[0, 0] = 1
    for flat in order[1:]:
        r, c = divmod(int(flat), size)
        if dist[r, c] > 0:
            count[r, c] = sum(count[r + dr, c + dc] for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                              if 0 <= r + dr < size and 0 <= c + dc < size and dist[r + dr, c + dc] == dist[r, c] - 1)
    np.testing.assert_array_equal(paths, np.minimum(count, 2))


def test_carved_maze_is_connected_and_wall_density_near_searchformer():
    rng = np.random.default_rng(0)
    densities = []
    for _ in range(20):
        open_ = maze.carve_maze(30, rng, 0.05)
        cells = np.argwhere(open_)
        dist, _ = maze.bfs(open_, tuple(cells[0]))
        assert (dist[open_] >= 0).all()  # one connected component
        densities.append(1 - open_.mean())
    assert 0.45 < np.mean(densities) < 0.52  # Searchformer's random walls: 30-50%


def test_impossible_threshold_is_a_clear_error():
    with pytest.raises(maze.MazeDataError, match="lower min_path"):
        maze.generate_maze(6, 17, np.random.default_rng(0), max_tries=50)


# ----------------------------------------------------------------------------- check_label
def _room():
    """A 3x4 open room: S top-left, G bottom-right (distance 5)."""
    grid = np.full((3, 4), maze.OPEN, np.uint8)
    grid[0, 0], grid[2, 3] = maze.START, maze.GOAL
    return grid


def test_check_label_accepts_a_shortest_and_rejects_bad_paths():
    inputs = _room()
    good = inputs.copy()
    good[0, 1:4] = maze.PATH
    good[1, 3] = maze.PATH
    assert maze.check_label(inputs, good) == 5
    broken = good.copy()
    broken[0, 2] = maze.OPEN
    with pytest.raises(maze.MazeDataError, match="breaks"):
        maze.check_label(inputs, broken)
    stray = good.copy()
    stray[2, 0] = maze.PATH
    with pytest.raises(maze.MazeDataError, match="off the S-G path"):
        maze.check_label(inputs, stray)
    walled = inputs.copy()
    walled[1, 3] = maze.WALL
    with pytest.raises(maze.MazeDataError, match="except for open cells"):
        maze.check_label(walled, good)


def test_check_label_rejects_a_longer_simple_path():
    # A 3x3 room with a wall in the middle: S top-left, G top-right; the path round the bottom is longer.
    inputs = np.full((3, 3), maze.OPEN, np.uint8)
    inputs[1, 1] = maze.WALL
    inputs[0, 0], inputs[0, 2] = maze.START, maze.GOAL
    detour = inputs.copy()
    detour[1, 0] = detour[2, 0] = detour[2, 1] = detour[2, 2] = detour[1, 2] = maze.PATH
    with pytest.raises(maze.MazeDataError, match="shortest takes 2"):
        maze.check_label(inputs, detour)


# ----------------------------------------------------------------------------- augmentation
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(5, 12), tid=st.integers(0, 7))
def test_dihedral_matches_reference_inverts_and_keeps_labels_optimal(seed, size, tid):
    inputs, labels, length = maze.generate_maze(size, 3, np.random.default_rng(seed))
    moved_in, moved_lab = maze.dihedral_transform(inputs, tid), maze.dihedral_transform(labels, tid)
    np.testing.assert_array_equal(moved_in, REFERENCE_DIHEDRAL[tid](inputs))
    np.testing.assert_array_equal(maze.dihedral_transform(moved_in, maze.DIHEDRAL_INVERSE[tid]), inputs)
    assert assert_unique_shortest(moved_in, moved_lab) == length
    assert maze.check_label(moved_in, moved_lab) == length


def test_encoding_is_the_references_charset():
    # build_maze_dataset.py: char2id[ord(c)] = CHARSET.index(c) + 1 with CHARSET "# SGo".
    assert [maze.CHARSET.index(ch) + 1 for ch in "# SGo"] == [maze.WALL, maze.OPEN, maze.START, maze.GOAL, maze.PATH]
    assert maze.VOCAB_SIZE == 6  # pad 0 + five characters
    assert maze.to_text(np.array([[1, 3], [2, 5]], np.uint8)) == "#S\n o"
    assert maze.to_text(np.array([1, 2, 4, 0])) == "# \nG?"


# ----------------------------------------------------------------------------- builder
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("maze") / "m"
    report = maze.build_maze_dataset(out, train_size=20, test_size=12, min_path=12, aug=True, seed=3, size=8)
    return out, report


def test_builder_writes_reference_format_and_optimal_labels(built):
    out, report = built
    train, test = load_split(out, "train"), load_split(out, "test")
    for split, mazes, per_group in ((train, 20, 8), (test, 12, 1)):
        meta = split.metadata
        assert (meta.seq_len, meta.vocab_size, meta.pad_id, meta.ignore_label_id) == (64, 6, 0, 0)
        assert (meta.blank_identifier_id, meta.num_puzzle_identifiers, meta.mean_puzzle_examples) == (0, 1, 1.0)
        assert meta.total_groups == mazes and meta.sets == ("all",)
        s = split["all"]
        assert s.num_examples == mazes * per_group == s.num_puzzles
        np.testing.assert_array_equal(s.group_indices, np.arange(0, mazes * per_group + 1, per_group))
        assert (np.asarray(s.puzzle_identifiers) == 0).all()
        assert (np.asarray(s.labels) != meta.ignore_label_id).all()  # every cell supervised
        lengths = np.asarray(s.extra["difficulty"])
        assert (lengths > 12).all()
        for k in range(s.num_examples):
            grid_in, grid_lab = np.asarray(s.inputs[k]).reshape(8, 8), np.asarray(s.labels[k]).reshape(8, 8)
            assert assert_unique_shortest(grid_in, grid_lab) == lengths[k]
    # Each training group is a maze followed by its transforms 1..7, in the reference's order.
    s = train["all"]
    for g in range(3):
        base = np.asarray(s.inputs[8 * g]).reshape(8, 8)
        for t in range(8):
            np.testing.assert_array_equal(np.asarray(s.inputs[8 * g + t]).reshape(8, 8), REFERENCE_DIHEDRAL[t](base))
    assert report["train"]["examples"] == 160 and report["test"]["mazes"] == 12


def test_builder_no_test_maze_is_a_transform_of_a_training_maze(built):
    out, _ = built
    train = np.asarray(load_split(out, "train")["all"].inputs).reshape(-1, 8, 8)
    test = np.asarray(load_split(out, "test")["all"].inputs).reshape(-1, 8, 8)
    train_keys = {g.tobytes() for g in train}  # the augmented train set holds every transform
    assert not any(g.tobytes() in train_keys for g in test)
    assert len({g.tobytes() for g in test}) == len(test)


def test_builder_is_deterministic_and_test_set_ignores_train_size(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    maze.build_maze_dataset(again, train_size=5, test_size=12, min_path=12, aug=False, seed=3, size=8)
    for name in ("inputs", "labels", "difficulty"):
        a = np.load(out / "test" / f"all__{name}.npy")
        b = np.load(again / "test" / f"all__{name}.npy")
        np.testing.assert_array_equal(a, b)
    train_a = np.load(out / "train" / "all__inputs.npy")[::8][:5]
    np.testing.assert_array_equal(train_a, np.load(again / "train" / "all__inputs.npy"))


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 3}, "size must be"), ({"min_path": 50, "size": 10}, "min_path must be"),
    ({"train_size": 0}, "train_size"), ({"loop_prob": 1.5}, "loop_prob")])
def test_builder_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(maze.MazeDataError, match=message):
        maze.build_maze_dataset(tmp_path, **{"size": 8, "min_path": 4, **kwargs})


# ----------------------------------------------------------------------------- the CLI
def test_cli_build_train_eval_end_to_end(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert maze_cli.main(["build", "--out", str(data), "--size", "8", "--min-path", "10", "--train-size", "16",
                          "--test-size", "8", "--aug"]) == 0
    report = json.loads((data / "build_report.json").read_text())
    assert report["train"]["examples"] == 128 and report["test"]["path_length"]["min"] > 10
    assert maze_cli.main(["train", "--data", str(data), "--preset", "quickstart", "--out", str(run),
                          "--global-batch-size", "8", "--lr-warmup-steps", "1", "--max-steps", "2",
                          "--eval-every", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out evaluation" in out and "copy exact" in out
    assert (run / "curves.png").stat().st_size > 1000
    assert maze_cli.main(["eval", "--checkpoint", str(run / "best"), "--data", str(data), "--batch-size", "8",
                          "--show", "1", "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "maze 0: model's answer is" in out and "#" in out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["all"]["count"] == 8 and results["all"]["copy_exact_accuracy"] == 0.0
    # An answer marks a shortest path exactly when it equals the (unique) label.
    assert results["all"]["optimal_path_rate"] == pytest.approx(results["all"]["exact_accuracy"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert maze_cli.main(["build", "--out", str(tmp_path / "x"), "--size", "8", "--min-path", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "min_path" in err and "Traceback" not in err
    assert maze_cli.main(["train", "--data", str(tmp_path / "none"), "--preset", "quickstart"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        maze_cli.main(["train", "--data", "x", "--preset", "sudoku_extreme"])
    assert exit_info.value.code == 2
