"""Pallas GPU kernels for the hot paths of an HRM training step.

One file per kernel, each with the kernel, its `custom_vjp` wrapper and a plain-jnp `*_reference`:
attention.py (non-causal attention, flash-attention-2 backward) and rms_norm.py (residual add +
RMSNorm) on the Triton backend; swiglu_matmul.py (silu(x W_gate) * (x W_up) in one Hopper matmul,
forward only) on Mosaic GPU, with the helpers the Mosaic kernels share in mosaic.py.
HRMConfig.attention_impl / norm_impl / mlp_impl = "pallas" selects them in hrm_jax.layers; off GPU
they run in Pallas interpret mode (common.default_interpret). Kernels measured and dropped (a
Triton fused SwiGLU, a Triton SwiGLU + add + RMSNorm, a Mosaic projection + add + RMSNorm) are in
BUILD_NOTES, "GPU speed", with the commits that hold them.
"""
