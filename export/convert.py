"""Convert hrm_jax params <-> torch state dicts with the reference's keys, and read/write them.

JAX side (hrm_jax/model.py): {"dense": flax params, kernels [in, out]; "buffers": {"H_init",
"L_init"} f32[hidden]; "puzzle_emb": f32[num_puzzle_identifiers, puzzle_emb_ndim] if any}.
Torch side (sapientinc/HRM models/hrm/hrm_act_v1.py): `model.inner.<name>`, weights [out, in] in
float32, H_init/L_init in forward_dtype (bf16 buffers in the paper's runs). Released checkpoints add
the torch.compile prefix `_orig_mod.`; `from_torch_state_dict` accepts keys with or without
`_orig_mod.`, `model.` and `inner.`, and is strict about everything else.

TRM (hrm_jax/trm.py, SamsungSAILMontreal/TinyRecursiveModels trm.py) has the same keys with one
level, `L_level.layers.{i}`, whose blocks hold `mlp_t.{gate_up_proj,down_proj}.weight` instead of
the attention when mlp_t is set; which family a config belongs to picks the layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from export.torch_model import TORCH_DTYPES
from hrm_jax.config import HRMConfig
from hrm_jax.trm_config import TRMConfig

TORCH_PREFIX = "model.inner."
_STRIPPABLE_PREFIXES = ("_orig_mod.", "model.", "inner.")
_LAYER_KEY = re.compile(r"^(H_level|L_level)\.layers\.(\d+)\.(.+)$")
# Linear weights of one block: torch name -> flax path inside the block.
_BLOCK_LINEARS = {"self_attn.qkv_proj.weight": ("self_attn", "qkv_proj"),
                  "self_attn.o_proj.weight": ("self_attn", "o_proj"),
                  "mlp.gate_up_proj.weight": ("mlp", "gate_up_proj"),
                  "mlp.down_proj.weight": ("mlp", "down_proj")}
# TRM with mlp_t: the sequence SwiGLU takes the attention's place.
_MLP_T_BLOCK_LINEARS = {"mlp_t.gate_up_proj.weight": ("mlp_t", "gate_up_proj"),
                        "mlp_t.down_proj.weight": ("mlp_t", "down_proj"),
                        "mlp.gate_up_proj.weight": ("mlp", "gate_up_proj"),
                        "mlp.down_proj.weight": ("mlp", "down_proj")}


def _block_linears(config) -> dict[str, tuple[str, str]]:
    return _MLP_T_BLOCK_LINEARS if isinstance(config, TRMConfig) and config.mlp_t else _BLOCK_LINEARS


def _levels(config) -> tuple[tuple[str, int], ...]:
    """(level name, layer count): HRM's H and L levels, TRM's single L_level."""
    if isinstance(config, TRMConfig):
        return (("L_level", config.L_layers),)
    return (("H_level", config.H_layers), ("L_level", config.L_layers))


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", "")  # "" for the reference's `step_N` files


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the config: missing, unexpected or mis-shaped tensors."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), hints=(), detail: str = "") -> None:
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        self.mismatched, self.hints = list(mismatched), list(hints)
        lines = [detail] if detail else ["checkpoint does not match the model config:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, got, want in self.mismatched:
            lines.append(f"  shape of {key}: checkpoint {tuple(got)}, config expects {tuple(want)}")
        for hint in self.hints:
            lines.append(f"  config field {hint}")
        if self.hints:
            lines.append("  fix: build the model config with the values above (or load the matching checkpoint)")
        super().__init__("\n".join(lines))


class CheckpointFormatError(ValueError):
    """A file is not a readable checkpoint (truncated, wrong format, or not a flat state dict)."""


# Expected keys -----------------------------------------------------------------------------
def expected_shapes(config: HRMConfig) -> dict[str, tuple[int, ...]]:
    """Torch shapes of every checkpoint tensor, keyed by name relative to `model.inner.`."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {"embed_tokens.embedding_weight": (config.vocab_size, hidden),
              "lm_head.weight": (config.vocab_size, hidden),
              "q_head.weight": (2, hidden), "q_head.bias": (2,),
              "H_init": (hidden,), "L_init": (hidden,)}
    if config.puzzle_emb_ndim > 0:
        shapes["puzzle_emb.weights"] = (config.num_puzzle_identifiers, config.puzzle_emb_ndim)
    if config.pos_encodings == "learned":
        shapes["embed_pos.embedding_weight"] = (config.total_seq_len, hidden)
    block = {"mlp.gate_up_proj.weight": (2 * inter, hidden), "mlp.down_proj.weight": (hidden, inter)}
    if isinstance(config, TRMConfig) and config.mlp_t:
        seq, seq_inter = config.total_seq_len, config.sequence_intermediate_size
        block |= {"mlp_t.gate_up_proj.weight": (2 * seq_inter, seq), "mlp_t.down_proj.weight": (seq, seq_inter)}
    else:
        block |= {"self_attn.qkv_proj.weight": (3 * hidden, hidden), "self_attn.o_proj.weight": (hidden, hidden)}
    for level, count in _levels(config):
        for i in range(count):
            shapes.update({f"{level}.layers.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def num_trainable(state_dict: Mapping[str, Any]) -> int:
    """Parameters the reference's AdamATan2 trains: all but puzzle_emb.weights, H_init, L_init."""
    frozen = ("puzzle_emb.weights", "H_init", "L_init")
    return sum(int(v.numel()) for k, v in state_dict.items() if not k.endswith(frozen))


# params -> torch ---------------------------------------------------------------------------
def _to_torch(x: Any, transpose: bool = False) -> torch.Tensor:
    array = np.asarray(x, dtype=np.float32)
    return torch.from_numpy(np.array(array.T if transpose else array, order="C"))  # a writable copy


def to_torch_state_dict(params: Mapping[str, Any], config: HRMConfig,
                        prefix: str = TORCH_PREFIX) -> dict[str, torch.Tensor]:
    """hrm_jax params -> {prefix + reference key: tensor}; float32 except H_init/L_init (forward dtype)."""
    try:
        sd = _dense_to_torch(params, config)
    except KeyError as err:
        raise CheckpointMismatchError(detail=f"params lack {err} that the config needs; were they built "
                                             "for another HRMConfig (pos_encodings, puzzle_emb_ndim)?") from err
    _check_against_config(sd, config)  # params of another config would give a silently wrong file
    return {prefix + key: value for key, value in sd.items()}


def _dense_to_torch(params: Mapping[str, Any], config: HRMConfig) -> dict[str, torch.Tensor]:
    dense = params["dense"]
    sd = {"embed_tokens.embedding_weight": _to_torch(dense["embed_tokens"]["embedding"]),
          "lm_head.weight": _to_torch(dense["lm_head"]["kernel"], transpose=True),
          "q_head.weight": _to_torch(dense["q_head"]["kernel"], transpose=True),
          "q_head.bias": _to_torch(dense["q_head"]["bias"])}
    if config.pos_encodings == "learned":
        sd["embed_pos.embedding_weight"] = _to_torch(dense["embed_pos"]["embedding"])
    if config.puzzle_emb_ndim > 0:
        sd["puzzle_emb.weights"] = _to_torch(params["puzzle_emb"])
    buffer_dtype = TORCH_DTYPES[config.forward_dtype]
    for name in ("H_init", "L_init"):
        sd[name] = _to_torch(params["buffers"][name]).to(buffer_dtype)
    for level, _ in _levels(config):
        for layer_name, layer in dense[level].items():
            index = int(layer_name.removeprefix("layers_"))
            for torch_name, (module, proj) in _block_linears(config).items():
                sd[f"{level}.layers.{index}.{torch_name}"] = _to_torch(layer[module][proj]["kernel"], transpose=True)
    return sd


# torch -> params ---------------------------------------------------------------------------
def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the optional `_orig_mod.`, `model.` and `inner.` prefixes (in that order) from every key."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        short = key
        for prefix in _STRIPPABLE_PREFIXES:
            short = short.removeprefix(prefix)
        if short in out:
            raise CheckpointMismatchError(detail=f"keys collide after dropping prefixes: {short!r} appears twice")
        out[short] = value
    return out


def canonical_state_dict(state_dict: Mapping[str, torch.Tensor], config: HRMConfig,
                         prefix: str = TORCH_PREFIX) -> dict[str, torch.Tensor]:
    """Any accepted prefix style -> `model.inner.*` keys (dtypes kept), checked against the config.

    For HRMTorch.load_state_dict(strict=True) on a reference checkpoint (`_orig_mod.model.inner.*`).
    """
    sd = normalize_keys(state_dict)
    _check_against_config(sd, config)
    return {prefix + key: value for key, value in sd.items()}


def _numpy(x: torch.Tensor, transpose: bool = False) -> np.ndarray:
    array = x.detach().to(torch.float32).cpu().numpy()
    return np.array(array.T if transpose else array, order="C")  # a copy: never aliases a live tensor


def from_torch_state_dict(state_dict: Mapping[str, torch.Tensor], config: HRMConfig) -> dict[str, Any]:
    """A reference-layout state dict -> hrm_jax params (float32 jax arrays, kernels [in, out])."""
    import jax  # noqa: PLC0415  (the rest of this module runs without JAX: a torch-only device converts too)

    return jax.tree.map(jax.numpy.asarray, numpy_params_from_torch(state_dict, config))


def numpy_params_from_torch(state_dict: Mapping[str, torch.Tensor], config: HRMConfig) -> dict[str, Any]:
    """from_torch_state_dict with float32 NumPy leaves: the params tree without JAX."""
    sd = normalize_keys(state_dict)
    _check_against_config(sd, config)
    dense: dict[str, Any] = {"embed_tokens": {"embedding": _numpy(sd["embed_tokens.embedding_weight"])},
                             "lm_head": {"kernel": _numpy(sd["lm_head.weight"], transpose=True)},
                             "q_head": {"kernel": _numpy(sd["q_head.weight"], transpose=True),
                                        "bias": _numpy(sd["q_head.bias"])}}
    if config.pos_encodings == "learned":
        dense["embed_pos"] = {"embedding": _numpy(sd["embed_pos.embedding_weight"])}
    for level, count in _levels(config):
        dense[level] = {}
        for i in range(count):
            layer: dict[str, Any] = {module: {} for module, _ in _block_linears(config).values()}
            for torch_name, (module, proj) in _block_linears(config).items():
                layer[module][proj] = {"kernel": _numpy(sd[f"{level}.layers.{i}.{torch_name}"], transpose=True)}
            dense[level][f"layers_{i}"] = layer
    params: dict[str, Any] = {"dense": dense,
                              "buffers": {"H_init": _numpy(sd["H_init"]), "L_init": _numpy(sd["L_init"])}}
    if config.puzzle_emb_ndim > 0:
        params["puzzle_emb"] = _numpy(sd["puzzle_emb.weights"])
    return params


# Validation --------------------------------------------------------------------------------
def _check_against_config(sd: Mapping[str, Any], config: HRMConfig) -> None:
    """Raise CheckpointMismatchError naming bad keys and the config fields the checkpoint implies."""
    want = expected_shapes(config)
    missing = set(want) - set(sd)
    unexpected = set(sd) - set(want)
    mismatched = [(k, tuple(sd[k].shape), want[k]) for k in sorted(set(want) & set(sd))
                  if tuple(sd[k].shape) != want[k]]
    not_float = [k for k in sorted(set(want) & set(sd)) if not torch.is_floating_point(torch.as_tensor(sd[k]))]
    if not (missing or unexpected or mismatched or not_float):
        return
    hints = _implied_fields(sd, config)
    detail = "checkpoint does not match the model config:"
    if not_float:
        detail += f"\n  not floating point: {', '.join(not_float)}"
    raise CheckpointMismatchError(missing, unexpected, mismatched, hints, detail)


def _implied_fields(sd: Mapping[str, Any], config: HRMConfig) -> list[str]:
    """'field: config has A, checkpoint implies B' for every field the tensors pin down."""
    implied: dict[str, Any] = {}

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(sd[key].shape) if key in sd else None

    if (s := shape("embed_tokens.embedding_weight")) and len(s) == 2:
        implied["vocab_size"], implied["hidden_size"] = s
    elif (s := shape("lm_head.weight")) and len(s) == 2:
        implied["vocab_size"], implied["hidden_size"] = s
    trm = isinstance(config, TRMConfig)
    for level, field in (("H_level", "H_layers"), ("L_level", "L_layers")):
        if trm and level == "H_level":
            continue  # TRM has no H level (H_layers is unused)
        indices = {int(m.group(2)) for k in sd if (m := _LAYER_KEY.match(k)) and m.group(1) == level}
        if indices:
            implied[field] = max(indices) + 1
    inter = _implied_intermediate(sd)
    if inter is not None and inter != config.intermediate_size:
        hidden = implied.get("hidden_size", config.hidden_size)
        implied["expansion"] = (f"{inter * 3 / (2 * hidden):g} (intermediate size {inter}; config gives "
                                f"{config.intermediate_size})")
    if (s := shape("puzzle_emb.weights")) and len(s) == 2:
        implied["num_puzzle_identifiers"], implied["puzzle_emb_ndim"] = s
    elif "puzzle_emb.weights" not in sd:
        implied["puzzle_emb_ndim"] = 0
    if (s := shape("embed_pos.embedding_weight")) and len(s) == 2:
        implied["pos_encodings"] = "learned"
        ndim = implied.get("puzzle_emb_ndim", config.puzzle_emb_ndim)
        hidden = implied.get("hidden_size", config.hidden_size)
        slots = config.num_puzzle_slots if trm else -(-ndim // hidden)
        implied["seq_len"] = s[0] - slots
    elif not trm:  # TRM without a position table may use rope or none: the weights do not say
        implied["pos_encodings"] = "rope"
    if trm:
        implied["mlp_t"] = any(".mlp_t." in k for k in sd)
    hints = []
    for field, value in implied.items():
        current = getattr(config, field)
        if field == "expansion":  # already a sentence: only present when it differs
            hints.append(f"expansion: config has {current!r}, checkpoint implies {value}")
        elif value != current:
            hints.append(f"{field}: config has {current!r}, checkpoint implies {value!r}")
    return hints


def _implied_intermediate(sd: Mapping[str, Any]) -> int | None:
    for key, value in sd.items():
        if key.endswith("mlp.down_proj.weight") and value.ndim == 2:
            return int(value.shape[1])
    return None


# Files -------------------------------------------------------------------------------------
def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a flat {name: tensor} dict as `.safetensors` or a torch file (.pt/.pth/.bin/.ckpt/no suffix)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(tensors, str(path))
    elif path.suffix in TORCH_SUFFIXES:
        torch.save(tensors, path)
    else:
        raise CheckpointFormatError(f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors or "
                                    f"one of {', '.join(s for s in TORCH_SUFFIXES if s)} (or no suffix)")
    return path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} checkpoint (.safetensors, or a torch file via weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            loaded: Any = safetensors.torch.load_file(str(path))
        except Exception as err:  # safetensors raises SafetensorError (not exported) or OSError
            raise CheckpointFormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                        f"{_one_line(err)}") from err
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- the weights-only unpickler raises many types on junk
            raise CheckpointFormatError(
                f"{path}: not a readable torch checkpoint (truncated, corrupt, or not written by torch.save; "
                f"objects other than tensors are refused by weights_only=True): {_one_line(err)}") from err
    _require_flat_tensor_dict(loaded, path)
    return dict(loaded)


def _one_line(err: Exception) -> str:
    """A loader's error as one line. torch's weights-only unpickler puts the cause after a paragraph
    of advice ("WeightsUnpickler error: <cause>"); other messages keep their first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marker = [i for i, line in enumerate(lines) if line.endswith("WeightsUnpickler error:")]
    cause = lines[marker[0] + 1] if marker and marker[0] + 1 < len(lines) else (lines[0] if lines else "")
    return f"{type(err).__name__}: {cause[:200]}"


def _require_flat_tensor_dict(loaded: Any, path: Path) -> None:
    if not isinstance(loaded, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    bad = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f"{path}: not a flat state dict; entries that are not tensors: "
                                    f"{', '.join(bad[:10])} (save `model.state_dict()`, not a training state)")
