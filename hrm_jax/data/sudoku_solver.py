"""Sudoku grid primitives: parsing and validation, an exact solver (counts solutions up to a limit,
rates difficulty), the symmetry transforms used for augmentation, and collection files.

Grids are NumPy int8 arrays of 81 cells in row-major order, 0 for a blank and 1..9 for a digit.
The solver keeps one 9-bit candidate mask per cell, propagates naked and hidden singles to a fixed
point, and branches on a cell with the fewest candidates (minimum remaining values). Counting
stops at `limit` solutions, so `limit=2` answers "exactly one solution?" without enumerating.

Difficulty follows the idea of the Sudoku-Extreme "rating" column (the reference reads it from the
hub CSV in dataset/build_sudoku_dataset.py; there it is tdoku's backtrack count): the number of
dead ends this solver meets before it reaches the first solution. Our propagation (singles only)
differs from tdoku's, so the numbers are comparable in order, not equal in value.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ALL_DIGITS = 0x1FF  # candidate mask with the 9 digits set; bit d-1 stands for digit d
BLANK_CHARS = ".0"

_ROWS = tuple(tuple(r * 9 + c for c in range(9)) for r in range(9))
_COLS = tuple(tuple(r * 9 + c for r in range(9)) for c in range(9))
_BOXES = tuple(tuple((b // 3 * 3 + i // 3) * 9 + b % 3 * 3 + i % 3 for i in range(9))
               for b in range(9))
UNITS = _ROWS + _COLS + _BOXES
PEERS = tuple(tuple(sorted({p for unit in UNITS if c in unit for p in unit} - {c}))
              for c in range(81))
_POPCOUNT = tuple(bin(m).count("1") for m in range(512))
_BIT_TO_DIGIT = {1 << d: d + 1 for d in range(9)}



class SudokuFormatError(ValueError):
    """A puzzle string or grid is malformed or its givens contradict each other."""


# ----------------------------------------------------------------------------- parsing/validation
def parse_puzzle(text: str) -> np.ndarray:
    """Parse 81 characters (row by row; '1'-'9' givens, '.' or '0' blanks) into int8[81].

    Surrounding whitespace is ignored. Raises SudokuFormatError naming the first problem: the
    length, a bad character and its position, or two equal givens in a row, column or box.
    """
    s = text.strip()
    if len(s) != 81:
        raise SudokuFormatError(
            f"a Sudoku has 81 cells, got {len(s)} characters; write the grid row by row with "
            "'1'-'9' for givens and '.' or '0' for blanks")
    for i, ch in enumerate(s):
        if ch not in "123456789" and ch not in BLANK_CHARS:
            raise SudokuFormatError(
                f"bad character {ch!r} at position {i} (row {i // 9 + 1}, column {i % 9 + 1}); "
                "use '1'-'9' for givens and '.' or '0' for blanks")
    grid = np.array([0 if ch in BLANK_CHARS else int(ch) for ch in s], dtype=np.int8)
    problem = find_conflict(grid)
    if problem is not None:
        raise SudokuFormatError(f"the givens contradict each other: {problem}")
    return grid


def format_puzzle(grid: np.ndarray) -> str:
    """int8[81] (0 blank) -> 81-character string with '.' for blanks."""
    return "".join("." if v == 0 else str(int(v)) for v in np.asarray(grid).reshape(81))


def find_conflict(grid: np.ndarray) -> str | None:
    """Describe the first duplicate given in a row, column or box of int8[81], or None."""
    grid = np.asarray(grid).reshape(81)
    for kind, units in (("row", _ROWS), ("column", _COLS), ("box", _BOXES)):
        for index, unit in enumerate(units):
            seen: dict[int, int] = {}
            for cell in unit:
                digit = int(grid[cell])
                if digit == 0:
                    continue
                if digit in seen:
                    return (f"digit {digit} appears twice in {kind} {index + 1} (cells "
                            f"r{seen[digit] // 9 + 1}c{seen[digit] % 9 + 1} and "
                            f"r{cell // 9 + 1}c{cell % 9 + 1})")
                seen[digit] = cell
    return None


def has_conflicts(grids: np.ndarray) -> np.ndarray:
    """Vectorised `find_conflict`: grids int[N, 81] (0 blank) -> bool[N], True where a row,
    column or box holds a digit twice."""
    g = np.asarray(grids).reshape(-1, 9, 9)
    onehot = (g[..., None] == np.arange(1, 10)).astype(np.int8)  # [N, 9, 9, 9 digits]
    boxes = onehot.reshape(-1, 3, 3, 3, 3, 9).sum(axis=(2, 4))  # [N, band, stack, digit]
    return ((onehot.sum(axis=2) > 1).any(axis=(1, 2))      # row r holds digit d twice
            | (onehot.sum(axis=1) > 1).any(axis=(1, 2))    # column
            | (boxes > 1).any(axis=(1, 2, 3)))


def is_valid_solution(puzzle: np.ndarray, solution: np.ndarray) -> bool:
    """True when solution int[81] is a complete grid obeying all constraints and keeps the givens."""
    p, s = np.asarray(puzzle).reshape(81), np.asarray(solution).reshape(81)
    complete = bool(np.all((s >= 1) & (s <= 9)))
    return complete and not has_conflicts(s[None])[0] and bool(np.all((p == 0) | (p == s)))


# ----------------------------------------------------------------------------- solver
@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Outcome of `solve`.

    num_solutions: 0, 1, ... up to the limit (a value equal to the limit means "at least").
    solution: int8[81] first solution found, or None.
    guesses: branch points (cells tried with 2+ candidates) before the first solution, or in
      the whole search when there is none.
    backtracks: dead ends met before the first solution (the difficulty rating), or in the
      whole search when there is none.
    """

    num_solutions: int
    solution: np.ndarray | None
    guesses: int
    backtracks: int


