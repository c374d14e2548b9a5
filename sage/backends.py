"""Segment-stepping backends: one ACT segment of HRM on a batch whose carry the caller holds.

The server (sage/serve.py) owns the ACT loop: it stacks the rows it is working on, runs one
segment, reads the Q head and decides per row whether to stop, so rows leave and join between
segments. A backend therefore only maps

    step(z_H, z_L, fresh bool[B], inputs int32[B, seq_len], puzzle_identifiers int32[B])
        -> SegmentOutput(z_H, z_L, predictions int32[B, seq_len], q_halt f32[B], q_continue f32[B])

with z_H, z_L [B, total_seq_len, hidden] in `carry_dtype` as host NumPy arrays; rows with `fresh`
set start from H_init/L_init (their z values are ignored), the others continue from theirs. This
is one `act_step` of the reference's HierarchicalReasoningModel_ACTV1 in eval mode (sapientinc/HRM
models/hrm/hrm_act_v1.py) with the step counter kept by the caller.

`load_backend(model, backend, ...)` is the one place where a model argument becomes a backend; to
accept a new kind of model (a named pretrained release, a new file format), add a resolver to
`_RESOLVERS`. Each backend imports its runtime (onnxruntime, torch, jax) only when it is built, so
`sage` itself needs numpy alone.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from hrm_jax.config import HRMConfig

logger = logging.getLogger(__name__)

BACKENDS = ("onnx", "torch", "tensorrt", "jax")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# ONNX Runtime providers per backend and device; CPU last so that a missing GPU provider still runs.
_PROVIDERS = {("onnx", "cpu"): ["CPUExecutionProvider"],
              ("onnx", "cuda"): ["CUDAExecutionProvider", "CPUExecutionProvider"],
              ("tensorrt", "cuda"): ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class ModelError(ValueError):
    """A --model argument that does not resolve to a runnable model; the message says what to pass."""


class SegmentOutput(NamedTuple):
    z_H: np.ndarray
    z_L: np.ndarray
    predictions: np.ndarray  # int32[B, seq_len]: argmax tokens of this segment
    q_halt: np.ndarray  # f32[B]
    q_continue: np.ndarray  # f32[B]


class SegmentBackend(Protocol):
    name: str
    config: HRMConfig
    carry_dtype: np.dtype

    def step(self, z_H: np.ndarray, z_L: np.ndarray, fresh: np.ndarray, inputs: np.ndarray,
             puzzle_identifiers: np.ndarray) -> SegmentOutput: ...


def carry_shape(config: HRMConfig) -> tuple[int, int]:
    """Shape of one row's z_H (and z_L): [total_seq_len, hidden]."""
    return config.total_seq_len, config.hidden_size


