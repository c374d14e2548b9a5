"""Package data: the models shipped with hrm-jax, one folder each (see hrm_jax.pretrained)."""
