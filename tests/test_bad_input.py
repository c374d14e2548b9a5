"""Malformed input at every entry point (hypothesis): dataset splits, puzzle text and files, ARC
tasks, checkpoints, torch state dicts and ONNX files. Each is either read correctly or refused with
a ValueError/OSError subclass (what the CLIs print as one line, exit code 2) whose message is one
line naming the file; nothing is written (the input folder is byte for byte as before)."""

import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export.convert import load_state_dict, save_state_dict
from export.onnx import OnnxSolver, read_metadata
from hrm_jax import checkpoint as ckpt
from hrm_jax.data.arc import ARCTask, load_tasks, parse_task
from hrm_jax.data.format import load_split
from hrm_jax.data.sudoku_solver import SudokuFormatError, parse_puzzle, read_collection
from hrm_jax.model import init_params
from tests.test_train import CFG, make_dataset

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 12) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)


def snapshot(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, n), root): pathlib.Path(r, n).read_bytes()
            for r, _, names in os.walk(root) for n in names}


def assert_clear_refusal(call, path, root=None):
    """call() succeeds or raises ValueError/OSError with one line naming `path`; `root` is unchanged."""
    before = snapshot(root) if root else None
    try:
        call()
    except (ValueError, OSError) as err:
        message = str(err)
        assert "\n" not in message.strip(), message
        assert str(path) in message, message
    if root:
        assert snapshot(root) == before


@st.composite
def damage(draw, files: list[str]):
    """(file index, kind, position, byte): truncate, overwrite a byte, replace with junk, delete."""
    return (draw(st.integers(0, len(files) - 1)), draw(st.sampled_from(["truncate", "flip", "junk", "delete"])),
            draw(st.floats(0, 1)), draw(st.integers(1, 255)), draw(st.binary(max_size=64)))


def apply_damage(root, files, spec) -> str:
    index, kind, where, byte, junk = spec
    path = os.path.join(root, files[index])
    size = os.path.getsize(path)
    if kind == "truncate":
        os.truncate(path, int(where * size))
    elif kind == "flip" and size:
        data = bytearray(pathlib.Path(path).read_bytes())
        data[min(int(where * size), size - 1)] ^= byte
        pathlib.Path(path).write_bytes(bytes(data))
    elif kind == "junk":
        pathlib.Path(path).write_bytes(junk)
    else:
        os.remove(path)
    return path


def files_of(root) -> list[str]:
    return sorted(snapshot(root))


# Text and JSON ----------------------------------------------------------------------------------
@SETTINGS
@given(st.text(max_size=100) | st.text(alphabet="0123456789.\n -|+", min_size=70, max_size=100))
def test_parse_puzzle_reads_or_refuses_in_one_line(text):
    try:
        grid = parse_puzzle(text)
    except SudokuFormatError as err:
        assert "\n" not in str(err).strip() and str(err)
    else:
        assert grid.shape == (81,) and grid.min() >= 0 and grid.max() <= 9


@SETTINGS
@given(JSON)
def test_parse_task_reads_or_refuses_in_one_line(value):
    try:
        task = parse_task("t", value, "tasks.json[t]")
    except ValueError as err:
        assert "\n" not in str(err) and "tasks.json[t]" in str(err)
    else:
        assert isinstance(task, ARCTask) and task.train


@SETTINGS
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_task_and_puzzle_files_read_or_refuse_naming_the_file(content):
    with tempfile.TemporaryDirectory() as root:
        for name, reader in (("tasks.json", load_tasks), ("puzzles.txt", read_collection)):
            path = pathlib.Path(root, name)
            path.write_bytes(content)
            assert_clear_refusal(lambda p=path, r=reader: r(str(p)), path, root)


# Datasets ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_train=8, num_test=4)


@SETTINGS
@given(st.data())
def test_damaged_dataset_is_refused_naming_the_file(dataset, data):
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(dataset, root, dirs_exist_ok=True)
        files = files_of(root)
        path = apply_damage(root, files, data.draw(damage(files)))
        assert_clear_refusal(lambda: (load_split(root, "train"), load_split(root, "test")),
                             os.path.dirname(path), root)


@SETTINGS
@given(JSON)
def test_dataset_json_of_any_shape_is_refused_naming_the_file(dataset, value):
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(dataset, root, dirs_exist_ok=True)
        meta = pathlib.Path(root, "train", "dataset.json")
        original = json.loads(meta.read_text())
        if isinstance(value, dict):
            value = {**original, **value}  # valid fields overridden by junk ones
        meta.write_text(json.dumps(value))
        assert_clear_refusal(lambda: load_split(root, "train"), meta, root)


# Checkpoints and exported models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def params_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    params = init_params(CFG, jax.random.key(0))
    return ckpt.save_params(root / "weights", params, CFG), jax.device_get(params)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_checkpoint_is_refused_or_read_intact(params_checkpoint, data):
    step_dir, params = params_checkpoint
    with tempfile.TemporaryDirectory() as root:
        copy = os.path.join(root, "weights", os.path.basename(step_dir))
        shutil.copytree(step_dir, copy)
        files = files_of(copy)
        apply_damage(copy, files, data.draw(damage(files)))
        before = snapshot(root)
        try:
            loaded, _ = ckpt.load_params_for_eval(copy)
        except ckpt.CheckpointError as err:
            assert "\n" not in str(err) and copy in str(err), str(err)
        else:  # only damage the manifest does not cover (none today) could get here: the values must be intact
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(loaded)),
                                                             jax.tree.leaves(params)))
        assert snapshot(root) == before


@SETTINGS
@given(st.sampled_from([".pt", ".safetensors"]), st.floats(0, 1), st.binary(max_size=64), st.booleans())
def test_damaged_state_dict_is_refused_naming_the_file(suffix, where, junk, truncate):
    with tempfile.TemporaryDirectory() as root:
        path = pathlib.Path(root, "weights" + suffix)
        save_state_dict({"w": torch.arange(64, dtype=torch.float32)}, path)
        if truncate:
            os.truncate(path, int(where * os.path.getsize(path)))
        else:
            path.write_bytes(junk)
        assert_clear_refusal(lambda: load_state_dict(path), path, root)


def foreign_onnx(path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, {"hrm_config": json.dumps(CFG.to_dict())})
    onnx.save(model, path)


@SETTINGS
@given(st.floats(0, 1), st.integers(1, 255), st.sampled_from(["truncate", "flip"]))
def test_damaged_onnx_file_is_refused_naming_the_file(where, byte, kind):
    with tempfile.TemporaryDirectory() as root:
        path = pathlib.Path(root, "model.onnx")
        foreign_onnx(path)
        apply_damage(root, ["model.onnx"], (0, kind, where, byte, b""))
        assert_clear_refusal(lambda: read_metadata(path), path, root)
        assert_clear_refusal(lambda: OnnxSolver(path), path, root)