class OnnxBackend:
    """An exported `segment` graph (export/onnx.py) through ONNX Runtime, via export.onnx.OnnxSegment."""

    def __init__(self, path: str | os.PathLike, *, name: str = "onnx", providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        from export.onnx_runtime import OnnxSegment  # onnxruntime: only this backend needs it

        self.name = name
        self.runner = OnnxSegment(path, providers=providers, threads=threads)
        self.config, self.carry_dtype = self.runner.config, np.dtype(self.runner.np_dtype)
        self.path = Path(path)

    def step(self, z_H, z_L, fresh, inputs, puzzle_identifiers) -> SegmentOutput:
        carry = {"z_H": z_H, "z_L": z_L, "steps": np.zeros(len(fresh), np.int32), "halted": np.asarray(fresh, bool)}
        carry, out = self.runner.step(carry, inputs, puzzle_identifiers)
        return SegmentOutput(carry["z_H"], carry["z_L"], out["logits"].argmax(-1).astype(np.int32),
                             out["q_halt"].astype(np.float32), out["q_continue"].astype(np.float32))


class TorchBackend:
    """export/torch_model.py's HRMTorch.forward (one act_step), eager, on CPU or CUDA."""

    name = "torch"

    def __init__(self, model, device: str = "cpu") -> None:
        import torch  # only this backend needs torch

        self.torch, self.device = torch, torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        # bf16 has no NumPy dtype; a bf16 carry held as float32 on the host converts back exactly.
        self.carry_dtype = np.dtype(np.float16 if model.dtype == torch.float16 else np.float32)

    def step(self, z_H, z_L, fresh, inputs, puzzle_identifiers) -> SegmentOutput:
        torch, dev, dtype = self.torch, self.device, self.model.dtype
        with torch.no_grad():
            args = (torch.from_numpy(np.ascontiguousarray(z_H)).to(dev, dtype),
                    torch.from_numpy(np.ascontiguousarray(z_L)).to(dev, dtype),
                    torch.zeros(len(fresh), dtype=torch.int32, device=dev),
                    torch.from_numpy(np.asarray(fresh, bool)).to(dev),
                    torch.from_numpy(np.asarray(inputs, np.int32)).to(dev),
                    torch.from_numpy(np.asarray(puzzle_identifiers, np.int32)).to(dev))
            z_H, z_L, _, _, _, _, logits, q_halt, q_continue = self.model(*args)
            host = self.carry_dtype.type
            return SegmentOutput(z_H.float().cpu().numpy().astype(host), z_L.float().cpu().numpy().astype(host),
                                 logits.argmax(-1).to(torch.int32).cpu().numpy(),
                                 q_halt.float().cpu().numpy(), q_continue.float().cpu().numpy())


class JaxBackend:
    """hrm_jax.model.act_step (eval) jitted; batches are padded to powers of two to bound recompiles."""

    name = "jax"

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        import jax  # JAX is an optional backend of sage

        from hrm_jax.model import ACTCarry, act_step
        from hrm_jax.pretrained import load_model

        self.params, self.config = load_model(checkpoint)
        if jax.devices()[0].platform == "cpu" and self.config.forward_dtype != "float32":
            self.config = self.config.replace(forward_dtype="float32")  # XLA:CPU emulates bf16 matmuls slowly
        self.carry_dtype = np.dtype(np.float16 if self.config.forward_dtype == "float16" else np.float32)

        def step(params, z_H, z_L, fresh, inputs, ids):
            data = {"inputs": inputs, "labels": inputs, "puzzle_identifiers": ids}
            carry = ACTCarry(z_H=z_H, z_L=z_L, steps=jax.numpy.zeros_like(ids), halted=fresh, current_data=data)
            carry, out = act_step(params, self.config, carry, data, None, train=False)
            return (carry.z_H, carry.z_L, out["logits"].argmax(-1).astype(jax.numpy.int32),
                    out["q_halt_logits"], out["q_continue_logits"])

        self._step = jax.jit(step)

    def step(self, z_H, z_L, fresh, inputs, puzzle_identifiers) -> SegmentOutput:
        import jax.numpy as jnp

        rows = len(fresh)
        padded = 1 << max(0, rows - 1).bit_length()
        pad = [(0, padded - rows)]
        dtype = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[self.config.forward_dtype]
        out = self._step(self.params, jnp.asarray(np.pad(z_H, pad + [(0, 0)] * 2), dtype),
                         jnp.asarray(np.pad(z_L, pad + [(0, 0)] * 2), dtype),
                         jnp.asarray(np.pad(np.asarray(fresh, bool), pad, constant_values=True)),
                         jnp.asarray(np.pad(np.asarray(inputs, np.int32), pad + [(0, 0)])),
                         jnp.asarray(np.pad(np.asarray(puzzle_identifiers, np.int32), pad)))
        z_H, z_L, predictions, q_halt, q_continue = (np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16
                                                                else x)[:rows] for x in out)
        return SegmentOutput(z_H.astype(self.carry_dtype), z_L.astype(self.carry_dtype), predictions,
                             q_halt.astype(np.float32), q_continue.astype(np.float32))


# Resolving --model ---------------------------------------------------------------------------
class ModelSpec(NamedTuple):
    path: Path
    backend: str
    device: str
    config_path: Path | None
    cache_dir: Path
    threads: int | None


def _is_onnx(spec: ModelSpec) -> bool:
    return spec.path.suffix == ".onnx"


def _is_checkpoint_dir(spec: ModelSpec) -> bool:
    return spec.path.is_dir()


def _is_state_dict(spec: ModelSpec) -> bool:
    return spec.path.suffix in STATE_DICT_SUFFIXES


