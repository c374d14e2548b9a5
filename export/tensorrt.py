"""TensorRT engines from the exported `solve` graph, and a runner with the ONNX solver's interface.

`build_engine` parses an ONNX file of export/onnx.py with TensorRT's ONNX parser and builds an
engine for a range of batch sizes (one optimisation profile), in fp32, fp16 (TensorRT may pick
fp16 kernels; the exported graph keeps RMSNorm and RoPE math in float32 casts) or int8 with
entropy calibration (int8 GEMMs, fp16 elsewhere) on puzzles of a built dataset. The engine file
gets a JSON sidecar `<engine>.json` with the model config, so `TensorRTSolver` needs nothing else.

The runner keeps device buffers in torch CUDA tensors (torch is on every Jetson image, pycuda is
not) and calls `execute_async_v3`. TensorRT is imported lazily: without it, every entry point
raises `TensorRTUnavailableError` saying how to install it. How this was verified is in
BUILD_NOTES.md ("Export").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export.types import BackendUnavailableError, SolveResult, check_solver_inputs
from hrm_jax.config import HRMConfig

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_SUFFIX = ".json"


class TensorRTUnavailableError(BackendUnavailableError):
    """TensorRT (or a CUDA GPU) is not available on this machine."""


class TensorRTBuildError(ValueError):
    """The ONNX file could not be parsed or the engine could not be built; lists TensorRT's errors."""


def import_tensorrt():
    """The tensorrt module, or a TensorRTUnavailableError with the install command."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise TensorRTUnavailableError(
            "TensorRT is not installed: `pip install tensorrt` on an x86 machine with an NVIDIA GPU "
            "(CUDA 12), or use the python3-libnvinfer package of JetPack on a Jetson; without a GPU, "
            "use --backend onnx") from None
    return trt


def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(os.fspath(engine_path) + SIDECAR_SUFFIX)


def calibration_batches(inputs: np.ndarray, puzzle_identifiers: np.ndarray, batch_size: int,
                        max_batches: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Random full batches (without replacement) of a split for int8 calibration."""
    if batch_size < 1 or max_batches < 1:
        raise ValueError("calibration batch size and batch count must be >= 1")
    count = min(max_batches, len(inputs) // batch_size)
    if count == 0:
        raise ValueError(f"int8 calibration needs at least {batch_size} puzzles, the split has {len(inputs)}")
    order = np.random.default_rng(seed).permutation(len(inputs))[: count * batch_size]
    for rows in order.reshape(count, batch_size):
        yield {"inputs": inputs[rows].astype(np.int32), "puzzle_identifiers": puzzle_identifiers[rows].astype(np.int32),
               "early_halt": np.zeros(1, bool)}


def _make_calibrator(trt, batches: list[dict[str, np.ndarray]], cache_path: Path | None):
    """An IInt8EntropyCalibrator2 that feeds `batches` through torch CUDA tensors."""
    import torch  # noqa: PLC0415

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.index, self.device_buffers = batches, 0, {}

        def get_batch_size(self) -> int:
            return len(batches[0]["inputs"])

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index == len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            self.device_buffers = {name: torch.from_numpy(batch[name]).cuda() for name in names}
            return [self.device_buffers[name].data_ptr() for name in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path is not None and cache_path.exists() else None

        def write_calibration_cache(self, cache) -> None:
            if cache_path is not None:
                cache_path.write_bytes(bytes(cache))

    return Calibrator()


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp16",
                 min_batch: int = 1, opt_batch: int = 1, max_batch: int = 64, workspace_gib: float = 4.0,
                 calibration: list[dict[str, np.ndarray]] | None = None) -> Path:
    """Builds and writes an engine for the `solve` graph in `onnx_path`; returns the engine path."""
    from export.onnx import SOLVE_INPUTS, read_metadata  # noqa: PLC0415

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if precision == "int8" and not calibration:
        raise ValueError("int8 needs calibration batches: pass --calib-data DIR (a built dataset)")
    config, graph, dtype = read_metadata(onnx_path)
    if graph != "solve":
        raise TensorRTBuildError(f"{onnx_path}: holds the {graph!r} graph; build engines from the 'solve' graph")
    trt = import_tensorrt()
    trt_logger = _trt_logger(trt)
    builder = trt.Builder(trt_logger)
    # TensorRT 8 needs the explicit-batch flag; TensorRT 10 has only explicit batch and deprecates it.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None or int(trt.__version__.split(".")[0]) >= 10 else 1 << int(flag))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name in SOLVE_INPUTS:
        if name == "early_halt":
            profile.set_shape(name, (1,), (1,), (1,))
        else:
            tail = (config.seq_len,) if name == "inputs" else ()
            profile.set_shape(name, (min_batch, *tail), (opt_batch, *tail), (max_batch, *tail))
    build_config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        build_config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        build_config.set_flag(trt.BuilderFlag.INT8)
        cache = sidecar_path(engine_path).with_suffix(".calib")
        build_config.int8_calibrator = _make_calibrator(trt, calibration, cache)
        build_config.set_calibration_profile(profile)
    logger.info("building a %s TensorRT engine from %s (%s graph, batch %d..%d)", precision, onnx_path, dtype,
                min_batch, max_batch)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    sidecar_path(engine_path).write_text(json.dumps({
        "model_config": config.to_dict(), "precision": precision, "onnx": os.fspath(onnx_path),
        "batch_range": [min_batch, max_batch], "tensorrt": trt.__version__}, indent=2))
    return engine_path


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"{engine_path}: no such engine; build one with `python -m export tensorrt`")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise TensorRTBuildError(f"{side}: missing; the engine was not built by `python -m export tensorrt` "
                                 "(which writes the model config beside it): rebuild it")
    try:
        meta = json.loads(side.read_text())
        meta["model_config"] = HRMConfig(**meta["model_config"])
    except (ValueError, KeyError, TypeError) as err:
        raise TensorRTBuildError(f"{side}: unreadable engine metadata ({err}); rebuild the engine") from None
    return meta


