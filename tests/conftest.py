"""Test setup: keep JAX on the CPU and quiet; property tests reproducible in CI."""

import os

from hypothesis import settings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# In CI (CI=true) hypothesis draws the same examples every run, so a submission's result does not depend on the
# seed; locally each run explores new examples (and replays saved failures).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
