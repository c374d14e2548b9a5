"""Maze-Hard style dataset: a seeded maze generator with exact shortest-path labels, and the builder.

Encoding as the reference (sapientinc/HRM dataset/build_maze_dataset.py): a size x size grid read
row by row over the characters "# SGo" (wall, open, start, goal, path), token id = position in
that string + 1, 0 the pad (never used: every grid fills its sequence). The input holds walls,
open cells, S and G; the label is the input with the open cells of the shortest S-G path turned
to "o" (S and G keep their letters). Every cell is supervised (ignore_label_id 0 never occurs in a
label). One puzzle identifier (0, blank). With `aug`, each training maze is a group of its 8
dihedral transforms (the reference's default is no augmentation); test mazes are never augmented.

The paper's set (hub `sapientinc/maze-30x30-hard-1k`) is not reachable here, so we generate our
own. The paper takes Searchformer's generator (random walls at 30-50% density) and keeps mazes
whose difficulty exceeds 110; with such walls a 30x30 grid almost never holds a shortest path over
110 steps (measured on 4,096 grids: from a random open cell, 0.1% of grids reach any cell that far,
and a random pair of cells qualifies with probability 4e-5), so this generator carves corridors
instead, which gives long paths at a similar wall density (about 49%):

1. Lattice: cells at every other row and column (offset 0 or 1 per axis at random when the size
   is even, so the wall border falls on a random side and the distribution stays dihedral-
   invariant); everything else starts as wall.
2. Carve a spanning tree of the lattice by randomized depth-first search (recursive backtracker:
   long winding corridors, hence long shortest paths).
3. Add loops: each wall still standing between two adjacent lattice cells is removed with
   probability `loop_prob`, so the maze has alternative routes and "shortest" means something.
4. Draw S uniformly among the cells within `far_slack` (10) steps of the farthest cell from a
   random open probe cell (so a far G is likely without pinning S to a corner), run an exact BFS
   from S that also counts shortest paths (capped at 2), and draw G uniformly over the cells at
   distance > min_path that have exactly one shortest path from S; if there is none, start again
   from step 1. The label is that path, so
   every label is the unique optimal answer (no tie-breaking convention for the model to guess).

Every written label is re-verified by `check_label` (an independent walk of the marked cells
compared with a fresh BFS distance), and no maze is written twice: a maze (with S and G) whose
dihedral orbit was already drawn, in either split, is skipped, so no test maze is a transform of
a training maze.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time

import numpy as np

from hrm_jax.data.dihedral import DIHEDRAL_INVERSE, NUM_DIHEDRAL, dihedral_transform  # noqa: F401 (re-exported)
from hrm_jax.data.format import PuzzleDatasetMetadata, write_split

log = logging.getLogger(__name__)

CHARSET = "# SGo"  # the reference's CHARSET; token id = index + 1, 0 = pad
PAD, WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4, 5
VOCAB_SIZE = len(CHARSET) + 1
_STEPS = ((-1, 0), (0, -1), (1, 0), (0, 1))


class MazeDataError(ValueError):
    """Bad builder arguments, a maze or label that breaks the rules, or an unreachable request."""


# ----------------------------------------------------------------------------- generation
def carve_maze(size: int, rng: np.random.Generator, loop_prob: float) -> np.ndarray:
    """bool[size, size], True = open: a DFS-carved lattice maze with loops (steps 1-3 above)."""
    offsets = [int(rng.integers(2)) if size % 2 == 0 else 0 for _ in range(2)]
    cells = [(size - o + 1) // 2 for o in offsets]       # lattice cells per axis
    rows, cols = cells
    open_ = np.zeros((size, size), bool)
    open_[offsets[0]::2, offsets[1]::2] = True
    visited = np.zeros((rows, cols), bool)
    start = (int(rng.integers(rows)), int(rng.integers(cols)))
    visited[start] = True
    stack = [start]
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in _STEPS
                   if 0 <= r + dr < rows and 0 <= c + dc < cols and not visited[r + dr, c + dc]]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        visited[nr, nc] = True
        # The wall cell between lattice cells (r, c) and (nr, nc) in grid coordinates.
        open_[offsets[0] + r + nr, offsets[1] + c + nc] = True
        stack.append((nr, nc))
    # Candidate loop walls: grid cells between two lattice cells (one coordinate on the lattice,
    # the other strictly between two lattice lines).
    r_on = (np.arange(size) - offsets[0]) % 2 == 0
    c_on = (np.arange(size) - offsets[1]) % 2 == 0
    r_between = ~r_on & (np.arange(size) > offsets[0]) & (np.arange(size) < offsets[0] + 2 * (rows - 1))
    c_between = ~c_on & (np.arange(size) > offsets[1]) & (np.arange(size) < offsets[1] + 2 * (cols - 1))
    between = (r_on[:, None] & c_between[None, :]) | (r_between[:, None] & c_on[None, :])
    open_ |= between & (rng.random((size, size)) < loop_prob)
    return open_


def bfs(open_: np.ndarray, start: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Exact 4-neighbour BFS from `start` over open_ bool[H, W].

    Returns dist int32[H, W] (steps from start, -1 where unreachable or wall) and paths
    int8[H, W], the number of distinct shortest paths from start, capped at 2 (0 unreachable).
    """
    height, width = open_.shape
    # Plain Python lists over flat indices: numpy scalar indexing would make this 3x slower.
    passable = open_.reshape(-1).tolist()
    dist = [-1] * (height * width)
    paths = [0] * (height * width)
    source = start[0] * width + start[1]
    dist[source], paths[source] = 0, 1
    queue = collections.deque([source])
    while queue:
        i = queue.popleft()
        r, c = divmod(i, width)
        for j, inside in ((i - width, r > 0), (i - 1, c > 0), (i + width, r < height - 1), (i + 1, c < width - 1)):
            if not inside or not passable[j]:
                continue
            if dist[j] < 0:
                dist[j] = dist[i] + 1
                queue.append(j)
            if dist[j] == dist[i] + 1:  # every shortest path to j ends with a step from a cell at dist[i]
                paths[j] = min(2, paths[j] + paths[i])
    return (np.asarray(dist, np.int32).reshape(height, width),
            np.asarray(paths, np.int8).reshape(height, width))


