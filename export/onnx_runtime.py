"""The runtime half of the ONNX export: read a graph's metadata and run it with ONNX Runtime.

Needs numpy, onnx and onnxruntime only (no torch, no jax), so an edge device can run an exported model with
nothing else installed: `OnnxSolver` for the `solve` graph, `OnnxSegment` for the `segment` graph (one ACT
segment with an explicit carry; the SAGE server drives it). The graphs and their exporter: export/onnx.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from export.types import SolveResult, check_solver_inputs
from hrm_jax.config import HRMConfig
from hrm_jax.trm_config import TRMConfig

META_CONFIG, META_GRAPH, META_DTYPE = "hrm_config", "hrm_graph", "hrm_dtype"
META_FAMILY = "hrm_family"  # "hrm" or "trm" (absent in files exported before TRM: "hrm")
# Family name -> config class, as hrm_jax.family names them (that module imports the models, hence jax).
CONFIG_CLASSES = {"hrm": HRMConfig, "trm": TRMConfig}


class OnnxExportError(ValueError):
    """An export request that cannot work (bad dtype, path, graph name), a failed export or a foreign file."""


def read_metadata(path: str | os.PathLike) -> tuple[HRMConfig, str, str]:
    """(config, graph, dtype) stored in an exported file; a clear error for foreign ONNX files."""
    import onnx  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; export one with `python -m export onnx`")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:
        raise OnnxExportError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_CONFIG not in props:
        raise OnnxExportError(f"{path}: no hrm_config metadata; it was not written by `python -m export onnx`")
    try:
        config_class = CONFIG_CLASSES[props.get(META_FAMILY, "hrm")]
        config = config_class(**json.loads(props[META_CONFIG]))
    except (TypeError, ValueError, KeyError) as err:
        raise OnnxExportError(f"{path}: its hrm_config metadata does not fit this version of hrm_jax ({err}); "
                              "re-export it with this version") from None
    return config, props.get(META_GRAPH, "solve"), props.get(META_DTYPE, "float32")


def _session(path: str | os.PathLike, providers: list[str] | None, threads: int | None):
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (InvalidArgument, Fail, ...) for a bad graph
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise OnnxExportError(f"{path}: ONNX Runtime cannot load this graph ({type(err).__name__}: {first[:300]}); "
                              "the file is damaged or was not written by `python -m export onnx`: export it "
                              "again") from None


class OnnxSolver:
    """Runs a `solve` graph with ONNX Runtime: `.solve(inputs int32[B, S], ids int32[B])`."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, *, early_halt: bool = False, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        self.config, graph, self.dtype = read_metadata(path)
        if graph != "solve":
            raise OnnxExportError(f"{path}: holds the {graph!r} graph; the solver needs the 'solve' graph "
                                  "(export with --graph solve or both)")
        if self.dtype == "bfloat16" and not providers:
            raise OnnxExportError(f"{path}: a bfloat16 graph, which onnxruntime's CPU provider cannot run (no "
                                  "bf16 kernels); export --dtype float32 or float16 for CPUs, keep bf16 for GPUs")
        self.early_halt = bool(early_halt)
        self.session = _session(path, providers, threads)

    def solve(self, inputs: np.ndarray, puzzle_identifiers: np.ndarray) -> SolveResult:
        inputs, ids = check_solver_inputs(self.config, inputs, puzzle_identifiers)
        predictions, steps, q_halt, _ = self.session.run(
            None, {"inputs": inputs, "puzzle_identifiers": ids,
                                            "early_halt": np.asarray([self.early_halt])})
        return SolveResult(predictions, steps, q_halt)


class OnnxSegment:
    """Runs a `segment` graph: `.initial_carry(batch)` and `.step(carry, inputs, ids)`."""

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None, threads: int | None = None):
        self.config, graph, dtype = read_metadata(path)
        if graph != "segment":
            raise OnnxExportError(f"{path}: holds the {graph!r} graph, not 'segment'")
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        if dtype == "bfloat16":
            raise OnnxExportError(f"{path}: bfloat16 carries cannot be fed from NumPy; export float32 or float16")
        self.session = _session(path, providers, threads)

    def initial_carry(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.config.total_seq_len, self.config.hidden_size), self.np_dtype)
        return {"z_H": z, "z_L": z, "steps": np.zeros(batch, np.int32), "halted": np.ones(batch, bool)}

    def step(self, carry: dict[str, np.ndarray], inputs: np.ndarray, puzzle_identifiers: np.ndarray
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        inputs, ids = check_solver_inputs(self.config, inputs, puzzle_identifiers)
        z_H, z_L, steps, halted, logits, q_halt, q_continue = self.session.run(
            None, {**carry, "inputs": inputs, "puzzle_identifiers": ids})
        return ({"z_H": z_H, "z_L": z_L, "steps": steps, "halted": halted},
                {"logits": logits, "q_halt": q_halt, "q_continue": q_continue})


class OnnxLoopSolver:
    """The `segment` graph driven by a host loop: `.solve(inputs, ids)` like OnnxSolver, but with early_halt
    a row leaves the batch at the first segment whose Q head says halt, so each puzzle costs only its own
    segments (the `solve` graph computes every segment and selects). Same answers and steps as the solve graph.
    """

    name = "onnx-loop"

    def __init__(self, path: str | os.PathLike, *, early_halt: bool = False, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        self.segment = OnnxSegment(path, providers=providers, threads=threads)
        self.config = self.segment.config
        self.early_halt = bool(early_halt)

    def solve(self, inputs: np.ndarray, puzzle_identifiers: np.ndarray) -> SolveResult:
        inputs, ids = check_solver_inputs(self.config, inputs, puzzle_identifiers)
        n, last = len(inputs), self.config.halt_max_steps
        predictions, steps = np.zeros(inputs.shape, np.int32), np.zeros(n, np.int32)
        q_halt = np.zeros(n, np.float32)
        active, carry = np.arange(n), self.segment.initial_carry(n)
        for step in range(1, last + 1):
            carry, out = self.segment.step(carry, inputs[active], ids[active])
            done = np.full(len(active), step == last)
            if self.early_halt:
                done |= self.config.halts(out["q_halt"], out["q_continue"])  # the family's rule
            rows = active[done]
            predictions[rows] = out["logits"][done].argmax(-1)
            steps[rows], q_halt[rows] = step, out["q_halt"][done]
            active, carry = active[~done], {k: v[~done] for k, v in carry.items()}
            if not len(active):
                break
        return SolveResult(predictions, steps, q_halt)