class _Search:
    """Depth-first search state: counters, found solutions and the solution limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.solutions: list[list[int]] = []
        self.guesses = 0
        self.backtracks = 0
        self.rating: tuple[int, int] | None = None  # (guesses, backtracks) at the first solution

    def run(self, cand: list[int], queue: list[int]) -> None:
        if not _propagate(cand, queue):
            self.backtracks += 1
            return
        cell, fewest = -1, 10
        for c in range(81):
            n = _POPCOUNT[cand[c]]
            if 1 < n < fewest:
                cell, fewest = c, n
                if n == 2:
                    break
        if cell < 0:  # every cell has one candidate: a solution
            self.solutions.append(cand)
            if self.rating is None:
                self.rating = (self.guesses, self.backtracks)
            return
        self.guesses += 1
        options = cand[cell]
        while options and len(self.solutions) < self.limit:
            bit = options & -options
            options ^= bit
            child = cand[:]
            child[cell] = bit
            self.run(child, [cell])


def _propagate(cand: list[int], queue: list[int]) -> bool:
    """Remove decided digits from peers and place hidden singles until nothing changes.

    cand: 81 candidate masks, edited in place; queue: cells whose single digit still has to be
    removed from their peers. Returns False on a contradiction.
    """
    peers, units = PEERS, UNITS  # locals: this loop is the solver's hot path
    while True:
        while queue:
            c = queue.pop()
            m = cand[c]
            for p in peers[c]:
                pm = cand[p]
                if pm & m:
                    pm ^= m
                    if not pm:
                        return False
                    cand[p] = pm
                    if not pm & (pm - 1):
                        queue.append(p)
        for unit in units:  # hidden singles: a digit with one place left in a unit
            once = twice = 0
            for c in unit:
                m = cand[c]
                twice |= once & m
                once |= m
            if once != ALL_DIGITS:
                return False  # some digit has no place left in this unit
            only = once & ~twice
            if only:
                for c in unit:
                    m = cand[c] & only
                    if m and cand[c] != m:
                        if m & (m - 1):
                            return False  # two digits can only go in this one cell
                        cand[c] = m
                        queue.append(c)
        if not queue:
            return True


def solve(puzzle: np.ndarray, limit: int = 2) -> SolveResult:
    """Count the solutions of int[81] (0 blank) up to `limit` and return the first.

    The givens must not contradict each other (`parse_puzzle` / `has_conflicts` check that).
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    grid = np.asarray(puzzle).reshape(81)
    cand = [ALL_DIGITS if v == 0 else 1 << (int(v) - 1) for v in grid]
    search = _Search(limit)
    search.run(cand, [c for c in range(81) if grid[c]])
    guesses, backtracks = search.rating or (search.guesses, search.backtracks)
    solution = None
    if search.solutions:
        solution = np.array([_BIT_TO_DIGIT[m] for m in search.solutions[0]], dtype=np.int8)
    return SolveResult(len(search.solutions), solution, guesses, backtracks)


