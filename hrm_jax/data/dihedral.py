"""The 8 dihedral transforms of a square grid, numbered as the reference's dataset/common.py.

Maze-Hard and ARC augment with them; ids 0-3 rotate by 0/90/180/270 degrees, 4 flips left-right,
5 up-down, 6 transposes, 7 reflects on the anti-diagonal.
"""

from __future__ import annotations

import numpy as np

NUM_DIHEDRAL = 8
# Inverse ids: rotations by 90 and 270 degrees undo each other; the rest are involutions.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


class DihedralError(ValueError):
    """A transform id outside 0..7."""


def dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    """Transform `tid` of the last two axes of `grid` (a view where numpy allows)."""
    if tid == 0:
        return grid
    if tid in (1, 2, 3):
        return np.rot90(grid, tid, axes=(-2, -1))
    if tid == 4:
        return np.flip(grid, -1)
    if tid == 5:
        return np.flip(grid, -2)
    if tid == 6:
        return np.swapaxes(grid, -2, -1)
    if tid == 7:
        return np.flip(np.rot90(grid, 1, axes=(-2, -1)), -1)
    raise DihedralError(f"dihedral transform id must be in 0..7, got {tid!r}")