def _walk_back(dist: np.ndarray, goal: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells of a shortest path, goal first, following strictly decreasing distance."""
    path = [goal]
    r, c = goal
    while dist[r, c] > 0:
        r, c = next((r + dr, c + dc) for dr, dc in _STEPS
                    if 0 <= r + dr < dist.shape[0] and 0 <= c + dc < dist.shape[1]
                    and dist[r + dr, c + dc] == dist[r, c] - 1)
        path.append((r, c))
    return path


def generate_maze(size: int, min_path: int, rng: np.random.Generator, *, loop_prob: float = 0.05,
                  far_slack: int = 10, max_tries: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
    """One maze: (inputs uint8[size, size], labels uint8[size, size], shortest path length).

    The path from S to G is longer than min_path steps and is the only shortest path (steps 1-4 of
    the module docstring; far_slack is step 4's). Raises MazeDataError after max_tries carved
    mazes without such a pair (min_path too large for size).
    """
    for _ in range(max_tries):
        open_ = carve_maze(size, rng, loop_prob)
        # S: a random cell among the farthest from a random open cell (one sweep of the classic
        # double-sweep diameter search), which makes a far G likely without fixing S to a corner.
        open_cells = np.flatnonzero(open_)
        probe = np.unravel_index(open_cells[rng.integers(len(open_cells))], open_.shape)
        probe_dist = bfs(open_, probe)[0]
        far = np.flatnonzero(probe_dist >= max(probe_dist.max() - far_slack, 0))
        start = np.unravel_index(far[rng.integers(len(far))], open_.shape)
        dist, paths = bfs(open_, start)
        candidates = np.flatnonzero((dist > min_path) & (paths == 1))
        if len(candidates) == 0:
            continue
        goal = np.unravel_index(candidates[rng.integers(len(candidates))], open_.shape)
        inputs = np.where(open_, OPEN, WALL).astype(np.uint8)
        inputs[start], inputs[goal] = START, GOAL
        labels = inputs.copy()
        for cell in _walk_back(dist, goal)[1:-1]:
            labels[cell] = PATH
        return inputs, labels, int(dist[goal])
    raise MazeDataError(f"no {size}x{size} maze with a unique shortest path longer than {min_path} steps "
                        f"in {max_tries} tries; lower min_path (about 3.7 * size is easy) or raise size")


# ----------------------------------------------------------------------------- checks, transforms
def check_label(inputs: np.ndarray, labels: np.ndarray) -> int:
    """Verifies that labels is inputs with one shortest S-G path marked; returns its length.

    inputs, labels: int[size, size] token grids. Independent of how the path was found: walks the
    marked cells from S (each step to the one unvisited marked neighbour) and compares the walk's
    length with a fresh BFS distance. Raises MazeDataError naming the first broken rule.
    """
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.shape != labels.shape or inputs.ndim != 2:
        raise MazeDataError(f"inputs {inputs.shape} and labels {labels.shape} must be equal 2-D grids")
    legal_inputs, legal_labels = (WALL, OPEN, START, GOAL), (WALL, OPEN, START, GOAL, PATH)
    if not (np.isin(inputs, legal_inputs).all() and np.isin(labels, legal_labels).all()):
        raise MazeDataError("inputs may hold only '#', ' ', 'S', 'G' and labels also 'o' (ids 1-5)")
    if (inputs == START).sum() != 1 or (inputs == GOAL).sum() != 1:
        raise MazeDataError("a maze needs exactly one S and one G")
    marked = labels == PATH
    if not np.array_equal(np.where(marked, OPEN, labels), inputs) or not (inputs[marked] == OPEN).all():
        raise MazeDataError("the label must equal the input except for open cells marked 'o'")
    start = tuple(int(i) for i in np.argwhere(inputs == START)[0])
    goal = tuple(int(i) for i in np.argwhere(inputs == GOAL)[0])
    on_path = marked | (inputs == GOAL)
    cell, steps = start, 0
    while cell != goal:
        on_path[cell] = False  # visited
        nexts = [(cell[0] + dr, cell[1] + dc) for dr, dc in _STEPS
                 if 0 <= cell[0] + dr < inputs.shape[0] and 0 <= cell[1] + dc < inputs.shape[1]
                 and on_path[cell[0] + dr, cell[1] + dc]]
        if len(nexts) != 1:
            raise MazeDataError(f"the marked path branches or breaks at {cell} ({len(nexts)} ways on)")
        cell, steps = nexts[0], steps + 1
    if on_path.any() and (labels[on_path] == PATH).any():
        raise MazeDataError(f"{int((labels[on_path] == PATH).sum())} marked cells lie off the S-G path")
    shortest = bfs(inputs != WALL, start)[0][goal]
    if steps != shortest:
        raise MazeDataError(f"the marked path takes {steps} steps but the shortest takes {shortest}")
    return steps


def _orbit_key(grid: np.ndarray) -> bytes:
    """The same bytes for a grid and each of its dihedral transforms."""
    return min(np.ascontiguousarray(dihedral_transform(grid, t)).tobytes() for t in range(NUM_DIHEDRAL))


def to_text(tokens: np.ndarray) -> str:
    """A token grid int[size, size] (or flat [size * size]) as text lines over "# SGo" (pad '?')."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        side = int(round(len(tokens) ** 0.5))
        tokens = tokens.reshape(side, side)
    chars = np.array(["?", *CHARSET])
    return "\n".join("".join(chars[np.clip(row, 0, len(CHARSET))]) for row in tokens)


# ----------------------------------------------------------------------------- the builder
def generate_mazes(count: int, size: int, min_path: int, rng: np.random.Generator, *, loop_prob: float = 0.05,
                   seen: set[bytes] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """count distinct mazes: inputs, labels uint8[count, size, size], lengths int32[count], and the
    number skipped as repeats. `seen` (orbit keys of earlier mazes) is updated in place."""
    seen = set() if seen is None else seen
    inputs, labels, lengths, repeats = [], [], [], 0
    while len(inputs) < count:
        maze, label, length = generate_maze(size, min_path, rng, loop_prob=loop_prob)
        key = _orbit_key(maze)
        if key in seen:
            repeats += 1
            if repeats > 10 * count + 100:
                raise MazeDataError(f"too many repeated mazes ({repeats}); {size}x{size} with min_path "
                                    f"{min_path} has too few distinct mazes for {count}: raise size")
            continue
        seen.add(key)
        if check_label(maze, label) != length:
            raise AssertionError("generator and check_label disagree on the path length")  # a bug, not bad input
        inputs.append(maze), labels.append(label), lengths.append(length)
    return np.stack(inputs), np.stack(labels), np.asarray(lengths, np.int32), repeats


def _augment(inputs: np.ndarray, labels: np.ndarray, aug: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """[N, s, s] -> [N * k, s * s] with k = 8 (each maze followed by its transforms 1..7) or 1."""
    k = NUM_DIHEDRAL if aug else 1
    out = [np.stack([dihedral_transform(a, t) for t in range(k)], axis=1) for a in (inputs, labels)]
    return out[0].reshape(len(inputs) * k, -1), out[1].reshape(len(inputs) * k, -1), k


def _write(out_dir: str, split: str, inputs: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
           aug: bool, extra: dict) -> dict:
    """Writes one split as the reference does: every transform its own puzzle, a maze's transforms one group."""
    flat_in, flat_lab, per_group = _augment(inputs, labels, aug)
    n = len(flat_in)
    arrays = {"inputs": flat_in, "labels": flat_lab, "puzzle_identifiers": np.zeros(n, np.int32),
              "puzzle_indices": np.arange(n + 1, dtype=np.int32),
              "group_indices": np.arange(0, n + 1, per_group, dtype=np.int32)}
    metadata = PuzzleDatasetMetadata(
        seq_len=flat_in.shape[1], vocab_size=VOCAB_SIZE, pad_id=PAD, ignore_label_id=0, blank_identifier_id=0,
        num_puzzle_identifiers=1, total_groups=len(inputs), mean_puzzle_examples=1, sets=("all",),
        extra={**extra, "augmented": aug})
    write_split(out_dir, split, metadata, {"all": arrays},
                extra_arrays={"all__difficulty": np.repeat(lengths, per_group)})
    return {"mazes": len(inputs), "examples": n,
            "path_length": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                            "mean": float(lengths.mean()), "max": int(lengths.max())},
            "wall_fraction": float((inputs == WALL).mean())}


def build_maze_dataset(out_dir: str | os.PathLike, *, train_size: int = 1000, test_size: int = 1000,
                       min_path: int = 110, aug: bool = False, seed: int = 0, size: int = 30,
                       loop_prob: float = 0.05) -> dict:
    """Generate and write `<out_dir>/{train,test}` in the reference's format; return the build report.

    Defaults are the paper's Maze-Hard: 30x30, shortest path > 110 steps, 1,000 mazes per split,
    no augmentation (aug=True: the 8 dihedral transforms of each training maze, as the reference's
    --aug). Train and test draw from separate seeded streams, so the test set does not depend on
    train_size. Also writes identifiers.json (as the reference) and build_report.json.
    """
    start = time.perf_counter()
    if not (isinstance(size, int) and 4 <= size <= 64):
        raise MazeDataError(f"size must be an integer in 4..64, got {size!r}")
    if not (isinstance(min_path, int) and 0 <= min_path < size * size // 2):
        raise MazeDataError(f"min_path must be an integer in 0..{size * size // 2 - 1} for size {size}, "
                            f"got {min_path!r}")
    if train_size < 1 or test_size < 1:
        raise MazeDataError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    if not 0.0 <= loop_prob <= 1.0:
        raise MazeDataError(f"loop_prob must be in [0, 1], got {loop_prob!r}")
    out_dir = os.fspath(out_dir)
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    seen: set[bytes] = set()
    # Test first: its mazes then stay the same whatever train_size is.
    test = generate_mazes(test_size, size, min_path, test_rng, loop_prob=loop_prob, seen=seen)
    train = generate_mazes(train_size, size, min_path, train_rng, loop_prob=loop_prob, seen=seen)
    extra = {"task": "maze", "encoding": "0 pad, then '# SGo' as 1..5 (the reference's CHARSET)",
             "difficulty": "all__difficulty.npy: int32 per example, steps of the unique shortest S-G path",
             "generator": "hrm_jax.data.maze (DFS-carved lattice + loops, unique shortest path)",
             "size": size, "min_path": min_path, "loop_prob": loop_prob, "seed": seed}
    report = {"seed": seed, "size": size, "min_path": min_path, "loop_prob": loop_prob, "aug": aug,
              "train": {**_write(out_dir, "train", *train[:3], aug, extra), "repeats_skipped": train[3]},
              "test": {**_write(out_dir, "test", *test[:3], False, extra), "repeats_skipped": test[3]}}
    report["seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out_dir, "identifiers.json"), "w", encoding="utf-8") as f:
        json.dump(["<blank>"], f)
    with open(os.path.join(out_dir, "build_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    log.info("built %s in %.1f s: %d train, %d test mazes", out_dir, report["seconds"], train_size, test_size)
    return report