def _solve_chunk(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    results = [solve(g) for g in grids]
    counts = np.array([r.num_solutions for r in results], dtype=np.int8)
    solutions = np.zeros((len(results), 81), dtype=np.int8)
    for i, r in enumerate(results):
        if r.solution is not None:
            solutions[i] = r.solution
    guesses = np.array([r.guesses for r in results], dtype=np.int32)
    backtracks = np.array([r.backtracks for r in results], dtype=np.int32)
    return counts, solutions, guesses, backtracks


def solve_many(grids: np.ndarray, workers: int = 1, chunk: int = 64
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`solve(limit=2)` for int[N, 81] grids, in `workers` processes when > 1.

    Returns (num_solutions int8[N] in {0, 1, 2}, solutions int8[N, 81] (zeros where none),
    guesses int32[N], backtracks int32[N]).
    """
    grids = np.asarray(grids, dtype=np.int8).reshape(-1, 81)
    pieces = [grids[i:i + chunk] for i in range(0, len(grids), chunk)] or [grids]
    if workers > 1 and len(pieces) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_solve_chunk, pieces))
    else:
        parts = [_solve_chunk(p) for p in pieces]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the symmetry group
def _band_structured_perms() -> np.ndarray:
    """All 6^4 = 1296 orders of 9 lines that keep bands together: int8[1296, 9], identity first."""
    perms3 = list(itertools.permutations(range(3)))
    return np.array([[bands[k] * 3 + inner[k][i] for k in range(3) for i in range(3)]
                     for bands in perms3 for inner in itertools.product(perms3, repeat=3)],
                    dtype=np.int8)


LINE_PERMS = _band_structured_perms()


def _invert_perm(perm: np.ndarray) -> np.ndarray:
    """Inverse of permutations along the last axis."""
    return np.argsort(perm, axis=-1).astype(perm.dtype)


def _check_line_perm(perm: np.ndarray, name: str) -> None:
    ok = (np.array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(9), perm.shape))
          and bool(np.all(perm.reshape(perm.shape[:-1] + (3, 3)) // 3
                          == (perm[..., ::3] // 3)[..., None])))
    if not ok:
        raise ValueError(f"{name} must permute 0..8 keeping bands (0-2, 3-5, 6-8) together, "
                         f"got {perm.tolist()}")


@dataclasses.dataclass(frozen=True, eq=False)
class SudokuTransform:
    """A batch of elements of the Sudoku symmetry group (the reference's `shuffle_sudoku`).

    Applied to a grid x [9, 9] (0 blank, 1..9 digits):
      x' = x.T if transpose else x;  y[i, j] = digit_map[x'[row_perm[i], col_perm[j]]].

    digit_map: int8[..., 10], entry 0 is 0 (blanks stay blank), entries 1..9 permute 1..9.
    transpose: bool[...].
    row_perm, col_perm: int8[..., 9], band- (stack-) structured permutations.
    The leading shape `...` (the batch shape) is shared by all four fields; () for one transform.
    """

    digit_map: np.ndarray
    transpose: np.ndarray
    row_perm: np.ndarray
    col_perm: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in (("digit_map", np.int8), ("transpose", bool), ("row_perm", np.int8),
                            ("col_perm", np.int8)):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        shape = self.transpose.shape
        for name, size in (("digit_map", 10), ("row_perm", 9), ("col_perm", 9)):
            if getattr(self, name).shape != shape + (size,):
                raise ValueError(f"{name} must have shape {shape + (size,)} (batch shape of "
                                 f"transpose + ({size},)), got {getattr(self, name).shape}")
        digits = self.digit_map
        if not (np.all(digits[..., 0] == 0) and np.array_equal(
                np.sort(digits[..., 1:], axis=-1), np.broadcast_to(np.arange(1, 10), shape + (9,)))):
            raise ValueError(f"digit_map must map 0 to 0 and permute 1..9, got {digits.tolist()}")
        _check_line_perm(self.row_perm, "row_perm")
        _check_line_perm(self.col_perm, "col_perm")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.transpose.shape

    @classmethod
    def identity(cls, shape: tuple[int, ...] = ()) -> SudokuTransform:
        lines = np.broadcast_to(np.arange(9), shape + (9,))
        return cls(np.broadcast_to(np.arange(10), shape + (10,)), np.zeros(shape, bool), lines, lines)

    @classmethod
    def random(cls, rng: np.random.Generator, shape: tuple[int, ...] = ()) -> SudokuTransform:
        """Uniform over the group, as the reference draws it (each factor uniform)."""
        digits = rng.permuted(np.broadcast_to(np.arange(1, 10), shape + (9,)), axis=-1)
        digit_map = np.concatenate([np.zeros(shape + (1,), np.int64), digits], axis=-1)

        def lines() -> np.ndarray:
            outer = np.argsort(rng.random(shape + (3,)), axis=-1)
            inner = np.argsort(rng.random(shape + (3, 3)), axis=-1)
            return (outer[..., :, None] * 3 + inner).reshape(shape + (9,))

        transpose = rng.random(shape) < 0.5
        return cls(digit_map, transpose, lines(), lines())

    def __getitem__(self, index) -> SudokuTransform:
        return SudokuTransform(self.digit_map[index], self.transpose[index], self.row_perm[index],
                               self.col_perm[index])

    def source_cells(self) -> np.ndarray:
        """int[..., 81]: the input cell (row-major) that each output cell reads."""
        r = self.row_perm[..., :, None].astype(np.int64)
        c = self.col_perm[..., None, :].astype(np.int64)
        flat = np.where(self.transpose[..., None, None], c * 9 + r, r * 9 + c)
        return flat.reshape(self.shape + (81,))

    def apply(self, grids: np.ndarray) -> np.ndarray:
        """grids int[..., 81] (0 blank), broadcast against the batch shape -> int8[..., 81]."""
        grids = np.asarray(grids)
        if grids.shape[-1:] != (81,):
            raise ValueError(f"grids must have shape [..., 81], got {grids.shape}")
        cells = self.source_cells()
        shape = np.broadcast_shapes(grids.shape[:-1], self.shape)
        moved = np.take_along_axis(np.broadcast_to(grids, shape + (81,)),
                                   np.broadcast_to(cells, shape + (81,)), axis=-1)
        digit_map = np.broadcast_to(self.digit_map, shape + (10,))
        return np.take_along_axis(digit_map, moved.astype(np.int64), axis=-1).astype(np.int8)

    def inverse(self) -> SudokuTransform:
        """The transform g^-1 with g^-1.apply(g.apply(x)) == x (derivation in the comment)."""
        # y[i,j] = d[x'[r_i, c_j]]. Untransposed: x[a,b] = d^-1[y[r^-1_a, c^-1_b]].
        # Transposed: x[a,b] = x'[b,a] = d^-1[y[r^-1_b, c^-1_a]] = d^-1[y.T[c^-1_a, r^-1_b]],
        # i.e. again a transpose followed by rows c^-1 and columns r^-1.
        rinv, cinv = _invert_perm(self.row_perm), _invert_perm(self.col_perm)
        t = self.transpose[..., None]
        return SudokuTransform(_invert_perm(self.digit_map), self.transpose,
                               np.where(t, cinv, rinv), np.where(t, rinv, cinv))

    def equals(self, other: SudokuTransform) -> bool:
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self))


# ----------------------------------------------------------------------------- collection files
@dataclasses.dataclass(frozen=True)
class Collection:
    """The well-formed puzzles of one collection file.

    grids: int8[N, 81] (0 blank) that passed the format and contradiction checks.
    line_numbers: int32[N] 1-based line of each grid in the file.
    rejected: {reason: count} for the other puzzle lines ("wrong_length", "bad_character",
      "contradictory_givens"); comment lines ('#') and empty lines are not puzzles.
    """

    name: str
    path: str
    grids: np.ndarray
    line_numbers: np.ndarray
    rejected: dict[str, int]

    @property
    def num_lines(self) -> int:
        """Puzzle lines read (accepted + rejected)."""
        return len(self.grids) + sum(self.rejected.values())


_ALLOWED = frozenset("123456789" + BLANK_CHARS)


def read_collection(path: str, name: str | None = None) -> Collection:
    """Read a collection file: '#' comments, then one 81-character puzzle per line ('.' or '0'
    blanks). Malformed lines are counted by reason in `Collection.rejected`, not raised."""
    rejected = {"wrong_length": 0, "bad_character": 0, "contradictory_givens": 0}
    texts, numbers = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise SudokuFormatError(f"{path}: not a text file of puzzles ({err.reason} at byte {err.start}); "
                                "pass a UTF-8 file with one 81-character puzzle per line") from None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) != 81:
            rejected["wrong_length"] += 1
        elif not set(line) <= _ALLOWED:
            rejected["bad_character"] += 1
        else:
            texts.append(line)
            numbers.append(number)
    raw_bytes = "".join(texts).replace(".", "0").encode("ascii")
    grids = (np.frombuffer(raw_bytes, dtype=np.uint8).reshape(-1, 81) - ord("0")).astype(np.int8)
    numbers_arr = np.array(numbers, dtype=np.int32)
    keep = ~has_conflicts(grids) if len(grids) else np.zeros(0, bool)
    rejected["contradictory_givens"] = int((~keep).sum())
    stem = name or os.path.splitext(os.path.basename(path))[0]
    return Collection(stem, str(path), grids[keep], numbers_arr[keep], rejected)
