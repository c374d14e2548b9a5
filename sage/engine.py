"""The batching ACT loop of the server: a priority queue of requests and a batch of rows in flight.

Each call of `Engine.step()` answers expired requests, refills the batch from the queue and runs
one ACT segment on every row in flight. A row leaves the batch as soon as its Q head prefers
halting (q_halt > q_continue, the rule of the reference's hrm_act_v1.py without exploration) or it
has run its segment limit (the request's max_steps, default the model's halt_max_steps); its slot is
filled by the next request at the following segment, so easy inputs leave early and hard ones keep
going while the batch stays full.

Scheduling rules, each tested in tests/test_sage_engine.py:
- Focus before periphery: the queue is served focus lane first (requests from the server's focus
  inbox), then highest priority first, FIFO within a priority, at every refill. A request never
  waits for a lower-priority one queued after it; with the batch full it waits at most until the
  first row in flight halts (at most the largest segment limit in flight).
- Dynamic batching: a new batch starts when `max_batch` requests are eligible or the oldest has
  waited `max_wait` seconds; a running batch is refilled at every segment without waiting.
- A stream has at most one request in flight, and its requests run in arrival order, so each
  starts from the carry its predecessor left (persistent carry, sage/carry.py); a request with
  reset_carry starts from H_init/L_init, a stateless one (no stream id) always does.
- A request whose deadline passes is answered EXPIRED: while queued with no prediction, in flight
  with the prediction of its last segment (and its stream keeps the carry it reached).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable

import numpy as np

from sage.backends import SegmentBackend, carry_shape
from sage.carry import CarryStore
from sage.protocol import Request, Response, Status
from sage.telemetry import Telemetry

logger = logging.getLogger(__name__)

# A request may ask for more segments than the model was trained to halt within (thinking longer on
# a stream), up to this multiple: beyond it one request could hold a batch slot for minutes.
MAX_STEPS_FACTOR = 8
PENDING, ACTIVE, DONE = "pending", "active", "done"


@dataclasses.dataclass(eq=False)
class Job:
    request: Request
    received: float  # monotonic seconds when the server took it
    order: int
    journal_id: int | None = None
    focus: bool = False
    state: str = PENDING
    z_H: np.ndarray | None = None
    z_L: np.ndarray | None = None
    fresh: bool = True
    steps: int = 0
    started: float = 0.0
    prediction: np.ndarray | None = None
    q_halt: float = 0.0
    q_continue: float = 0.0
    batch: int = 0


class PendingQueue:
    """Jobs waiting for a slot: by (-priority, arrival), with per-stream order and deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, Job]] = []
        self._deadlines: list[tuple[float, int, Job]] = []
        self._arrivals: collections.deque[Job] = collections.deque()
        self._streams: dict[str, collections.deque[Job]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, job: Job) -> None:
        heapq.heappush(self._heap, (-int(job.focus), -job.request.priority, job.order, job))
        if job.request.deadline > 0:
            heapq.heappush(self._deadlines, (job.request.deadline, job.order, job))
        if job.request.stream:
            self._streams.setdefault(job.request.stream, collections.deque()).append(job)
        self._arrivals.append(job)
        self._size += 1

    def oldest_received(self) -> float | None:
        while self._arrivals and self._arrivals[0].state != PENDING:
            self._arrivals.popleft()
        return self._arrivals[0].received if self._arrivals else None

    def _leave(self, job: Job, state: str) -> None:
        job.state = state
        self._size -= 1
        stream = job.request.stream
        if stream:
            queue = self._streams[stream]
            queue.remove(job)
            if not queue:
                del self._streams[stream]

    def take(self, n: int, busy: set[str]) -> list[Job]:
        """Up to n eligible jobs, best first; a stream's job is eligible when it heads its stream's
        queue and the stream is not in `busy` (already in flight)."""
        out, skipped, taken = [], [], set()
        while self._heap and len(out) < n:
            item = heapq.heappop(self._heap)
            job = item[-1]
            if job.state != PENDING:
                continue
            stream = job.request.stream
            if stream and (stream in busy or stream in taken or self._streams[stream][0] is not job):
                skipped.append(item)
                continue
            self._leave(job, ACTIVE)
            taken.add(stream)
            out.append(job)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return out

    def pop_expired(self, now: float) -> list[Job]:
        out = []
        while self._deadlines and self._deadlines[0][0] < now:
            job = heapq.heappop(self._deadlines)[2]
            if job.state == PENDING:
                self._leave(job, DONE)
                out.append(job)
        return out

    def drain(self) -> list[Job]:
        jobs = [item[-1] for item in sorted(item for item in self._heap if item[-1].state == PENDING)]
        for job in jobs:
            self._leave(job, DONE)
        self._heap.clear()
        return jobs


