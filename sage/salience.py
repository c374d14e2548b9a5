"""SNARC salience: how much an experience deserves to be remembered, scored online per stream.

Each stream (a sensor, or the puzzles a server answers) delivers one feature vector x_t per step.
Every score lies in [0, 1]; rank(v | H) is the mid-rank of v among a window H of past values,
(#{h < v} + #{h = v} / 2) / |H|, which is scale-free and needs no distribution assumption.

- Surprise. An EMA predictor p_t = (1 - a) p_{t-1} + a x_t (p_0 = x_0) predicts the next vector;
  its error is e_t = ||x_t - p_{t-1}||. S_pred = 0 when e_t = 0 (a perfect prediction), else
  rank(e_t | recent errors). With a model report (HRM's own uncertainty on this input),
  S_model = mean(1 - |2 sigmoid(q_halt) - 1|, H_tok / log V, steps / max_steps) (an undecided halt
  head, a flat output distribution, all ACT steps used; H_tok left out when the server computes
  no logits), and S = (S_pred + S_model) / 2.
- Novelty. N = clip(1 - max_j cos(x_t, m_j), 0, 1) over a window of recent vectors m_j (cos of
  two zero vectors is 1, of a zero and a non-zero vector 0).
- Arousal. A = rank(||x_t|| | recent magnitudes): 1/2 for a typical magnitude, near 1 for the
  largest seen.
- Reward. An outcome memory keeps (x_j, o_j) for experiences whose outcome o_j in [0, 1] is known
  (for puzzles: 1 when the answer verified as a valid solution). R = o_t when the outcome of this
  experience is already known, else the mean o_j of the k most cosine-similar remembered ones.
- Conflict. Each stream is summarised by the mean of its components s_i. With deviations
  d_i = s_i - mu_i from a slow EMA mean, a fast and a slow EMA estimate the covariance of every
  pair, giving correlations rho_fast_ij and rho_slow_ij (the running expectation). The pair's
  drift is |rho_fast_ij - rho_slow_ij| / 2 in [0, 1]; C_i is the mean drift over the pairs that
  contain stream i. Streams that were correlated and turn anticorrelated raise C; a steady
  relation, whatever its sign, does not (the expectation has learned it).
- Total. T = sum_k w_k s_k over s = (S, N, A, R, C), w = (1 - eps) softmax(theta) + eps / 5, so the
  weights stay positive and sum to 1. `learn(scores, useful)` moves theta by exponentiated
  gradient on (T - useful)^2: theta_k -= lr * 2 (T - useful) s_k, i.e. components that scored high
  on experiences that proved useful (e.g. a puzzle the model failed, so sleep can learn from it)
  gain weight.

Cold start (nothing seen yet): S = 1/2 (no error history to rank against), N = 1 (nothing
similar remembered), A = 1/2, R = 1/2 (no outcome known), C = 0 (no relation learned), with
uniform weights. A single stream always has C = 0.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

COMPONENTS = ("surprise", "novelty", "arousal", "reward", "conflict")


class SalienceError(ValueError):
    """Bad input to a salience scorer (shape changes, values out of range, unknown stream)."""


def percentile_rank(value: float, history: Iterable[float]) -> float:
    """Mid-rank of value among history in [0, 1]; 1/2 for an empty history."""
    past = np.fromiter(history, dtype=np.float64)
    if past.size == 0:
        return 0.5
    return float(((past < value).sum() + 0.5 * (past == value).sum()) / past.size)


def cosine_similarities(x: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """cos(x, m_j) for rows m_j of memory [n, d]; two zero vectors count as identical (1), a zero
    and a non-zero vector as unrelated (0)."""
    norm_x = np.linalg.norm(x)
    norms = np.linalg.norm(memory, axis=1)
    both_zero = (norms == 0) & (norm_x == 0)
    denom = np.where(norms * norm_x > 0, norms * norm_x, 1.0)
    return np.where(both_zero, 1.0, memory @ x / denom)


def token_entropy(logits: np.ndarray) -> float:
    """Mean per-token entropy (nats) of logits [..., vocab]: the model's output uncertainty."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-(np.exp(log_p) * log_p).sum(axis=-1).mean())


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """What a served HRM says about its own answer to one input.

    q_halt_logit: the Q-head's halt logit of the last segment; steps: ACT segments used
    (1..max_steps); vocab_size: the output vocabulary; token_entropy: mean per-token entropy (nats)
    of the output distribution, normalised by log vocab_size (None when the server does not
    compute logits: the uncertainty is then the mean of the other two terms).
    """

    q_halt_logit: float
    steps: float
    max_steps: float
    vocab_size: int
    token_entropy: float | None = None

    def __post_init__(self) -> None:
        if not (self.vocab_size >= 2 and self.max_steps >= 1 and 0 <= self.steps <= self.max_steps
                and (self.token_entropy is None or self.token_entropy >= 0) and math.isfinite(self.q_halt_logit)):
            raise SalienceError(f"model report out of range: {self}; need vocab_size >= 2, "
                                "0 <= steps <= max_steps, token_entropy >= 0 and a finite q_halt_logit")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelReport:
        """From a result record with keys q_halt_logit, steps, max_steps, vocab_size and optionally
        token_entropy."""
        missing = [k for k in ("q_halt_logit", "steps", "max_steps", "vocab_size") if k not in record]
        if missing:
            raise SalienceError(f"result record lacks {missing}; the serving side must report them")
        entropy = record.get("token_entropy")
        return cls(float(record["q_halt_logit"]), float(record["steps"]), float(record["max_steps"]),
                   int(record["vocab_size"]), None if entropy is None else float(entropy))

    def uncertainty(self) -> float:
        """mean(1 - |2 sigmoid(q) - 1|, H / log V, steps / max_steps), in [0, 1] (without H when unknown)."""
        halt_confidence = abs(math.tanh(self.q_halt_logit / 2))  # = |2 sigmoid(q) - 1|
        parts = [1.0 - halt_confidence, self.steps / self.max_steps]
        if self.token_entropy is not None:
            parts.append(min(self.token_entropy / math.log(self.vocab_size), 1.0))
        return float(np.mean(parts))


