"""The C engine's own pieces (sage._pbm, skipped where it is not built): its CRC32 against zlib's, and
that CI, which builds it, really tests it. Its push / pop run every test of test_sage_mailbox*.py."""

from __future__ import annotations

import os
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage import mailbox as mailbox_module

native_only = pytest.mark.skipif(mailbox_module.native_engine_status() is not None,
                                 reason="the C engine sage._pbm is not built here")


@native_only
@given(data=st.binary(max_size=5000), start=st.integers(0, 15), value=st.integers(0, 2**32 - 1))
@settings(max_examples=300, deadline=None)
def test_native_crc32_equals_zlib(data, start, value):
    """Both C paths (carry-less multiply where the CPU has it, tables) against zlib, at every alignment."""
    from sage import _pbm

    view = memoryview(data)[min(start, len(data)):]
    assert _pbm.crc32(view, value) == _pbm.crc32_portable(view, value) == zlib.crc32(view, value)


def test_native_engine_is_built_on_ci():
    """CI installs with pip install -e ., which builds sage._pbm in place: both engines must be tested there."""
    if os.environ.get("CI") and sys.platform.startswith("linux"):
        assert mailbox_module.native_engine_status() is None, mailbox_module.native_engine_status()
    elif mailbox_module.native_engine_status() is not None:
        pytest.skip(mailbox_module.native_engine_status())