class Engine:
    def __init__(self, backend: SegmentBackend, carries: CarryStore, telemetry: Telemetry,
                 send: Callable[[Job, Response], None], *, max_batch: int = 32, max_wait: float = 0.002,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.backend, self.config, self.carries, self.telemetry = backend, backend.config, carries, telemetry
        self.send, self.max_batch, self.max_wait = send, max_batch, max_wait
        self.clock, self.wall = clock, wall
        self.queue = PendingQueue()
        self.active: list[Job] = []
        self._order = itertools.count()
        self._zero = np.zeros(carry_shape(self.config), backend.carry_dtype)

    def swap_backend(self, backend: SegmentBackend) -> None:
        """Serve `backend` from the next segment on. Called between two steps: rows in flight keep
        their carry and run their remaining segments on the new backend, which must therefore take
        the same carries (same model config and carry dtype)."""
        if backend.config != self.config or np.dtype(backend.carry_dtype) != np.dtype(self.backend.carry_dtype):
            raise ValueError(f"its model config or carry dtype ({backend.carry_dtype}) differs from the served "
                             "one's; restart the server to serve a different model")
        self.backend = backend

    @property
    def idle(self) -> bool:
        return not self.active and not len(self.queue)

    def submit(self, request: Request, journal_id: int | None = None, *, focus: bool = False) -> None:
        """Queue a request (focus: from the focus inbox), or answer it at once when it is invalid or
        already past its deadline."""
        job = Job(request, self.clock(), next(self._order), journal_id, focus)
        problem = self._check(request)
        if problem:
            self._finish(job, Status.BAD_REQUEST, problem)
        elif request.deadline and self.wall() > request.deadline:
            self._finish(job, Status.EXPIRED, "the deadline had passed when the server took the request")
        else:
            self.queue.push(job)

    def _check(self, request: Request) -> str:
        cfg = self.config
        tokens = request.inputs
        if tokens.shape != (cfg.seq_len,):
            return f"the model takes {cfg.seq_len} input tokens, the request has {tokens.size}"
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            return f"input tokens must lie in 0..{cfg.vocab_size - 1}, got {tokens.min()}..{tokens.max()}"
        if not 0 <= request.puzzle_identifier < cfg.num_puzzle_identifiers:
            return f"puzzle_identifier must lie in 0..{cfg.num_puzzle_identifiers - 1}, got {request.puzzle_identifier}"
        if request.max_steps > MAX_STEPS_FACTOR * cfg.halt_max_steps:
            return (f"max_steps {request.max_steps} is more than {MAX_STEPS_FACTOR} x the model's halt_max_steps "
                    f"({cfg.halt_max_steps})")
        return ""

    def wait_hint(self) -> float | None:
        """Seconds until a waiting batch should start (None: nothing queued, 0: work to do now)."""
        if self.active:
            return 0.0
        oldest = self.queue.oldest_received()
        if oldest is None:
            return None
        if len(self.queue) >= self.max_batch:
            return 0.0
        return max(0.0, oldest + self.max_wait - self.clock())

    def step(self) -> bool:
        """Answer expired requests, refill the batch, run one segment; False when there was nothing to run."""
        for job in self.queue.pop_expired(self.wall()):
            self._finish(job, Status.EXPIRED, "the deadline passed while the request was queued")
        self._refill()
        if not self.active:
            return False
        self._run_segment()
        return True

    def abort(self, status: Status, message: str) -> int:
        """Answer every request in flight or queued with `status`; returns how many."""
        jobs = self.active + self.queue.drain()
        self.active = []
        for job in jobs:
            self._finish(job, status, message)
        return len(jobs)

    def _refill(self) -> None:
        free = self.max_batch - len(self.active)
        if free <= 0 or not len(self.queue) or (not self.active and self.wait_hint()):
            return
        busy = {job.request.stream for job in self.active if job.request.stream}
        for job in self.queue.take(free, busy):
            self._start(job)
            self.active.append(job)

    def _start(self, job: Job) -> None:
        job.started = self.clock()
        stream = job.request.stream
        if not stream:
            return
        if job.request.reset_carry:
            self.carries.reset(stream)
            return
        carry = self.carries.get(stream)
        if carry is not None:
            job.z_H, job.z_L = carry
            job.fresh = False

    def _run_segment(self) -> None:
        rows = self.active
        try:
            out = self.backend.step(np.stack([self._zero if j.z_H is None else j.z_H for j in rows]),
                                    np.stack([self._zero if j.z_L is None else j.z_L for j in rows]),
                                    np.array([j.fresh for j in rows]),
                                    np.stack([j.request.inputs for j in rows]).astype(np.int32),
                                    np.array([j.request.puzzle_identifier for j in rows], np.int32))
        except Exception as err:  # a backend failure answers this batch and keeps the server up
            logger.exception("backend %s failed on a batch of %d", self.backend.name, len(rows))
            self.active = []
            for job in rows:
                self._finish(job, Status.ERROR, f"backend {self.backend.name} failed: {type(err).__name__}: {err}")
            return
        self.telemetry.on_batch(len(rows))
        now, still = self.wall(), []
        for i, job in enumerate(rows):
            job.z_H, job.z_L, job.fresh, job.steps = out.z_H[i], out.z_L[i], False, job.steps + 1
            job.prediction, job.batch = out.predictions[i], len(rows)
            job.q_halt, job.q_continue = float(out.q_halt[i]), float(out.q_continue[i])
            limit = job.request.max_steps or self.config.halt_max_steps
            if job.q_halt > job.q_continue or job.steps >= limit:
                self._finish(job, Status.OK)
            elif job.request.deadline and now > job.request.deadline:
                self._finish(job, Status.EXPIRED, f"the deadline passed after {job.steps} segments; "
                                                  "the prediction is that segment's")
            else:
                still.append(job)
        self.active = still

    def _finish(self, job: Job, status: Status, message: str = "") -> None:
        job.state = DONE
        if job.request.stream and job.steps:
            self.carries.put(job.request.stream, job.z_H, job.z_L)
        now = self.clock()
        started = job.started or now
        prediction = job.prediction if job.prediction is not None else np.zeros(0, np.int32)
        response = Response(job.request.request_id, status, prediction, job.steps, job.q_halt, job.q_continue,
                            now - job.received, started - job.received, job.batch, message)
        self.telemetry.on_answer(status.name.lower(), response.latency, response.queue_wait, job.steps)
        self.send(job, response)
