"""Pallas (Triton) GPU kernels for the hot paths of an HRM training step.

One file per kernel, each with the kernel, its `custom_vjp` wrapper and a plain-jnp `*_reference`:
attention.py (non-causal attention, flash-attention-2 backward), rms_norm.py (residual add +
RMSNorm), swiglu.py (silu(gate) * up). HRMConfig.attention_impl / norm_impl = "pallas" selects the
first two in hrm_jax.layers; off GPU they run in Pallas interpret mode (common.default_interpret).
"""
