"""The configuration tree of a run: what is trained (the model), how it is optimised, how the loop runs.

    RunConfig(model=HRMConfig(...), optim=OptimConfig(...), loop=LoopConfig(...))

Model and optimizer field names and defaults follow the reference (sapientinc/HRM,
models/hrm/hrm_act_v1.py, config/arch/hrm_v1.yaml, config/cfg_pretrain.yaml) so that configs and
checkpoints map 1:1. A checkpoint stores the whole tree; resuming compares the model (kernel choices
aside) and the optimizer, which fix the numbers, and lets the loop settings change (they drive the
run). The named configurations of the paper's experiments are in hrm_jax/presets.py.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

PosEncoding = Literal["rope", "learned"]
ForwardDtype = Literal["bfloat16", "float16", "float32"]
# cudnn: fused attention on NVIDIA GPUs, bf16/fp16 only. pallas: kernels_pallas (Triton kernels;
# off GPU they run in Pallas interpret mode, correct but slow).
AttentionImpl = Literal["xla", "cudnn", "pallas"]
NormImpl = Literal["xla", "pallas"]  # the residual add + RMSNorm of each block
MlpImpl = Literal["xla", "pallas"]  # silu(x @ W_gate) * (x @ W_up) of each block ("pallas": Hopper only)
POS_ENCODINGS = typing.get_args(PosEncoding)
FORWARD_DTYPES = typing.get_args(ForwardDtype)
ATTENTION_IMPLS = typing.get_args(AttentionImpl)
NORM_IMPLS = typing.get_args(NormImpl)
MLP_IMPLS = typing.get_args(MlpImpl)
# Model fields that choose how, not what, is computed: a run may resume or evaluate with other kernels.
IMPLEMENTATION_FIELDS = ("attention_impl", "norm_impl", "mlp_impl")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def check_implementation_fields(config: Any) -> None:
    """The kernel choices (IMPLEMENTATION_FIELDS) of a model config, whatever its family: known values, and the
    low-precision dtypes that cudnn attention and the pallas SwiGLU kernel need."""
    require(config.attention_impl in ATTENTION_IMPLS, "attention_impl",
             f"must be one of {ATTENTION_IMPLS}, got {config.attention_impl!r}")
    require(config.attention_impl != "cudnn" or config.forward_dtype in ("bfloat16", "float16"),
             "attention_impl", "cudnn attention needs forward_dtype bfloat16 or float16")
    require(config.norm_impl in NORM_IMPLS, "norm_impl", f"must be one of {NORM_IMPLS}, got {config.norm_impl!r}")
    require(config.mlp_impl in MLP_IMPLS, "mlp_impl", f"must be one of {MLP_IMPLS}, got {config.mlp_impl!r}")
    require(config.mlp_impl != "pallas" or config.forward_dtype in ("bfloat16", "float16"),
             "mlp_impl", "the pallas SwiGLU kernel needs forward_dtype bfloat16 or float16")


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError("field: message") unless `condition`: the one form of every config check's error."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def swiglu_width(expansion: float, features: int) -> int:
    """The reference's SwiGLU inner width for `features` wide inputs: round(expansion * features * 2/3), rounded
    up to a multiple of 256 (models/layers.py `_find_multiple`)."""
    inter = round(expansion * features * 2 / 3)
    return -(-inter // 256) * 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_fields(config: Any, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """The checks of a model config that both families make (each config adds its own): whole numbers for the
    `positive` (>= 1) and `non_negative` (>= 0) fields, heads that divide the hidden size, a positive expansion,
    norm epsilon and rope theta, an exploration probability, a known forward dtype and the kernel choices."""
    for name in positive:
        value = getattr(config, name)
        require(_is_int(value) and value >= 1, name, f"must be a positive integer, got {value!r}")
    for name in non_negative:
        value = getattr(config, name)
        require(_is_int(value) and value >= 0, name, f"must be an integer >= 0, got {value!r}")
    require(config.hidden_size % config.num_heads == 0, "hidden_size",
            f"{config.hidden_size} is not divisible by num_heads={config.num_heads}; "
            "choose num_heads that divides hidden_size")
    require(config.expansion > 0, "expansion", f"must be > 0, got {config.expansion!r}")
    require(config.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {config.rms_norm_eps!r}")
    require(config.rope_theta > 0, "rope_theta", f"must be > 0, got {config.rope_theta!r}")
    require(0.0 <= config.halt_exploration_prob <= 1.0, "halt_exploration_prob",
            f"must be in [0, 1], got {config.halt_exploration_prob!r}")
    require(config.forward_dtype in FORWARD_DTYPES, "forward_dtype",
            f"must be one of {FORWARD_DTYPES}, got {config.forward_dtype!r}")
    check_implementation_fields(config)


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
    pos_encodings: PosEncoding = "rope"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    halt_max_steps: int
    halt_exploration_prob: float

    forward_dtype: ForwardDtype = "bfloat16"
    # How, not what, is computed (IMPLEMENTATION_FIELDS); the speed of each choice is in BUILD_NOTES.md.
    attention_impl: AttentionImpl = dataclasses.field(default="xla", metadata={
        "help": "attention kernel; cudnn and pallas (NVIDIA GPUs, bf16) make the Sudoku step 1.3x faster on an H100"})
    norm_impl: NormImpl = dataclasses.field(default="xla", metadata={
        "help": "residual add + RMSNorm; pallas: a fused Triton kernel"})
    mlp_impl: MlpImpl = dataclasses.field(default="xla", metadata={
        "help": "silu(x W_gate) * (x W_up); pallas: one Mosaic GPU matmul with the activation in its epilogue "
                "(Hopper GPUs, bf16)"})

    def __post_init__(self) -> None:
        check_model_fields(self, positive=("seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles",
                                           "H_layers", "L_layers", "hidden_size", "num_heads", "halt_max_steps"),
                           non_negative=("puzzle_emb_ndim",))
        require(self.head_dim % 2 == 0, "num_heads", f"head_dim={self.head_dim} must be even for rotary embeddings")
        require(self.pos_encodings in POS_ENCODINGS, "pos_encodings",
                f"must be one of {POS_ENCODINGS}, got {self.pos_encodings!r}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def puzzle_emb_len(self) -> int:
        """Number of sequence slots the puzzle embedding occupies (ceil(ndim / hidden))."""
        return -(-self.puzzle_emb_ndim // self.hidden_size)

    @property
    def num_puzzle_slots(self) -> int:
        """The same number under the name TRMConfig gives it, for code that serves both families."""
        return self.puzzle_emb_len

    @property
    def total_seq_len(self) -> int:
        """Length of the hidden state sequence: puzzle slots + tokens."""
        return self.seq_len + self.puzzle_emb_len

    @property
    def intermediate_size(self) -> int:
        """SwiGLU width: round(expansion * hidden * 2/3) rounded up to a multiple of 256."""
        return swiglu_width(self.expansion, self.hidden_size)

    def halts(self, q_halt_logits: Any, q_continue_logits: Any) -> Any:
        """Where the Q head asks to stop, without exploration (hrm_act_v1.py): q_halt > q_continue. Elementwise on
        jax, torch or NumPy arrays alike, so that every backend applies this one rule."""
        return q_halt_logits > q_continue_logits

    def replace(self, **changes: Any) -> HRMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimisation hyperparameters and the data schedule (names as the reference's PretrainConfig).

    eval_interval (epochs) also sets how many epochs the sampler draws per pass, as the reference's
    loader does, so it changes the batches and belongs here rather than in LoopConfig.
    """

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
            require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        require(self.eval_interval is None or self.eval_interval >= 1, "eval_interval",
                 f"must be None or >= 1, got {self.eval_interval!r}")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps!r}")
        for name in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)!r}")
        require(0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio", f"must be in [0, 1], got {self.lr_min_ratio!r}")
        for name in ("beta1", "beta2"):
            require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)!r}")
        require(0.0 <= self.ema_rate < 1.0, "ema_rate", f"must be in [0, 1), got {self.ema_rate!r}")

    def total_steps(self, total_groups: int, mean_puzzle_examples: float) -> int:
        """Optimizer steps of a run, as the reference's pretrain.py estimates them."""
        return int(self.epochs * total_groups * mean_puzzle_examples / self.global_batch_size)

    def replace(self, **changes: Any) -> OptimConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The name the optimizer config had before the run configuration became a tree; kept for callers.