def _providers(spec: ModelSpec) -> list[str]:
    key = (spec.backend, spec.device)
    if key not in _PROVIDERS:
        raise ModelError(f"backend {spec.backend} does not run on device {spec.device!r}; "
                         "use --device cuda for tensorrt, cpu or cuda for onnx")
    return _PROVIDERS[key]


def _onnx_backend(spec: ModelSpec, path: Path) -> SegmentBackend:
    return OnnxBackend(path, name=spec.backend, providers=_providers(spec), threads=spec.threads)


def segment_graph_for(path: Path) -> Path:
    """The segment graph of an export: the file itself, or `X.segment.onnx` beside a solve graph `X.onnx`."""
    from export.onnx_runtime import read_metadata  # needs the onnx package

    _, graph, _ = read_metadata(path)
    if graph == "segment":
        return path
    sibling = path.with_suffix(".segment.onnx")
    if sibling.is_file():
        return sibling
    raise ModelError(f"{path} holds the {graph!r} graph and {sibling} does not exist; the server steps one "
                     "segment at a time: export with `python -m export onnx --graph both` (the default)")


def _from_onnx(spec: ModelSpec) -> SegmentBackend:
    if spec.backend not in ("onnx", "tensorrt"):
        raise ModelError(f"{spec.path}: an ONNX file runs on --backend onnx or tensorrt; backend {spec.backend} "
                         "needs the weights (an orbax checkpoint dir, or a state dict file with --config)")
    return _onnx_backend(spec, segment_graph_for(spec.path))


def _cached_export(spec: ModelSpec, make_model: Callable[[], object]) -> Path:
    """Exports the segment graph once per model file version into the cache directory (a published
    weights version: once per version, on the hot-swap reloader's thread, sage/hot_swap.py)."""
    out = spec.cache_dir / f"{spec.path.stem}-{_content_key(spec.path)}.segment.onnx"
    if not out.is_file():
        try:
            from export.onnx import export_onnx  # torch's exporter: only when exporting
        except ImportError as err:
            raise ModelError(f"{spec.path}: backend {spec.backend} runs an ONNX export of these weights, and "
                             f"exporting needs torch, which does not import here ({err}); install torch, or export "
                             "where it is (python -m export onnx) and pass the .onnx file") from None
        logger.info("exporting the segment graph of %s to %s", spec.path, out)
        tmp = out.with_suffix(f".tmp{os.getpid()}.onnx")
        export_onnx(make_model(), tmp, "segment")
        os.replace(tmp, out)
    return out


def _content_key(path: Path) -> str:
    """Names a model file's version: its path and every file's size and mtime (for a directory, the files
    under it, so that rewriting a file in place also gives a new key)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [str(path.resolve())] + [f"{p.relative_to(path) if p != path else ''}:{p.stat().st_mtime_ns}:"
                                     f"{p.stat().st_size}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _compute_dtype(spec: ModelSpec, config: HRMConfig) -> str:
    """The config's forward dtype for torch on CUDA (bf16 for the paper's runs); float32 elsewhere:
    CPUs emulate bf16 slowly, and the exported ONNX graph must run on ONNX Runtime's CPU provider."""
    return config.forward_dtype if (spec.backend, spec.device) == ("torch", "cuda") else "float32"


def _torch_from_checkpoint(spec: ModelSpec):
    from export.convert import to_torch_state_dict
    from export.params_folder import is_params_folder, read_params  # a shipped or torch-published folder: no jax
    from export.trm_torch_model import torch_module  # HRMTorch or TRMTorch, by the checkpoint's family

    if is_params_folder(spec.path):
        params, config = read_params(spec.path)
    else:
        params, config = _orbax_params(spec.path)
    model = torch_module(config, _compute_dtype(spec, config))
    model.load_state_dict(to_torch_state_dict(params, config), strict=True)
    return model


def _orbax_params(path: Path):
    try:
        from hrm_jax.checkpoint import load_params_for_eval  # orbax checkpoints need jax
    except ImportError as err:
        raise ModelError(f"{path}: an orbax checkpoint needs JAX to read, which does not import here ({err}); pass "
                         "a model folder (model.safetensors + config.json) or a state dict with --config") from None
    return load_params_for_eval(path)


