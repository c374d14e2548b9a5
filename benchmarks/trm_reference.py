"""Import the TRM reference's own modules from a checkout of SamsungSAILMontreal/TinyRecursiveModels, and
build its model holding hrm_jax parameters (`model`).

For tests/test_trm_reference_checkout.py and benchmarks/trm_train_step.py. Only these files of the
checkout are imported: models/recursive_reasoning/trm.py, models/layers.py, models/common.py,
models/sparse_embedding.py, models/losses.py, models/ema.py; they need torch and einops. Their one
other import is pydantic (trm.py's config class); where it is not installed a stand-in BaseModel
takes its place: it sets the keyword arguments as attributes over the class defaults and refuses
missing fields, which is all trm.py asks of it. The checkout's `models` package is imported under
its own name; with keep=False it is removed from sys.modules again afterwards, so that HRM's checkout
(also `models`) can be imported in the same process, but torch.compile needs keep=True: dynamo
re-imports the modules of the code it traces by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from hrm_jax.config import IMPLEMENTATION_FIELDS

REQUIRED_FILE = Path("models") / "recursive_reasoning" / "trm.py"
_MODULES = {"trm": "models.recursive_reasoning.trm", "losses": "models.losses",
            "sparse": "models.sparse_embedding", "ema": "models.ema"}


class _BaseModel:
    """What trm.py uses of pydantic.BaseModel: keyword construction with class-level defaults."""

    def __init__(self, **data) -> None:
        annotations: dict[str, object] = {}
        for klass in reversed(type(self).__mro__):
            annotations.update(getattr(klass, "__annotations__", {}))
        missing = [name for name in annotations if name not in data and not hasattr(type(self), name)]
        if missing:
            raise TypeError(f"{type(self).__name__}: missing fields {missing}")
        for name, value in data.items():
            setattr(self, name, value)


def pydantic_stand_in() -> types.ModuleType:
    module = types.ModuleType("pydantic")
    module.BaseModel = _BaseModel
    return module


def load(reference_dir: str | Path, *, keep: bool = False) -> types.SimpleNamespace:
    """SimpleNamespace(trm, losses, sparse, ema, stand_in) of the checkout at `reference_dir`.

    keep: leave the checkout's `models` (and the pydantic stand-in) in sys.modules (for torch.compile)."""
    root = Path(reference_dir)
    if not (root / REQUIRED_FILE).is_file():
        raise FileNotFoundError(f"{root}: not a TinyRecursiveModels checkout (no {REQUIRED_FILE})")
    stand_in = importlib.util.find_spec("pydantic") is None
    saved = {name: module for name, module in sys.modules.items() if name == "models" or name.startswith("models.")}
    for name in saved:
        del sys.modules[name]
    if stand_in:
        sys.modules["pydantic"] = pydantic_stand_in()
    sys.path.insert(0, str(root))
    try:
        loaded = {key: importlib.import_module(name) for key, name in _MODULES.items()}
    finally:
        sys.path.remove(str(root))
        if not keep:
            for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
                del sys.modules[name]
            sys.modules.update(saved)
            if stand_in:
                del sys.modules["pydantic"]
    return types.SimpleNamespace(**loaded, stand_in=stand_in)


def model(ref: types.SimpleNamespace, config: Any, params: Any, batch_size: int, device: str = "cpu"):
    """The checkout's ACTLossHead(TinyRecursiveReasoningModel_ACTV1) for TRMConfig `config`, holding hrm_jax
    `params` (export.convert), on `device`. Its config dict is ours: TRMConfig's fields carry its names; the
    kernel choices are hrm_jax's alone."""
    import torch  # noqa: PLC0415  (torch is optional for the JAX side of benchmarks/trm_train_step.py)

    from export.convert import to_torch_state_dict  # noqa: PLC0415  (imports torch)

    arch = {k: v for k, v in config.to_dict().items() if k not in IMPLEMENTATION_FIELDS} | {"batch_size": batch_size}
    with torch.device(device):
        head = ref.losses.ACTLossHead(ref.trm.TinyRecursiveReasoningModel_ACTV1(arch), "stablemax_cross_entropy")
    state = to_torch_state_dict(params, config)
    head.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return head