TrainConfig = OptimConfig


def _optional_at_least(value: Any, minimum: int, field: str) -> None:
    require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum),
             field, f"must be None or an integer >= {minimum}, got {value!r}")


def _field(default: Any, help: str) -> Any:
    """A field whose `help` the CLIs show (hrm_jax/cli.py generates the flags from the fields)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How a run is driven: where it writes, how often it evaluates, logs and saves, when it stops.

    None of these change the numbers a step computes, so a resumed run may change any of them.
    """

    out_dir: str | None = _field(None, "run folder (the CLIs default to runs/<task>-<time>; train() needs one)")
    total_steps: int | None = _field(None, "schedule length (default: the reference's estimate from the data)")
    max_steps: int | None = _field(None, "stop (resumably) after this step even if the schedule is longer")
    eval_every: int | None = _field(None, "steps between evaluations (default: eval_interval epochs; last step too)")
    eval_split: str | None = _field("test", "split of the data folder to evaluate on (missing: no evaluation)")
    eval_batch_size: int | None = _field(None, "evaluation batch size (default: the global batch size)")
    eval_max_batches: int | None = _field(None, "evaluate only this many batches (a quick look at a large set)")
    checkpoint_every: int | None = _field(None, "steps between periodic checkpoints (besides one at every evaluation, "
                                                "the last step and a SIGTERM/SIGINT stop)")
    checkpoint_minutes: float | None = _field(10.0, "save a checkpoint at least this often, in minutes of wall time "
                                                    "(0 or None: off)")
    keep_checkpoints: int = _field(3, "periodic checkpoints kept (the best one is kept apart in out_dir/best)")
    resume: bool = _field(False, "continue from out_dir's latest intact checkpoint (refused if out_dir holds a run "
                                 "without one; an empty out_dir starts a new run)")
    restart: bool = _field(False, "move a previous run in out_dir aside to <out_dir>.old-<time> and start anew")
    early_stop_exact: float | None = _field(None, "stop once a log window's training exact accuracy reaches this "
                                                  "(the reference README warns of late instability)")
    log_every: int = _field(10, "steps per metrics.jsonl train record (the mean over the window)")
    devices: int | None = _field(1, "split each batch over N local GPUs (data parallel; None or 'all': every one; "
                                    "a multi-process run uses N per process); the global and evaluation batch sizes "
                                    "must divide by the total; results match one device")
    progress: bool = _field(True, "a tqdm bar (loss, token/exact accuracy, steps/s)")
    tensorboard: bool = _field(False, "also write TensorBoard scalars (needs tensorboard or tensorboardX)")

    def __post_init__(self) -> None:
        for name in ("total_steps", "max_steps", "eval_every", "eval_batch_size", "eval_max_batches",
                     "checkpoint_every", "devices"):
            _optional_at_least(getattr(self, name), 1, name)
        for name in ("keep_checkpoints", "log_every"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        require(self.early_stop_exact is None or 0.0 <= self.early_stop_exact <= 1.0, "early_stop_exact",
                 f"must be None or in [0, 1], got {self.early_stop_exact!r}")
        require(self.checkpoint_minutes is None or self.checkpoint_minutes >= 0, "checkpoint_minutes",
                 f"must be None or >= 0, got {self.checkpoint_minutes!r}")
        require(not (self.resume and self.restart), "restart",
                 "excludes resume: resume continues the run in out_dir, restart moves it aside")

    def replace(self, **changes: Any) -> LoopConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: `model` (HRMConfig, or another family's config: see hrm_jax/family.py), `optim`, `loop`."""

    model: Any
    optim: OptimConfig = OptimConfig()
    loop: LoopConfig = LoopConfig()

    def __post_init__(self) -> None:
        require(dataclasses.is_dataclass(self.model) and not isinstance(self.model, type), "model",
                 f"must be a model config such as HRMConfig, got {type(self.model).__name__}")
        require(isinstance(self.optim, OptimConfig), "optim", f"must be an OptimConfig, got {self.optim!r}")
        require(isinstance(self.loop, LoopConfig), "loop", f"must be a LoopConfig, got {self.loop!r}")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with whole parts replaced: run.replace(loop=run.loop.replace(max_steps=10))."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "optim": self.optim.to_dict(), "loop": self.loop.to_dict()}
