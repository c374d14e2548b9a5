"""The type aliases shared by the model, the losses, the loop and evaluation."""

from typing import Any

import jax

Params = dict[str, Any]  # {"dense", "buffers", "puzzle_emb"?}: see hrm_jax/model.py
Batch = dict[str, jax.Array]  # int32 "inputs"/"labels" [batch, seq_len], "puzzle_identifiers" [batch]
Metrics = dict[str, jax.Array]  # f32 scalars (or per-row arrays in evaluation)
