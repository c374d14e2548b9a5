"""Small data samples shipped inside the package (wheel installs included), found with
importlib.resources: the Sudoku sample and a few ARC tasks with their licences (see the files'
headers and arc/README.md). Full collections are located by the dataset modules."""

from __future__ import annotations

import pathlib
from importlib import resources


def sample_path(name: str) -> pathlib.Path:
    """The installed path of a bundled sample, e.g. "sudoku_sample.txt" or "arc"."""
    path = pathlib.Path(str(resources.files(__name__).joinpath(name)))
    if not path.exists():
        raise FileNotFoundError(f"{path}: bundled sample missing; reinstall hrm-jax (pip install .)")
    return path