@dataclasses.dataclass(frozen=True)
class SalienceConfig:
    """Window sizes and rates; defaults suit streams of a few hundred steps per minute."""

    predictor_rate: float = 0.2  # a of the EMA predictor
    window: int = 256  # error, magnitude and novelty history per stream
    outcome_memory: int = 512  # remembered (vector, outcome) pairs per stream
    outcome_neighbours: int = 8  # k of the reward estimate
    correlation_fast: float = 0.2  # EMA rate of the fast correlation estimate
    correlation_slow: float = 0.01  # EMA rate of the running expectation (and of the stream means)
    weight_lr: float = 0.5  # exponentiated-gradient step of the weight logits
    weight_floor: float = 0.02  # eps: every weight stays >= eps / 5

    def __post_init__(self) -> None:
        for name in ("predictor_rate", "correlation_fast", "correlation_slow"):
            if not 0 < getattr(self, name) <= 1:
                raise SalienceError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("window", "outcome_memory", "outcome_neighbours"):
            if getattr(self, name) < 1:
                raise SalienceError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.weight_floor < 1 or self.weight_lr < 0:
            raise SalienceError("weight_floor must be in [0, 1) and weight_lr >= 0")


@dataclasses.dataclass(frozen=True)
class Salience:
    """The five SNARC scores of one experience and their weighted total (all in [0, 1])."""

    surprise: float
    novelty: float
    arousal: float
    reward: float
    conflict: float
    total: float

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, c) for c in COMPONENTS])


