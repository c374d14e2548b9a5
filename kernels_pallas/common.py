"""What the Pallas kernels share: the Triton API across jax versions and the CPU fallback.

The kernels target the Pallas *Triton* backend. Since jax 0.10 a `pallas_call` without compiler
params lowers to Mosaic GPU on CUDA, so every call here passes `triton.CompilerParams` explicitly.
jax 0.11 deprecates the Triton backend (a DeprecationWarning at lowering); it still works there.
"""

from __future__ import annotations

import functools
import logging

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

log = logging.getLogger(__name__)

# The Triton-only primitives moved from `pl` to `pallas.triton` (dot, load, store) and the params
# class was renamed (TritonCompilerParams -> CompilerParams); take whichever this jax has.
dot = getattr(pltriton, "dot", None) or pl.dot
load = getattr(pltriton, "load", None) or pl.load
store = getattr(pltriton, "store", None) or pl.store
_CompilerParams = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams


def compiler_params(num_warps: int, num_stages: int) -> pl.CompilerParams:
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_width(n: int) -> int:
    """Triton blocks need power-of-2 sizes, and tl.dot at least 16 along each dimension."""
    return max(16, next_power_of_2(n))


@functools.cache
def _warn_interpret(backend: str) -> None:
    log.warning("Pallas kernels selected but the default backend is %r, not 'gpu': running them in "
                "Pallas interpret mode (correct but slow). Use the 'xla' implementations off GPU.",
                backend)


def default_interpret() -> bool:
    """True (with a one-time warning) when the default backend cannot run Triton kernels."""
    backend = jax.default_backend()
    if backend == "gpu":
        return False
    _warn_interpret(backend)
    return True