class TensorRTSolver:
    """Runs an engine of the `solve` graph on the current CUDA device; the interface of OnnxSolver."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, *, early_halt: bool = False) -> None:
        meta = read_sidecar(engine_path)
        self.config, self.precision = meta["model_config"], meta["precision"]
        self.batch_range = tuple(meta["batch_range"])
        trt = import_tensorrt()
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise TensorRTUnavailableError("TensorRT engines run on an NVIDIA GPU and torch sees no CUDA device")
        self._trt, self._torch = trt, torch
        runtime = trt.Runtime(_trt_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTBuildError(f"{engine_path}: TensorRT could not load the engine (built by another "
                                     "TensorRT version or GPU?); rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        self.early_halt = torch.tensor([bool(early_halt)], device="cuda")
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.bool: torch.bool, trt.int64: torch.int64}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[self.engine.get_tensor_dtype(name)]

    def solve(self, inputs: np.ndarray, puzzle_identifiers: np.ndarray) -> SolveResult:
        inputs, ids = check_solver_inputs(self.config, inputs, puzzle_identifiers)
        low, high = self.batch_range
        if not low <= len(inputs) <= high:
            raise ValueError(f"this engine takes batches of {low}..{high} puzzles, got {len(inputs)}; "
                             "rebuild it with --max-batch")
        torch = self._torch
        feeds = {"inputs": torch.from_numpy(inputs).cuda(), "puzzle_identifiers": torch.from_numpy(ids).cuda(),
                 "early_halt": self.early_halt}
        outputs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT:
                self.context.set_input_shape(name, tuple(feeds[name].shape))
                self.context.set_tensor_address(name, feeds[name].data_ptr())
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == self._trt.TensorIOMode.OUTPUT:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the feeds were copied on the default stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        self.stream.synchronize()
        return SolveResult(outputs["predictions"].cpu().numpy().astype(np.int32),
                           outputs["steps"].cpu().numpy().astype(np.int32),
                           outputs["q_halt"].float().cpu().numpy())
