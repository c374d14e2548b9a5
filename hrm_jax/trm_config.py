"""Configuration of the Tiny Recursive Model (TRM); its paper's experiments are in hrm_jax/presets.py.

Field names and defaults follow the reference (SamsungSAILMontreal/TinyRecursiveModels,
models/recursive_reasoning/trm.py `TinyRecursiveReasoningModel_ACTV1Config` and config/arch/trm.yaml),
so the `arch` section of a reference run's all_config.yaml maps onto `TRMConfig` one to one (less
`name`, `loss` and `batch_size`, which are trainer settings there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from hrm_jax.config import check_model_fields, require, swiglu_width

TRM_POS_ENCODINGS = ("rope", "learned", "none")
# Keys of a reference arch section that are not architecture (see `TRMConfig.from_reference_arch`).
_REFERENCE_NON_ARCH_KEYS = ("name", "loss", "batch_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TRMConfig:
    """Architecture of TRM ACT-v1: one network of L_layers blocks updates both latents.

    H_layers is accepted for configuration compatibility and unused (as in the reference).
    puzzle_emb_len: sequence slots prepended for the puzzle embedding; 0 means ceil(ndim / hidden)
    as HRM. The implementation fields (attention_impl, norm_impl, mlp_impl) are HRMConfig's.
    """

    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int
    puzzle_emb_ndim: int = 0
    puzzle_emb_len: int = 16

    H_cycles: int
    L_cycles: int
    H_layers: int = 0
    L_layers: int

    hidden_size: int
    expansion: float
    num_heads: int
    pos_encodings: Literal["rope", "learned", "none"] = "rope"
    mlp_t: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    halt_max_steps: int
    halt_exploration_prob: float
    no_ACT_continue: bool = True

    forward_dtype: str = "bfloat16"
    attention_impl: str = "xla"
    norm_impl: str = "xla"
    mlp_impl: str = "xla"

    def __post_init__(self) -> None:
        check_model_fields(self, positive=("seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles",
                                           "L_layers", "hidden_size", "num_heads", "halt_max_steps"),
                           non_negative=("puzzle_emb_ndim", "puzzle_emb_len", "H_layers"))
        for name in ("mlp_t", "no_ACT_continue"):
            require(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        # The reference's carry has puzzle_emb_len extra positions but adds an embedding without
        # them when there is no puzzle embedding: the shapes would not match.
        require(self.puzzle_emb_ndim > 0 or self.puzzle_emb_len == 0, "puzzle_emb_len",
                f"is {self.puzzle_emb_len} but puzzle_emb_ndim is 0; set puzzle_emb_len=0 without a puzzle embedding")
        require(self.puzzle_emb_len == 0 or self.puzzle_emb_len * self.hidden_size >= self.puzzle_emb_ndim,
                "puzzle_emb_len", f"{self.puzzle_emb_len} slots of {self.hidden_size} cannot hold puzzle_emb_ndim="
                f"{self.puzzle_emb_ndim}; raise puzzle_emb_len or set it to 0 (derived)")
        require(self.pos_encodings in TRM_POS_ENCODINGS, "pos_encodings",
                f"must be one of {TRM_POS_ENCODINGS}, got {self.pos_encodings!r}")
        require(self.pos_encodings != "rope" or self.head_dim % 2 == 0, "num_heads",
                f"head_dim={self.head_dim} must be even for rotary embeddings")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_puzzle_slots(self) -> int:
        """Positions prepended for the puzzle embedding: puzzle_emb_len, or ceil(ndim / hidden) if it is 0."""
        return self.puzzle_emb_len or -(-self.puzzle_emb_ndim // self.hidden_size)

    @property
    def total_seq_len(self) -> int:
        """Length of the latent sequences z_H, z_L: puzzle slots + tokens."""
        return self.seq_len + self.num_puzzle_slots

    @property
    def intermediate_size(self) -> int:
        """Channel SwiGLU width: round(expansion * hidden * 2/3) rounded up to a multiple of 256."""
        return swiglu_width(self.expansion, self.hidden_size)

    @property
    def sequence_intermediate_size(self) -> int:
        """Width of the mlp_t SwiGLU, which mixes the total_seq_len positions."""
        return swiglu_width(self.expansion, self.total_seq_len)

    def halts(self, q_halt_logits: Any, q_continue_logits: Any) -> Any:
        """Where the Q head asks to stop, without exploration (trm.py): q_halt > 0 with no_ACT_continue, else
        HRM's q_halt > q_continue. Elementwise on jax, torch or NumPy arrays alike (every backend's one rule)."""
        if self.no_ACT_continue:
            return q_halt_logits > 0
        return q_halt_logits > q_continue_logits

    def replace(self, **changes: Any) -> TRMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_reference_arch(cls, arch: dict[str, Any], **task: Any) -> TRMConfig:
        """From a reference run's `arch` section (all_config.yaml), the task sizes given or included."""
        fields = {k: v for k, v in arch.items() if k not in _REFERENCE_NON_ARCH_KEYS}
        fields.update(task)
        return cls(**fields)
