"""Test setup: keep JAX on the CPU and quiet; property tests reproducible in CI."""

import os

import pytest
from hypothesis import settings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# In CI (CI=true) hypothesis draws the same examples every run, so a submission's result does not depend on the
# seed; locally each run explores new examples (and replays saved failures).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on a CPU that other jobs share, its spin-waiting OpenMP workers make small steps up to 10x slower
    (BUILD_NOTES.md, "Memory and sleep")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
