"""What the Pallas Mosaic GPU kernels (swiglu_matmul) share.

They use wgmma and TMA, so they need a Hopper GPU; off GPU they run in Pallas' GPU interpret mode,
which simulates warpgroups, shared memory, TMA copies, barriers and wgmma on the CPU (and reports
races and barrier misuse), or are only lowered to Mosaic GPU IR (tests with an abstract H100).
"""

from __future__ import annotations

import jax

# Persistent CTAs in interpret mode, where there are no SMs to count.
INTERPRET_CTAS = 2


def num_ctas(interpret: bool) -> int:
    """One persistent CTA per SM: of the current mesh's device (inside shard_map, or an abstract
    GPU when lowering without one), else of the first device. A CPU device, which only lowers the
    kernel in tests, has no SMs to count (its abstract device says num_cores=None)."""
    if interpret:
        return INTERPRET_CTAS
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None and abstract.num_cores:
        return abstract.num_cores
    return getattr(jax.devices()[0], "core_count", None) or INTERPRET_CTAS


def interpret_params(interpret: bool):
    if not interpret:
        return None
    # GPU interpret mode is not public API yet (jax 0.10-0.12 keep it here).
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415  (private path)

    return InterpretGPUParams()


def has_wgmma(device) -> bool:
    """True for an NVIDIA GPU of compute capability 9.0+ (Hopper), which the Mosaic kernels need."""
    return device.platform == "gpu" and float(getattr(device, "compute_capability", 0) or 0) >= 9.0


def check_device(interpret: bool) -> None:
    """A clear error on a GPU without wgmma (Ampere, Jetson Orin). Off GPU (interpret=False there
    only lowers the kernel, as the tests do) there is nothing to check."""
    device = jax.devices()[0]
    if interpret or device.platform != "gpu":
        return
    capability = getattr(device, "compute_capability", None)
    if not has_wgmma(device):
        raise ValueError(f"The Mosaic GPU kernels (mlp_impl='pallas') need an NVIDIA Hopper GPU (compute "
                         f"capability 9.0+); {device.device_kind} has {capability}. Use mlp_impl='xla'.")
