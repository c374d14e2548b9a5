"""Models shipped inside the package: weights, configuration and model card, loadable without a GPU or torch.

A shipped model is a folder of package data under `hrm_jax/weights/<name>/`:

    model.safetensors   the parameters under hrm_jax's own names ("dense/H_level/layers_0/...", the
                        flattened params tree of `hrm_jax.model.init_params`), stored in float16
    config.json         the HRMConfig fields
    MODEL_CARD.md       data and licences, the training command and machine, measured accuracy

Weights are read with `safetensors.numpy` (no torch needed) and cast to float32, the dtype the model's
parameters always have; the forward pass then computes in the config's forward_dtype as usual.
`python -m export torch --model pretrained` writes the same weights under the reference's key names.
Importing this module needs no JAX (the folder format is read on devices without it: export/params_folder.py);
`load_folder` and `load_model` import it when called.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from hrm_jax.config import HRMConfig

WEIGHTS_PACKAGE = "hrm_jax.weights"
PRETRAINED = "pretrained"  # the model spec naming the shipped default ("pretrained:NAME" names another)
DEFAULT_MODEL = "sudoku"
SEPARATOR = "/"
STORAGE_DTYPES = ("float16", "float32")


class PretrainedError(ValueError):
    """A shipped model is missing or its files are damaged; the message names the file and the fix."""


def available() -> list[str]:
    """Names of the models shipped with this installation."""
    root = importlib.resources.files(WEIGHTS_PACKAGE)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def model_dir(name: str = DEFAULT_MODEL) -> pathlib.Path:
    """The folder of a shipped model (a real path: the package is installed as files)."""
    folder = importlib.resources.files(WEIGHTS_PACKAGE) / name
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"no shipped model named {name!r}; shipped: {', '.join(available()) or 'none'}")
    return pathlib.Path(os.fspath(folder))


def flatten_params(params: dict[str, Any], leaf=np.asarray) -> dict[str, Any]:
    """Nested params dict -> {"dense/H_level/...": leaf(array)}."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(f"{prefix}{SEPARATOR}{key}" if prefix else key, child)
        else:
            flat[prefix] = leaf(node)

    walk("", params)
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(SEPARATOR)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save_pretrained(folder: str | os.PathLike, params: dict[str, Any], config: HRMConfig, *,
                    dtype: str = "float16") -> pathlib.Path:
    """Writes model.safetensors (params in `dtype`) and config.json into `folder`; returns the folder."""
    if dtype not in STORAGE_DTYPES:
        raise PretrainedError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in flatten_params(params).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "hrm_jax", "dtype": dtype})
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    return folder


def load_config(folder: str | os.PathLike) -> HRMConfig:
    path = pathlib.Path(folder) / "config.json"
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PretrainedError(f"{path}: unreadable ({error}); reinstall the package or pass another model") from None
    known = {f.name for f in dataclasses.fields(HRMConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PretrainedError(f"{path}: unknown HRMConfig fields {unknown}; it was written by another version")
    return HRMConfig(**fields)


def load_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], HRMConfig]:
    """(params as float32 numpy arrays, config) of a folder written by save_pretrained, checked against the
    shapes the config implies."""
    folder = pathlib.Path(folder)
    config = load_config(folder)
    path = folder / "model.safetensors"
    try:
        flat = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise PretrainedError(f"{path}: unreadable weights ({error}); reinstall the package") from None
    import jax  # noqa: PLC0415  (module import stays JAX-free; the shape check builds the abstract params)

    from hrm_jax.model import init_params  # noqa: PLC0415

    abstract = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    expected = flatten_params(abstract, leaf=lambda x: tuple(x.shape))
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(expected) & set(flat) if tuple(flat[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise PretrainedError(f"{path} does not match {folder / 'config.json'}: missing {missing}, unexpected "
                              f"{unexpected}, wrong shapes {wrong}")
    return unflatten_params({k: v.astype(np.float32) for k, v in flat.items()}), config


def load_pretrained(name: str = DEFAULT_MODEL) -> tuple[dict[str, Any], HRMConfig]:
    """(params, config) of a shipped model, e.g. `load_pretrained("sudoku")`."""
    return load_folder(model_dir(name))


def heldout_sample(name: str = DEFAULT_MODEL) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The held-out puzzles shipped beside a model (heldout.txt): {band: [(puzzle int8[81], solution int8[81])]},
    0 for blanks, bands in file order."""
    path = model_dir(name) / "heldout.txt"
    bands: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            band, puzzle, solution = line.split()
            grids = [np.array([0 if c == "." else int(c) for c in text], np.int8) for text in (puzzle, solution)]
        except ValueError:
            raise PretrainedError(f"{path}:{number}: expected 'band puzzle solution'; reinstall the package") from None
        bands.setdefault(band, []).append((grids[0], grids[1]))
    return bands


def load_model(spec: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(params, model config) of whatever a user names as the model: "pretrained" (or "pretrained:NAME") for a
    shipped model, a folder written by save_pretrained, or an hrm_jax checkpoint (a run folder, its best/,
    a step dir: `hrm_jax.checkpoint.load_params_for_eval`)."""
    text = os.fspath(spec)
    if text == PRETRAINED or text.startswith(PRETRAINED + ":"):
        return load_pretrained(text.partition(":")[2] or DEFAULT_MODEL)
    if (pathlib.Path(text) / "config.json").is_file() and (pathlib.Path(text) / "model.safetensors").is_file():
        return load_folder(text)
    from hrm_jax.checkpoint import load_params_for_eval  # noqa: PLC0415  (orbax and JAX: only for checkpoints)

    return load_params_for_eval(text)
