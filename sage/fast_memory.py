"""A fast-weight associative memory: a low-rank sidecar that a served model reads from and that
salient experiences write into, between (not during) weight updates.

State: key matrix U and value matrix V in R^{d x r} (r slots), slot usage u in R^r, and an
eligibility trace e in R^r. With k^ = k / ||k||:

    read:   a = softmax(U^T k^ / T),   r = V a                                       (in R^d)
    write (k, v, gate g), committed only when g reaches the adaptive threshold (the
    `gate_quantile` of the last `gate_window` gates offered):
            s = U^T k^;  w = softmax(s / T) if max(s) >= tau  (the key is known: update its slots)
                             else one_hot(argmin u)           (a new key: take the least-used slot)
            p_j = min(eta g w_j, 1)                                                (the write's step per slot)
            U[:, j] <- normalise(U[:, j] + p_j (k^ - U[:, j]))                     (keys: unit columns)
            V <- (1 - delta) V (I - diag(p)) + eta g v (w + kappa e)^T            (Hebbian outer product)
            V[:, j] <- V[:, j] * min(1, c / ||V[:, j]||)                           (cap, not normalise)
            u <- (1 - delta) u + w;   e <- lambda e + w

The factor (I - diag(p)) forgets in proportion to how strongly a slot is being rewritten (a slot
reallocated to a new key gives up its old value); delta is the global decay of every trace.
`begin_episode()` zeroes e, so the trace binds the items of one episode: a later item's value is
also written, with weight kappa lambda^(distance), into the slots of the earlier ones, and reading
an episode's first key recalls some of what followed it.

Why the value columns are capped and not normalised. The public fast-weight memory this design
follows scaled each write by the salience gate and then renormalised every column to unit norm.
A column written once holds g v, and g v / ||g v|| = v / ||v|| for every g > 0: the gate vanished
from the stored trace, so a barely salient experience was remembered exactly as strongly as the
most salient one. Here the strength lives in V's column norms, which the gate sets (eta g ||v||
for a single write) and the decay delta wears down; the cap c only shrinks a column past c, so it
bounds the state without touching any trace below it. Only the key columns are normalised, which
makes the address a cosine similarity; there the gate still acts, as the step size
min(eta g w_j, 1) towards the key (a weakly gated write moves the slot's key less, so it is also
addressed less sharply). tests/test_fast_memory.py measures both effects.

Where the read-out enters HRM: HRM already prepends `puzzle_emb_len` positions filled from a
per-puzzle embedding row ([batch, puzzle_emb_ndim], hrm_jax.model.gather_puzzle_rows feeding
act_segment). A memory with d = puzzle_emb_ndim supplies that row from r = V a, keyed by an
encoding of the input, so the model attends to the memory at a prepended position without any
change to its layers (zero while the memory is empty). The torch training step takes such rows
opt-in (export/torch_train.py, batch["puzzle_rows"]); benchmarks/memory_readout.py measures it on a
recall task, and BUILD_NOTES.md ("Memory and sleep") has the result and the decision.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np


class FastMemoryError(ValueError):
    """Bad configuration, a key/value of the wrong shape, or a file that is not a saved memory."""


@dataclasses.dataclass(frozen=True)
class FastMemoryConfig:
    """Sizes and rates (symbols as the module docstring)."""

    dim: int  # d
    slots: int  # r
    temperature: float = 0.05  # T
    write_rate: float = 1.0  # eta
    decay: float = 0.005  # delta, per committed write
    match_threshold: float = 0.8  # tau
    trace_decay: float = 0.5  # lambda
    trace_gain: float = 0.3  # kappa
    max_value_norm: float = 4.0  # c
    gate_quantile: float = 0.5
    gate_window: int = 256
    gate_warmup: int = 16  # offers before the threshold applies (everything commits until then)
    seed: int = 0  # the random initial keys

    def __post_init__(self) -> None:
        if self.dim < 1 or self.slots < 1:
            raise FastMemoryError(f"dim and slots must be >= 1, got {self.dim}, {self.slots}")
        if self.temperature <= 0 or self.write_rate <= 0 or self.max_value_norm <= 0:
            raise FastMemoryError("temperature, write_rate and max_value_norm must be > 0")
        for name in ("decay", "trace_decay", "gate_quantile"):
            if not 0 <= getattr(self, name) <= 1:
                raise FastMemoryError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not -1 <= self.match_threshold <= 1 or self.trace_gain < 0 or self.gate_window < 1 or self.gate_warmup < 0:
            raise FastMemoryError("match_threshold must be in [-1, 1], trace_gain >= 0, gate_window >= 1, "
                                  "gate_warmup >= 0")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x)
    if norm == 0 or not np.isfinite(norm):
        raise FastMemoryError("a key must be a finite, non-zero vector")
    return x / norm


class FastMemory:
    """The memory (see the module docstring)."""

    _ARRAYS = ("keys", "values", "usage", "trace")

    def __init__(self, config: FastMemoryConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        keys = rng.standard_normal((config.dim, config.slots))
        self.keys = keys / np.linalg.norm(keys, axis=0)  # U [d, r], unit columns
        self.values = np.zeros((config.dim, config.slots))  # V [d, r]
        self.usage = np.zeros(config.slots)
        self.trace = np.zeros(config.slots)
        self.gates: collections.deque = collections.deque(maxlen=config.gate_window)

    def _vector(self, x, name: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size != self.config.dim:
            raise FastMemoryError(f"{name} has {x.size} values; this memory has dim={self.config.dim}")
        return x

    def attention(self, key) -> np.ndarray:
        """a = softmax(U^T k^ / T), [r]."""
        return _softmax(self.keys.T @ _unit(self._vector(key, "key")) / self.config.temperature)

    def read(self, key) -> np.ndarray:
        """r = V a, [d]."""
        return self.values @ self.attention(key)

    @property
    def threshold(self) -> float:
        """The gate a write must reach now (0 during warm-up)."""
        if len(self.gates) < max(self.config.gate_warmup, 1):
            return 0.0
        return float(np.quantile(np.asarray(self.gates), self.config.gate_quantile))

    def begin_episode(self) -> None:
        """Starts a new episode: later writes no longer bind to earlier items."""
        self.trace = np.zeros_like(self.trace)

    def write(self, key, value, gate: float) -> bool:
        """Offers an association with salience gate in [0, 1]; commits it when the gate reaches the
        adaptive threshold. Returns whether it was committed."""
        if not 0 <= gate <= 1:
            raise FastMemoryError(f"gate must be in [0, 1], got {gate}")
        k, v = _unit(self._vector(key, "key")), self._vector(value, "value")
        commit = gate >= self.threshold and gate > 0
        self.gates.append(float(gate))
        if commit:
            self._commit(k, v, float(gate))
        return commit

    def _address(self, k: np.ndarray) -> np.ndarray:
        similarity = self.keys.T @ k
        if similarity.max() >= self.config.match_threshold:
            return _softmax(similarity / self.config.temperature)
        return np.eye(self.config.slots)[np.argmin(self.usage)]

    def _commit(self, k: np.ndarray, v: np.ndarray, gate: float) -> None:
        c = self.config
        w = self._address(k)
        step = np.minimum(c.write_rate * gate * w, 1.0)
        keys = self.keys + step * (k[:, None] - self.keys)
        norms = np.linalg.norm(keys, axis=0)
        # A column can only reach zero norm when it was the exact opposite of k and step is 1/2; keep it.
        self.keys = np.where(norms > 1e-12, keys / np.maximum(norms, 1e-12), self.keys)
        values = ((1 - c.decay) * self.values * (1 - step)
                  + c.write_rate * gate * np.outer(v, w + c.trace_gain * self.trace))
        value_norms = np.linalg.norm(values, axis=0)
        self.values = values * np.minimum(1.0, c.max_value_norm / np.maximum(value_norms, 1e-300))
        self.usage = (1 - c.decay) * self.usage + w
        self.trace = c.trace_decay * self.trace + w

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the whole state to an .npz file (atomically: a temporary file, then a rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp.npz"
        np.savez(tmp, config=np.array(json.dumps(dataclasses.asdict(self.config))),
                 gates=np.asarray(self.gates, dtype=np.float64), **{n: getattr(self, n) for n in self._ARRAYS})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FastMemory:
        try:
            with np.load(os.fspath(path), allow_pickle=False) as data:
                memory = cls(FastMemoryConfig(**json.loads(str(data["config"]))))
                for name in cls._ARRAYS:
                    setattr(memory, name, np.array(data[name]))
                memory.gates.extend(data["gates"].tolist())
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise FastMemoryError(f"{path}: not a saved FastMemory ({err})") from None
        return memory


def recall_accuracy(memory: FastMemory, keys: np.ndarray, candidates: np.ndarray) -> float:
    """Fraction of keys [n, d] whose read-out is most cosine-similar to candidates[i] (key i's own
    value) among all candidates [m >= n, d] (the other stored values: the distractors)."""
    unit = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    hits = 0
    for i, key in enumerate(keys):
        out = memory.read(key)
        hits += int(np.linalg.norm(out) > 0 and np.argmax(unit @ out) == i)
    return hits / len(keys)
