"""The C engine's own pieces (sage._pbm, skipped where it is not built): its CRC32 against zlib's, and
that CI, which builds it, really tests it. Its push / pop run every test of test_sage_mailbox*.py."""

from __future__ import annotations

import os
import subprocess
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


@native_only
@pytest.mark.parametrize("no_avx512", [False, True])
def test_native_crc32_equals_zlib_on_each_simd_path_around_its_thresholds(no_avx512):
    """Lengths around every switch between the paths (64, 256, 512 bytes, and the loops' 128 and 256 byte
    steps) and record sizes, on the AVX-512 path where the CPU has it and with it switched off
    (PBM_CRC32_NO_AVX512, read when the module loads: hence a fresh process each)."""
    code = ("import random, zlib\n"
            "from sage import _pbm\n"
            "rng = random.Random(7)\n"
            "data = bytes(rng.getrandbits(8) for _ in range(70000))\n"
            "sizes = sorted({*range(0, 1100), *(4096 + d for d in range(-40, 41)), 65536, 65536 + 17, 69999})\n"
            "bad = [n for n in sizes for start in (0, 3) if _pbm.crc32(data[start:start + n], 5) != "
            "zlib.crc32(data[start:start + n], 5)]\n"
            "print(_pbm.CRC32_IMPL, bad[:10])\n")
    env = {k: v for k, v in os.environ.items() if k != "PBM_CRC32_NO_AVX512"}
    if no_avx512:
        env["PBM_CRC32_NO_AVX512"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    impl, bad = out.stdout.split(" ", 1)
    assert bad.strip() == "[]", f"{impl}: lengths whose crc differs from zlib's: {bad}"
    if no_avx512:
        assert impl != "vpclmul512"