class _Stream:
    """Per-stream history: the EMA predictor, error/magnitude/vector windows, outcome memory."""

    def __init__(self, config: SalienceConfig):
        self.config = config
        self.dim: int | None = None
        self.prediction: np.ndarray | None = None
        self.errors: collections.deque = collections.deque(maxlen=config.window)
        self.magnitudes: collections.deque = collections.deque(maxlen=config.window)
        self.recent: collections.deque = collections.deque(maxlen=config.window)
        self.outcome_vectors: collections.deque = collections.deque(maxlen=config.outcome_memory)
        self.outcomes: collections.deque = collections.deque(maxlen=config.outcome_memory)

    def check(self, x: np.ndarray, name: str) -> None:
        if not np.all(np.isfinite(x)):
            raise SalienceError(f"stream {name!r}: non-finite values in the observation")
        if self.dim is None:
            self.dim = x.size
        elif x.size != self.dim:
            raise SalienceError(f"stream {name!r}: observation has {x.size} values, earlier ones had {self.dim}")

    def surprise(self, x: np.ndarray) -> float:
        if self.prediction is None:
            return 0.5
        error = float(np.linalg.norm(x - self.prediction))
        return 0.0 if error == 0 else percentile_rank(error, self.errors)

    def novelty(self, x: np.ndarray) -> float:
        if not self.recent:
            return 1.0
        return float(np.clip(1.0 - cosine_similarities(x, np.stack(self.recent)).max(), 0.0, 1.0))

    def reward(self, x: np.ndarray, outcome: float | None) -> float:
        if outcome is not None:
            return outcome
        if not self.outcomes:
            return 0.5
        sims = cosine_similarities(x, np.stack(self.outcome_vectors))
        nearest = np.argsort(-sims, kind="stable")[: self.config.outcome_neighbours]
        return float(np.asarray(self.outcomes)[nearest].mean())

    def update(self, x: np.ndarray) -> None:
        if self.prediction is None:
            self.prediction = x.copy()
        else:
            self.errors.append(float(np.linalg.norm(x - self.prediction)))
            rate = self.config.predictor_rate
            self.prediction = (1 - rate) * self.prediction + rate * x
        self.magnitudes.append(float(np.linalg.norm(x)))
        self.recent.append(x.copy())

    def remember_outcome(self, x: np.ndarray, outcome: float) -> None:
        self.outcome_vectors.append(x.copy())
        self.outcomes.append(outcome)


class _Correlations:
    """Fast and slow EMA covariances of the per-stream summaries (the conflict score)."""

    def __init__(self, config: SalienceConfig):
        self.config = config
        self.names: list[str] = []
        self.mean: dict[str, float] = {}
        self.fast: dict[tuple[str, str], float] = {}  # (a, b) -> EMA of d_a d_b (a == b: variance)
        self.slow: dict[tuple[str, str], float] = {}

    @staticmethod
    def _rho(cov: Mapping[tuple[str, str], float], a: str, b: str) -> float:
        denom = math.sqrt(cov[(a, a)] * cov[(b, b)])
        return float(np.clip(cov[(a, b)] / denom, -1, 1)) if denom > 0 else 0.0

    def conflict(self, name: str) -> float:
        others = [o for o in self.names if o != name]
        drifts = [abs(self._rho(self.fast, *sorted((name, o))) - self._rho(self.slow, *sorted((name, o)))) / 2
                  for o in others if (name, name) in self.fast and (o, o) in self.fast]
        return float(np.mean(drifts)) if drifts else 0.0

    def update(self, summaries: Mapping[str, float]) -> None:
        new = [n for n in summaries if n not in self.mean]
        for n in new:  # a stream's first value sets its mean; it enters the covariances next step
            self.mean[n] = summaries[n]
            self.names.append(n)
        seen = [n for n in summaries if n not in new]
        dev = {n: summaries[n] - self.mean[n] for n in seen}
        for i, a in enumerate(seen):
            for b in seen[i:]:
                key = tuple(sorted((a, b)))
                product = dev[a] * dev[b]
                for table, rate in ((self.fast, self.config.correlation_fast),
                                    (self.slow, self.config.correlation_slow)):
                    table[key] = (1 - rate) * table.get(key, product) + rate * product
        slow = self.config.correlation_slow
        for n in seen:
            self.mean[n] = (1 - slow) * self.mean[n] + slow * summaries[n]


