"""Model folders (model.safetensors + config.json) read and written without JAX (export/params_folder.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from export.params_folder import is_params_folder, params_of, read_params, torch_model
from hrm_jax.model import init_params
from hrm_jax.pretrained import PretrainedError, load_folder, model_dir, save_pretrained
from sage.sleep import publish
from tests.test_sleep import CFG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_shipped_model_reads_as_hrm_jax_reads_it():
    got, config = read_params(model_dir())
    want, want_config = load_folder(model_dir())
    assert config == want_config
    assert_same_tree(got, want)


def test_published_folders_round_trip_in_float32(tmp_path):
    params = init_params(CFG, jax.random.PRNGKey(3))
    publish(str(tmp_path / "w"), params, CFG, {"source": "test"}, version=0, fmt="folder")
    folder = tmp_path / "w" / "v000000"
    assert is_params_folder(folder) and not is_params_folder(tmp_path)
    got, config = read_params(folder)
    assert config == CFG
    assert_same_tree(got, jax.tree.map(np.asarray, params))
    assert_same_tree(params_of(torch_model(folder, "float32", CFG.replace(forward_dtype="float32"))), got)


def test_a_folder_that_does_not_fit_its_config_is_named(tmp_path):
    params = init_params(CFG, jax.random.PRNGKey(0))
    save_pretrained(tmp_path / "wide", params, CFG.replace(hidden_size=64), dtype="float32")
    with pytest.raises(PretrainedError, match="(?s)does not match .*hidden_size: config has 64, checkpoint implies 32"):
        read_params(tmp_path / "wide")
    folder = save_pretrained(tmp_path / "extra", params, CFG, dtype="float32")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({**tensors, "dense/stray/kernel": np.zeros(3, np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"unexpected tensors \['dense/stray/kernel'\]"):
        read_params(folder)


def test_the_torch_backend_serves_the_shipped_model_without_jax(tmp_path):
    script = ("import sys; sys.modules['jax'] = None\n"
              "import numpy as np\n"
              "from sage.backends import carry_shape, load_backend\n"
              f"backend = load_backend('pretrained', 'torch', cache_dir={str(tmp_path)!r})\n"
              "z = np.zeros((1, *carry_shape(backend.config)), backend.carry_dtype)\n"
              "out = backend.step(z, z, np.ones(1, bool), np.ones((1, 81), np.int32), np.zeros(1, np.int32))\n"
              "assert out.predictions.shape == (1, 81)\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
