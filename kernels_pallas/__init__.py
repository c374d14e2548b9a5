"""Pallas (Triton) GPU kernels for the hot paths of an HRM training step.

One file per kernel, each with the kernel, its `custom_vjp` wrapper and a plain-jnp `*_reference`:
attention.py (non-causal attention, flash-attention-2 backward) and rms_norm.py (residual add +
RMSNorm). HRMConfig.attention_impl / norm_impl = "pallas" selects them in hrm_jax.layers; off GPU
they run in Pallas interpret mode (common.default_interpret). A fused SwiGLU kernel was measured
no faster than XLA on an H100 and dropped (BUILD_NOTES, "Pallas kernels").
"""
