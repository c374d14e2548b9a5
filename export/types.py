"""The types every solver backend shares: the result, the interface, the input check, the error.

export/solvers.py (jax, torch), export/onnx.py and export/tensorrt.py import them from here, so that
no backend module imports another's loader.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from hrm_jax.config import HRMConfig


class SolveResult(NamedTuple):
    """What every backend returns."""

    predictions: np.ndarray  # int32[B, seq_len]: argmax tokens of the segment the row stopped at
    steps: np.ndarray  # int32[B]: segments used (1..halt_max_steps)
    q_halt: np.ndarray  # f32[B]: Q-head halt logit of that segment


class Solver(Protocol):
    name: str
    config: HRMConfig

    def solve(self, inputs: np.ndarray, puzzle_identifiers: np.ndarray) -> SolveResult: ...


class BackendUnavailableError(ValueError):
    """A backend whose runtime or input file is missing; the message says how to get it."""


def check_solver_inputs(config: HRMConfig, inputs: Any, puzzle_identifiers: Any) -> tuple[np.ndarray, np.ndarray]:
    """int32 copies of a batch, or a ValueError that names the wrong shape or value range."""
    inputs, ids = np.asarray(inputs), np.asarray(puzzle_identifiers)
    if inputs.ndim != 2 or inputs.shape[1] != config.seq_len:
        raise ValueError(f"inputs must have shape [batch, {config.seq_len}], got {list(inputs.shape)}")
    if ids.shape != inputs.shape[:1]:
        raise ValueError(f"puzzle_identifiers must have shape [{inputs.shape[0]}], got {list(ids.shape)}")
    if inputs.size and (inputs.min() < 0 or inputs.max() >= config.vocab_size):
        raise ValueError(f"input tokens must lie in 0..{config.vocab_size - 1}, got {inputs.min()}..{inputs.max()}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.num_puzzle_identifiers):
        raise ValueError(f"puzzle identifiers must lie in 0..{config.num_puzzle_identifiers - 1}")
    return inputs.astype(np.int32), ids.astype(np.int32)