class SalienceScorer:
    """Online SNARC scores for any number of named streams (see the module docstring)."""

    def __init__(self, config: SalienceConfig | None = None):
        self.config = config or SalienceConfig()
        self.streams: dict[str, _Stream] = {}
        self.correlations = _Correlations(self.config)
        self.logits = np.zeros(len(COMPONENTS))

    @property
    def weights(self) -> np.ndarray:
        """w = (1 - eps) softmax(theta) + eps / 5: positive, sums to 1."""
        z = np.exp(self.logits - self.logits.max())
        eps = self.config.weight_floor
        return (1 - eps) * z / z.sum() + eps / len(COMPONENTS)

    def score(self, observations: Mapping[str, Any], *, reports: Mapping[str, ModelReport] | None = None,
              outcomes: Mapping[str, float] | None = None) -> dict[str, Salience]:
        """Scores one step of every observed stream, then learns from it.

        observations: stream name -> feature vector (any shape; flattened). reports: stream ->
        the model's report on that input (adds its uncertainty to surprise). outcomes: stream ->
        outcome in [0, 1] when already known (e.g. the answer verified); it is also remembered.
        """
        reports, outcomes = reports or {}, outcomes or {}
        vectors = {}
        for name, value in observations.items():
            x = np.asarray(value, dtype=np.float64).reshape(-1)
            self.streams.setdefault(name, _Stream(self.config)).check(x, name)
            vectors[name] = x
        for name, outcome in outcomes.items():
            if name not in vectors or not 0 <= outcome <= 1:
                raise SalienceError(f"outcome for {name!r} must be in [0, 1] and its stream observed, got {outcome}")
        results = {name: self._score_one(name, x, reports.get(name), outcomes.get(name))
                   for name, x in vectors.items()}
        for name, x in vectors.items():
            self.streams[name].update(x)
            if name in outcomes:
                self.streams[name].remember_outcome(x, float(outcomes[name]))
        self.correlations.update({name: float(x.mean()) for name, x in vectors.items()})
        return results

    def _score_one(self, name: str, x: np.ndarray, report: ModelReport | None, outcome: float | None) -> Salience:
        stream = self.streams[name]
        surprise = stream.surprise(x)
        if report is not None:
            surprise = (surprise + report.uncertainty()) / 2
        parts = np.array([surprise, stream.novelty(x), percentile_rank(float(np.linalg.norm(x)), stream.magnitudes),
                          stream.reward(x, outcome), self.correlations.conflict(name)])
        parts = np.clip(parts, 0.0, 1.0)
        total = float(np.clip(self.weights @ parts, 0.0, 1.0))
        return Salience(*map(float, parts), total=total)

    def observe_outcome(self, name: str, observation: Any, outcome: float) -> None:
        """Remembers an outcome that arrived after the experience was scored (reward memory)."""
        if name not in self.streams or not 0 <= outcome <= 1:
            raise SalienceError(f"unknown stream {name!r} or outcome {outcome} outside [0, 1]")
        self.streams[name].remember_outcome(np.asarray(observation, dtype=np.float64).reshape(-1), float(outcome))

    def learn(self, salience: Salience, useful: float) -> None:
        """Exponentiated-gradient step on (total - useful)^2 (useful in [0, 1]: how much remembering
        this experience turned out to matter)."""
        if not 0 <= useful <= 1:
            raise SalienceError(f"useful must be in [0, 1], got {useful}")
        parts = salience.vector()
        error = float(self.weights @ parts) - useful
        self.logits -= self.config.weight_lr * 2 * error * parts
        # softmax is shift-invariant: keep the logits in [-30, 0] (the floor eps dominates below that)
        self.logits = np.maximum(self.logits - self.logits.max(), -30.0)
