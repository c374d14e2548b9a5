"""One interface over every runtime that can solve puzzles with a trained HRM or TRM.

`load_solver(backend, checkpoint, ...)` returns an object with `.name` and
`.solve(inputs int32[B, seq_len], puzzle_identifiers int32[B]) -> SolveResult`. Backends:

* ``jax``: hrm_jax itself (jitted rollout), from an orbax checkpoint;
* ``torch``: export/torch_model.py (TRM: export/trm_torch_model.py) with the checkpoint's weights
  (float32 on CPU, the config's forward dtype on CUDA);
* ``onnx``: ONNX Runtime on a `solve` graph (export/onnx.py), exported on the fly when no file
  is given;
* ``tensorrt``: a TensorRT engine built by `python -m export tensorrt` (export/tensorrt.py).

Every backend uses the same rule: all halt_max_steps segments (the paper's evaluation) or, with
early_halt, the first segment whose Q head prefers halting. Heavy imports happen per backend,
so the jax backend needs neither torch nor onnxruntime.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from export.types import BackendUnavailableError, Solver, SolveResult, check_solver_inputs

# Re-exported: callers import the shared types from here as well as from export/types.py.
__all__ = ["BACKENDS", "BackendUnavailableError", "JaxSolver", "SolveResult", "Solver", "TorchSolver",
           "check_solver_inputs", "export_checkpoint_to_onnx", "load_solver"]

logger = logging.getLogger(__name__)

BACKENDS = ("jax", "torch", "onnx", "tensorrt")


class JaxSolver:
    """hrm_jax's jitted rollout (hrm_jax/evaluate.py, the one evaluation uses) on the default JAX device."""

    name = "jax"

    def __init__(self, checkpoint: str | os.PathLike, *, early_halt: bool = False) -> None:
        # jax is imported only when this backend is chosen: the other backends run without it.
        import jax  # noqa: PLC0415

        from hrm_jax.evaluate import rollout_jit  # noqa: PLC0415
        from hrm_jax.pretrained import load_model  # noqa: PLC0415

        self.params, self.config = load_model(checkpoint)
        if jax.devices()[0].platform == "cpu" and self.config.forward_dtype != "float32":
            # As the torch backend: XLA:CPU emulates bf16/fp16 matmuls slowly; float32 is also closer to exact.
            self.config = self.config.replace(forward_dtype="float32")
        self.early_halt = early_halt
        self._rollout = rollout_jit

    def solve(self, inputs: np.ndarray, puzzle_identifiers: np.ndarray) -> SolveResult:
        inputs, ids = check_solver_inputs(self.config, inputs, puzzle_identifiers)
        batch = {"inputs": inputs, "labels": np.full_like(inputs, -100), "puzzle_identifiers": ids}
        out = {k: np.asarray(v) for k, v in self._rollout(self.params, self.config, batch).items()}
        prefix = "early_" if self.early_halt else ""
        q_halt = out["q_halt_logits"]
        return SolveResult(out[prefix + "predictions"], out[prefix + "steps"].astype(np.int32), q_halt)


class TorchSolver:
    """export/torch_model.py's HRMTorch.solve, eager, with the checkpoint's weights."""

    name = "torch"

    def __init__(self, checkpoint: str | os.PathLike, *, early_halt: bool = False, device: str | None = None,
                 dtype: str | None = None) -> None:
        import torch  # noqa: PLC0415

        from export.convert import to_torch_state_dict  # noqa: PLC0415
        from export.trm_torch_model import torch_module  # noqa: PLC0415
        from hrm_jax.pretrained import load_model  # noqa: PLC0415

        params, self.config = load_model(checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 matmuls are emulated and slow on most CPUs: float32 there unless asked otherwise.
        dtype = dtype or (self.config.forward_dtype if self.device.type == "cuda" else "float32")
        self.model = torch_module(self.config, dtype)
        self.model.load_state_dict(to_torch_state_dict(params, self.config), strict=True)
        self.model.to(self.device)
        self.early_halt = early_halt

    def solve(self, inputs: np.ndarray, puzzle_identifiers: np.ndarray) -> SolveResult:
        import torch  # noqa: PLC0415

        inputs, ids = check_solver_inputs(self.config, inputs, puzzle_identifiers)
        out = self.model.solve(torch.from_numpy(inputs).to(self.device), torch.from_numpy(ids).to(self.device),
                               early_halt=self.early_halt)
        predictions = out.logits.argmax(-1).to(torch.int32)
        return SolveResult(predictions.cpu().numpy(), out.steps.cpu().numpy(), out.q_halt_logits.cpu().numpy())


def export_checkpoint_to_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, graph: str = "solve",
                              dtype: str = "float32") -> Path:
    """A checkpoint or shipped model (hrm_jax.pretrained.load_model) -> ONNX file of `graph` in `dtype`
    (see export/onnx.py)."""
    from export.convert import to_torch_state_dict  # noqa: PLC0415
    from export.onnx import export_onnx  # noqa: PLC0415
    from export.trm_torch_model import torch_module  # noqa: PLC0415
    from hrm_jax.pretrained import load_model  # noqa: PLC0415

    params, config = load_model(checkpoint)
    model = torch_module(config, dtype)
    model.load_state_dict(to_torch_state_dict(params, config), strict=True)
    return export_onnx(model, out, graph)


def load_solver(backend: str, checkpoint: str | os.PathLike | None = None, *,
                onnx_path: str | os.PathLike | None = None, engine_path: str | os.PathLike | None = None,
                early_halt: bool = False) -> Solver:
    """A solver for `backend` (see the module docstring); clear errors for what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "tensorrt":
        if engine_path is None:
            raise BackendUnavailableError("backend tensorrt needs --engine FILE; build one with "
                                          "`python -m export tensorrt --onnx model.onnx --out model.engine --fp16`")
        from export.tensorrt import TensorRTSolver  # noqa: PLC0415

        return TensorRTSolver(engine_path, early_halt=early_halt)
    if backend == "onnx" and onnx_path is not None:
        return _onnx_solver(onnx_path, early_halt)
    if checkpoint is None:
        raise ValueError(f"backend {backend} needs a checkpoint")
    if backend == "jax":
        return JaxSolver(checkpoint, early_halt=early_halt)
    _require("torch", "pip install 'hrm-jax[torch]' torch")
    if backend == "torch":
        return TorchSolver(checkpoint, early_halt=early_halt)
    _require("onnxruntime", "pip install 'hrm-jax[export]'")
    path = Path(tempfile.mkdtemp(prefix="hrm-onnx-")) / "model.onnx"
    logger.info("exporting %s to %s (pass --onnx FILE to reuse an export)", checkpoint, path)
    return _onnx_solver(export_checkpoint_to_onnx(checkpoint, path), early_halt)


def _onnx_solver(path: str | os.PathLike, early_halt: bool) -> Solver:
    _require("onnxruntime", "pip install 'hrm-jax[export]'")
    from export.onnx import OnnxSolver  # noqa: PLC0415

    return OnnxSolver(path, early_halt=early_halt)


def _require(module: str, install: str) -> None:
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec(module) is None:
        raise BackendUnavailableError(f"this backend needs the Python package {module!r}, which is not installed: "
                                      f"{install}")
