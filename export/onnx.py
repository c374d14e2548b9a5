"""ONNX export of HRM (from the torch module, `torch.onnx.export` with the dynamo exporter) and
an ONNX Runtime solver.

Two graphs, both with a dynamic batch dimension and opset 18:

* **segment**: one ACT segment in eval mode, the carry as explicit tensors
  `(z_H, z_L, steps, halted, inputs, puzzle_identifiers) -> (z_H, z_L, steps, halted, logits,
  q_halt, q_continue)`. Rows with `halted` set restart from H_init/L_init (feed `halted = True`
  for a fresh carry); a host loop drives it (custom halting, streaming).
* **solve**: the paper's inference in one graph, `halt_max_steps` segments unrolled,
  `(inputs, puzzle_identifiers, early_halt) -> (predictions, steps, q_halt, q_continue)`.
  `early_halt` (bool[1]) selects the Q-head rule: keep the first segment whose
  q_halt > q_continue; False runs every segment as the reference's evaluation does.

Why torch and not jax2onnx: the torch module is already the reference's function with the
reference's weights layout (tested against hrm_jax to ~1e-6), torch's exporter is maintained by
the ONNX Runtime team, and TensorRT's ONNX parser is routinely tested against its output. Each
graph carries the model config as JSON metadata, so runners need no other file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

# The runtime half (metadata, ONNX Runtime solvers) lives in export/onnx_runtime.py, which needs neither torch
# nor jax; its names are re-exported here for callers of this module.
from export.onnx_runtime import (
    META_CONFIG,
    META_DTYPE,
    META_FAMILY,
    META_GRAPH,
    OnnxExportError,
    OnnxSegment,
    OnnxSolver,
    read_metadata,
)
from export.torch_model import HRMTorch
from hrm_jax.config import HRMConfig
from hrm_jax.family import family_of

__all__ = ["META_CONFIG", "META_DTYPE", "META_FAMILY", "META_GRAPH", "OnnxExportError", "OnnxSegment", "OnnxSolver",
           "SegmentGraph", "SolveGraph", "example_inputs", "export_onnx", "read_metadata"]

logger = logging.getLogger(__name__)

OPSET = 18
SEGMENT_INPUTS = ("z_H", "z_L", "steps", "halted", "inputs", "puzzle_identifiers")
SEGMENT_OUTPUTS = ("z_H_out", "z_L_out", "steps_out", "halted_out", "logits", "q_halt", "q_continue")
SOLVE_INPUTS = ("inputs", "puzzle_identifiers", "early_halt")
SOLVE_OUTPUTS = ("predictions", "steps", "q_halt", "q_continue")
MAX_BATCH = 65536



class SegmentGraph(nn.Module):
    """HRMTorch.forward with the batch fed every segment, without the pass-through carry data."""

    def __init__(self, model: HRMTorch) -> None:
        super().__init__()
        self.model = model

    def forward(self, z_H, z_L, steps, halted, inputs, puzzle_identifiers):
        z_H, z_L, steps, halted, _, _, logits, q_halt, q_continue = self.model(
            z_H, z_L, steps, halted, inputs, puzzle_identifiers)
        return z_H, z_L, steps, halted, logits, q_halt, q_continue


class SolveGraph(nn.Module):
    """HRMTorch.solve with the halting rule as an input and argmax predictions as the output."""

    def __init__(self, model: HRMTorch) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs, puzzle_identifiers, early_halt):
        out = self.model.model.solve(inputs, puzzle_identifiers, early_halt=early_halt)
        predictions = out.logits.argmax(-1).to(torch.int32)
        return predictions, out.steps, out.q_halt_logits, out.q_continue_logits


def example_inputs(config: HRMConfig, graph: str, batch: int = 2, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Valid random inputs for `graph` ("segment" or "solve"), in the graphs' input order."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=gen, dtype=torch.int32)
    ids = torch.randint(0, config.num_puzzle_identifiers, (batch,), generator=gen, dtype=torch.int32)
    if graph == "solve":
        return inputs, ids, torch.tensor([False])
    z = torch.zeros(batch, config.total_seq_len, config.hidden_size, dtype=dtype)
    return z, z.clone(), torch.zeros(batch, dtype=torch.int32), torch.ones(batch, dtype=torch.bool), inputs, ids


def export_onnx(model: HRMTorch, path: str | os.PathLike, graph: str = "solve") -> Path:
    """Writes `graph` of `model` (in its compute dtype) to `path`; returns the path."""
    if graph not in ("segment", "solve"):
        raise OnnxExportError(f"graph must be 'segment' or 'solve', got {graph!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = (SolveGraph if graph == "solve" else SegmentGraph)(model).eval()
    args = example_inputs(model.config, graph, dtype=model.dtype)
    names_in, names_out = (SOLVE_INPUTS, SOLVE_OUTPUTS) if graph == "solve" else (SEGMENT_INPUTS, SEGMENT_OUTPUTS)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple({} if name == "early_halt" else {0: batch} for name in names_in)
    logger.info("exporting the %s graph (%s) to %s", graph, model.dtype, path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and dynamic-dim notes
        try:
            # The solve graph unrolls halt_max_steps segments; onnxscript's optimizer is superlinear
            # in graph size there (38 s for one Sudoku segment, 86 s for two) and ONNX Runtime and
            # TensorRT optimise at load time anyway, so only the one-segment graph is optimised here.
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=OPSET, input_names=list(names_in),
                                        output_names=list(names_out), dynamic_shapes=dynamic, verbose=False,
                                        optimize=graph == "segment")
        except Exception as err:  # the exporter raises many types; keep the cause visible
            raise OnnxExportError(f"torch.onnx.export failed for the {graph} graph: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from err
    program.model.metadata_props.update({META_CONFIG: json.dumps(model.config.to_dict()), META_GRAPH: graph,
                                         META_FAMILY: family_of(model.config).name,
                                         META_DTYPE: str(model.dtype).removeprefix("torch.")})
    program.save(os.fspath(path))
    return path
