"""Configuration dataclasses and the paper's presets.

Field names and defaults follow the reference (sapientinc/HRM, models/hrm/hrm_act_v1.py and
config/arch/hrm_v1.yaml, config/cfg_pretrain.yaml) so that configs and checkpoints map 1:1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

POS_ENCODINGS = ("rope", "learned")
FORWARD_DTYPES = ("bfloat16", "float16", "float32")
# cudnn: fused attention on NVIDIA GPUs, bf16/fp16 only. pallas: kernels_pallas (Triton kernels;
# off GPU they run in Pallas interpret mode, correct but slow).
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
NORM_IMPLS = ("xla", "pallas")  # the residual add + RMSNorm of each block
MLP_IMPLS = ("xla", "pallas")  # silu(x @ W_gate) * (x @ W_up) of each block ("pallas": Hopper only)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HRMConfig:
    """Architecture of HRM ACT-v1 (names as the reference's HierarchicalReasoningModel_ACTV1Config)."""

    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int
    puzzle_emb_ndim: int = 0

    H_cycles: int
    L_cycles: int
    H_layers: int
    L_layers: int

    hidden_size: int
    expansion: float
    num_heads: int
    pos_encodings: Literal["rope", "learned"] = "rope"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    halt_max_steps: int
    halt_exploration_prob: float

    forward_dtype: str = "bfloat16"
    attention_impl: str = "xla"
    norm_impl: str = "xla"
    mlp_impl: str = "xla"

    def __post_init__(self) -> None:
        for name in ("seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles",
                     "H_layers", "L_layers", "hidden_size", "num_heads", "halt_max_steps"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     name, f"must be a positive integer, got {value!r}")
        _require(isinstance(self.puzzle_emb_ndim, int) and self.puzzle_emb_ndim >= 0,
                 "puzzle_emb_ndim", f"must be an integer >= 0, got {self.puzzle_emb_ndim!r}")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"{self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                 "choose num_heads that divides hidden_size")
        _require((self.hidden_size // self.num_heads) % 2 == 0, "num_heads",
                 f"head_dim={self.hidden_size // self.num_heads} must be even for rotary embeddings")
        _require(self.expansion > 0, "expansion", f"must be > 0, got {self.expansion!r}")
        _require(self.pos_encodings in POS_ENCODINGS, "pos_encodings",
                 f"must be one of {POS_ENCODINGS}, got {self.pos_encodings!r}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
        _require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta!r}")
        _require(0.0 <= self.halt_exploration_prob <= 1.0, "halt_exploration_prob",
                 f"must be in [0, 1], got {self.halt_exploration_prob!r}")
        _require(self.forward_dtype in FORWARD_DTYPES, "forward_dtype",
                 f"must be one of {FORWARD_DTYPES}, got {self.forward_dtype!r}")
        _require(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                 f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _require(self.attention_impl != "cudnn" or self.forward_dtype in ("bfloat16", "float16"),
                 "attention_impl", "cudnn attention needs forward_dtype bfloat16 or float16")
        _require(self.norm_impl in NORM_IMPLS, "norm_impl",
                 f"must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        _require(self.mlp_impl in MLP_IMPLS, "mlp_impl", f"must be one of {MLP_IMPLS}, got {self.mlp_impl!r}")
        _require(self.mlp_impl != "pallas" or self.forward_dtype in ("bfloat16", "float16"),
                 "mlp_impl", "the pallas SwiGLU kernel needs forward_dtype bfloat16 or float16")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def puzzle_emb_len(self) -> int:
        """Number of sequence slots the puzzle embedding occupies (ceil(ndim / hidden))."""
        return -(-self.puzzle_emb_ndim // self.hidden_size)

    @property
    def total_seq_len(self) -> int:
        """Length of the hidden state sequence: puzzle slots + tokens."""
        return self.seq_len + self.puzzle_emb_len

    @property
    def intermediate_size(self) -> int:
        """SwiGLU width: round(expansion * hidden * 2/3) rounded up to a multiple of 256."""
        inter = round(self.expansion * self.hidden_size * 2 / 3)
        return -(-inter // 256) * 256

    def replace(self, **changes: Any) -> "HRMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation hyperparameters (names as the reference's PretrainConfig)."""

    global_batch_size: int = 768
    epochs: int = 20000
    eval_interval: int | None = 2000
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 2000
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    puzzle_emb_lr: float = 1e-4
    puzzle_emb_weight_decay: float = 1.0
    seed: int = 0
    # An exponential moving average of the dense parameters (TRM's pretrain.py `ema`, `ema_rate`),
    # updated after every optimizer step; evaluation, best/ and exports then use it (hrm_jax.ema).
    ema: bool = False
    ema_rate: float = 0.999

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "epochs"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        _require(self.eval_interval is None or self.eval_interval >= 1, "eval_interval",
                 f"must be None or >= 1, got {self.eval_interval!r}")
        _require(self.lr_warmup_steps >= 0, "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps!r}")
        for name in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)!r}")
        _require(0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio", f"must be in [0, 1], got {self.lr_min_ratio!r}")
        for name in ("beta1", "beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)!r}")
        _require(0.0 <= self.ema_rate < 1.0, "ema_rate", f"must be in [0, 1), got {self.ema_rate!r}")

    def total_steps(self, total_groups: int, mean_puzzle_examples: float) -> int:
        """Optimizer steps of a run, as the reference's pretrain.py estimates them."""
        return int(self.epochs * total_groups * mean_puzzle_examples / self.global_batch_size)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets ----------------------------------------------------------------------------------
# The architecture of config/arch/hrm_v1.yaml: 512 hidden, 8 heads, 4+4 layers, 2x2 cycles,
# 16 ACT steps, exploration 0.1, puzzle embedding as wide as the hidden state.
def _hrm_v1(**task: Any) -> HRMConfig:
    arch = dict(H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, expansion=4.0,
                num_heads=8, pos_encodings="rope", halt_max_steps=16, halt_exploration_prob=0.1,
                puzzle_emb_ndim=512)
    arch.update(task)
    return HRMConfig(**arch)


def sudoku_extreme(**overrides: Any) -> HRMConfig:
    """Sudoku-Extreme: 81 cells, vocab 11 (pad, blank, digits 1-9), one puzzle identifier."""
    return _hrm_v1(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, **overrides)


def maze_hard(**overrides: Any) -> HRMConfig:
    """Maze-Hard 30x30: 900 cells, vocab 6 (pad + '# SGo'), one puzzle identifier."""
    return _hrm_v1(seq_len=900, vocab_size=6, num_puzzle_identifiers=1, **overrides)


def arc(num_puzzle_identifiers: int = 1, **overrides: Any) -> HRMConfig:
    """ARC: 30x30 grids (900 tokens), vocab 12 (pad, eos, colours 0-9).

    num_puzzle_identifiers comes from the built dataset (one per task x augmentation).
    """
    return _hrm_v1(seq_len=900, vocab_size=12, num_puzzle_identifiers=num_puzzle_identifiers, **overrides)


def sudoku_edge(**overrides: Any) -> HRMConfig:
    """The shipped Sudoku model: HRM ACT-v1 at 256 wide with 2+2 layers (3.4M parameters), 16 ACT
    steps, no puzzle embedding (Sudoku has one identifier). Small enough to solve a puzzle in about
    a tenth of a second on two CPU cores with early halting; trained on mixed-difficulty data
    (hrm_jax.data.sudoku_mix)."""
    arch = dict(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, H_cycles=2, L_cycles=2, H_layers=2,
                L_layers=2, hidden_size=256, expansion=4.0, num_heads=4, pos_encodings="rope", halt_max_steps=16,
                halt_exploration_prob=0.1, puzzle_emb_ndim=0)
    arch.update(overrides)
    return HRMConfig(**arch)


MODEL_PRESETS = {"sudoku_extreme": sudoku_extreme, "maze_hard": maze_hard, "arc": arc, "sudoku_edge": sudoku_edge}

# Training hyperparameters as the reference README runs them.
TRAIN_PRESETS = {
    # 8 GPUs: global batch 768, lr 1e-4, weight decay 1.0 for both optimizers.
    "sudoku_extreme": TrainConfig(epochs=20000, eval_interval=2000, lr=1e-4, puzzle_emb_lr=1e-4,
                                  weight_decay=1.0, puzzle_emb_weight_decay=1.0),
    # The README's single-GPU demo: global batch 384, lr 7e-5.
    "sudoku_extreme_1gpu": TrainConfig(global_batch_size=384, epochs=20000, eval_interval=2000, lr=7e-5,
                                       puzzle_emb_lr=7e-5, weight_decay=1.0, puzzle_emb_weight_decay=1.0),
    "maze_hard": TrainConfig(epochs=20000, eval_interval=2000, lr=1e-4, puzzle_emb_lr=1e-4,
                             weight_decay=1.0, puzzle_emb_weight_decay=1.0),
    # cfg_pretrain.yaml defaults (the ARC runs): 100k epochs, weight decay 0.1, puzzle_emb_lr 1e-2.
    # The shipped model's recipe: tens of thousands of distinct puzzles instead of 1,000, so weight decay
    # 0.1 rather than 1.0 and a higher constant learning rate for the small model.
    "sudoku_edge": TrainConfig(global_batch_size=768, epochs=2000, eval_interval=None, lr=2e-4, lr_warmup_steps=1000,
                               weight_decay=0.1, puzzle_emb_lr=1e-4, puzzle_emb_weight_decay=0.1),
    "arc": TrainConfig(epochs=100000, eval_interval=10000, lr=1e-4, puzzle_emb_lr=1e-2,
                       weight_decay=0.1, puzzle_emb_weight_decay=0.1),
}


def tiny(seq_len: int = 81, vocab_size: int = 11, num_puzzle_identifiers: int = 1, **overrides: Any) -> HRMConfig:
    """A CPU-sized config for quick starts and tests (float32 compute)."""
    arch = dict(seq_len=seq_len, vocab_size=vocab_size, num_puzzle_identifiers=num_puzzle_identifiers,
                H_cycles=2, L_cycles=2, H_layers=2, L_layers=2, hidden_size=64, expansion=4.0,
                num_heads=4, pos_encodings="rope", halt_max_steps=4, halt_exploration_prob=0.1,
                puzzle_emb_ndim=0, forward_dtype="float32")
    arch.update(overrides)
    return HRMConfig(**arch)