def _config_for_state_dict(spec: ModelSpec) -> HRMConfig:
    candidates = [spec.config_path] if spec.config_path else [spec.path.with_suffix(".json"),
                                                              spec.path.parent / "config.json"]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            try:
                return HRMConfig(**json.loads(candidate.read_text()))
            except (ValueError, TypeError) as err:
                raise ModelError(f"{candidate}: not an HRMConfig JSON ({err})") from None
    raise ModelError(f"{spec.path}: a state dict needs its model config: pass --config FILE.json "
                     f"(HRMConfig fields) or put it at {candidates[0]}")


def _torch_from_state_dict(spec: ModelSpec):
    import torch  # only state-dict models need torch

    from export.torch_model import HRMTorch

    config = _config_for_state_dict(spec)
    if spec.path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(spec.path))
    else:
        state = torch.load(spec.path, map_location="cpu", weights_only=True)
    # The reference's prefixes (`_orig_mod.`, `model.`, `inner.`) -> HRMTorch's `model.inner.`; done here
    # rather than with export.convert, which imports jax. load_state_dict(strict=True) names any mismatch.
    canonical = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "model.", "inner."):
            key = key.removeprefix(prefix)
        canonical["model.inner." + key] = value
    model = HRMTorch(config, _compute_dtype(spec, config))
    try:
        model.load_state_dict(canonical, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{spec.path}: its tensors do not fit the config: {str(err).splitlines()[0]}") from None
    return model


def _from_checkpoint_dir(spec: ModelSpec) -> SegmentBackend:
    if spec.backend == "jax":
        return JaxBackend(spec.path)
    if spec.backend == "torch":
        return TorchBackend(_torch_from_checkpoint(spec), spec.device)
    return _onnx_backend(spec, _cached_export(spec, lambda: _torch_from_checkpoint(spec)))


def _from_state_dict(spec: ModelSpec) -> SegmentBackend:
    if spec.backend == "jax":
        raise ModelError(f"{spec.path}: the jax backend reads orbax checkpoints; convert the state dict with "
                         "`python -m export from-torch FILE --out DIR` or use --backend torch")
    if spec.backend == "torch":
        return TorchBackend(_torch_from_state_dict(spec), spec.device)
    return _onnx_backend(spec, _cached_export(spec, lambda: _torch_from_state_dict(spec)))


# Checked in order; the first whose predicate accepts the spec builds the backend.
_RESOLVERS: list[tuple[Callable[[ModelSpec], bool], Callable[[ModelSpec], SegmentBackend]]] = [
    (_is_onnx, _from_onnx),
    (_is_checkpoint_dir, _from_checkpoint_dir),
    (_is_state_dict, _from_state_dict),
]


def _shipped_model_dir(model: str) -> Path | None:
    """The folder of a model shipped with hrm_jax for "pretrained" or "pretrained:NAME", else None (found
    through importlib.resources, which needs no jax)."""
    if model != "pretrained" and not model.startswith("pretrained:"):
        return None
    name = model.partition(":")[2] or "sudoku"
    folder = Path(os.fspath(importlib.resources.files("hrm_jax.weights") / name))
    if not (folder / "config.json").is_file():
        raise ModelError(f"--model {model}: no shipped model named {name!r}")
    return folder


def load_backend(model: str | os.PathLike, backend: str, *, device: str = "cpu",
                 config_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None) -> SegmentBackend:
    """The segment backend for `model` (an exported ONNX file, a model folder (model.safetensors + config.json:
    the shipped model, or a version the torch sleep trainer published; read without JAX), an orbax checkpoint
    directory, a torch state
    dict .safetensors/.pt with its HRMConfig JSON, or "pretrained" for the shipped Sudoku model) on
    `backend` and `device`."""
    if backend not in BACKENDS:
        raise ModelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    path = _shipped_model_dir(str(model)) or Path(model)
    if not path.exists():
        raise ModelError(f"--model {path}: no such file or directory; pass an exported .onnx file "
                         "(python -m export onnx), a model folder, an orbax checkpoint directory or a .safetensors "
                         "state dict")
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "sage"
    cache.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(path, backend, device, Path(config_path) if config_path else None, cache, threads)
    for accepts, build in _RESOLVERS:
        if accepts(spec):
            return build(spec)
    raise ModelError(f"--model {path}: not a model this server reads (an .onnx export, an orbax checkpoint "
                     f"directory, or a state dict with suffix {', '.join(STATE_DICT_SUFFIXES)})")
