"""hrm_jax's model folder (`model.safetensors` + `config.json`, hrm_jax/pretrained.py) with torch and NumPy
alone: what a device without JAX reads and writes.

The folder holds the flattened hrm_jax params tree ("dense/H_level/layers_0/self_attn/qkv_proj/kernel", ...)
and the HRMConfig fields; the shipped model is one (stored in float16), and the torch sleep trainer
(sage/sleep_torch.py) publishes each new version as one in float32, so that a fine-tuned model is not
rounded. hrm_jax.pretrained.load_model reads the same folders on the JAX side. Keys and shapes are
checked against the config through export.convert, which names what does not fit.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

from export.convert import CheckpointMismatchError, numpy_params_from_torch, to_torch_state_dict
from export.torch_model import HRMTorch
from hrm_jax.config import HRMConfig
from hrm_jax.pretrained import PretrainedError, flatten_params, load_config, save_pretrained, unflatten_params

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def is_params_folder(path: str | os.PathLike) -> bool:
    folder = pathlib.Path(path)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_params(folder: str | os.PathLike) -> tuple[dict[str, Any], HRMConfig]:
    """(params tree of float32 NumPy arrays, config) of a folder, checked against the config: the
    JAX-free hrm_jax.pretrained.load_folder."""
    folder = pathlib.Path(folder)
    config = load_config(folder)
    path = folder / WEIGHTS_FILE
    try:
        flat = {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    except (OSError, SafetensorError) as error:
        raise PretrainedError(f"{path}: unreadable weights ({error}); publish or reinstall them again") from None
    params = unflatten_params(flat)
    try:
        expected = set(flatten_params(numpy_params_from_torch(to_torch_state_dict(params, config), config)))
    except CheckpointMismatchError as error:
        raise PretrainedError(f"{path} does not match {folder / CONFIG_FILE}: {error}") from None
    unexpected = sorted(set(flat) - expected)
    if unexpected:
        raise PretrainedError(f"{path} does not match {folder / CONFIG_FILE}: unexpected tensors {unexpected}")
    return params, config


def torch_model(folder: str | os.PathLike, dtype: torch.dtype | str | None = None,
                config: HRMConfig | None = None) -> HRMTorch:
    """HRMTorch holding a folder's weights (dtype: the compute dtype, default the config's forward_dtype;
    config: build the module for this config instead, e.g. one whose forward_dtype keeps H_init/L_init in
    float32)."""
    params, stored = read_params(folder)
    config = stored if config is None else config
    model = HRMTorch(config, dtype)
    model.load_state_dict(to_torch_state_dict(params, config), strict=True)
    return model


def write_params(folder: str | os.PathLike, params: dict[str, Any], config: HRMConfig) -> pathlib.Path:
    """Writes params (NumPy or JAX arrays) in float32 and the config, each file flushed to disk before this
    returns (a published version must be complete before its pointer names it: sage/weights.py)."""
    folder = save_pretrained(folder, params, config, dtype="float32")
    for name in (WEIGHTS_FILE, CONFIG_FILE, ""):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return folder


def params_of(model: HRMTorch) -> dict[str, Any]:
    """The hrm_jax params tree (float32 NumPy) of a torch module."""
    return numpy_params_from_torch(model.state_dict(), model.config)
