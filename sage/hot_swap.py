"""Hot swap of served weights, and idle-triggered sleep, for `python -m sage serve --weights-dir DIR`.

`WeightsReloader` polls the published-weights pointer (sage.weights.read_current: one small JSON
read) every `interval` seconds. When it names a version above the one served, it builds the backend
of that version in a worker thread while the server keeps answering with the old one; the server
then takes the finished backend between two segment steps (Engine.swap_backend), so no request is
dropped or re-run. For --backend onnx (and tensorrt) that build exports the version's segment graph
with torch (sage.backends._cached_export; tens of seconds of CPU on a small device, measured in
BUILD_NOTES.md), still on the worker thread. Rows in flight keep their carry and run their
remaining segments on the new weights: the carry is a hidden state of the same shape, and a swap
only ever happens between two segments. A version whose model config or carry differs from the
served one is refused (logged): the carries in flight and on disk would not fit it.

`IdleSleeper` starts one sleep cycle (`python -m sage sleep ...`, sage/sleep.py) as a child process
when no request has arrived for `idle_after` seconds; the server keeps serving meanwhile, and the
weights the cycle publishes arrive through the reloader. A cycle starts only when a request arrived
since the server started or since the previous cycle started (a cycle learns from what was served),
so an idle server does not fine-tune in a loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from sage import weights
from sage.backends import SegmentBackend

logger = logging.getLogger(__name__)


class WeightsReloader:
    def __init__(self, weights_dir: str | os.PathLike, load: Callable[[str], SegmentBackend], version: int | None,
                 interval: float = 2.0) -> None:
        self.weights_dir, self.load, self.version, self.interval = weights_dir, load, version, interval
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sage-reload")
        self._building: tuple[dict[str, Any], concurrent.futures.Future] | None = None
        self._next_poll = 0.0
        self._refused: int | None = None  # the last version that failed to load: not retried

    def poll(self, now: float) -> tuple[int, SegmentBackend] | None:
        """(version, backend) once a newer published version is built; None meanwhile."""
        if self._building is not None:
            return self._collect()
        if now < self._next_poll:
            return None
        self._next_poll = now + self.interval
        try:
            record = weights.read_current(self.weights_dir)
        except weights.WeightsError as err:
            logger.warning("keeping version %s: %s", self.version, err)
            return None
        newer = record is not None and (self.version is None or record["version"] > self.version)
        if newer and record["version"] != self._refused:
            logger.info("weights version %d published at %s: building its backend", record["version"], record["path"])
            self._building = record, self._executor.submit(self.load, record["path"])
        return None

    def _collect(self) -> tuple[int, SegmentBackend] | None:
        record, future = self._building
        if not future.done():
            return None
        self._building = None
        try:
            backend = future.result()
        except Exception as err:  # a broken version must not take the server down: keep serving the old one
            self.refuse(record["version"], f"{type(err).__name__}: {err}")
            return None
        return record["version"], backend

    def refuse(self, version: int, reason: str) -> None:
        logger.error("weights version %d not served (%s); still serving version %s", version, reason, self.version)
        self._refused = version

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class IdleSleeper:
    def __init__(self, command: Sequence[str], idle_after: float) -> None:
        self.command, self.idle_after = list(command), idle_after
        self.child: subprocess.Popen | None = None
        self._request_since_cycle = False

    def on_request(self) -> None:
        self._request_since_cycle = True

    def poll(self, now: float, last_request: float) -> str | None:
        """'started' or 'finished' when a cycle started or ended at this call (the caller counts them)."""
        if self.child is not None:
            code = self.child.poll()
            if code is None:
                return None
            logger.log(logging.INFO if code == 0 else logging.ERROR, "sleep cycle (pid %d) exited %d",
                       self.child.pid, code)
            self.child = None
            return "finished" if code == 0 else "failed"
        if not self._request_since_cycle or now - last_request < self.idle_after:
            return None
        self.child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        self._request_since_cycle = False
        logger.info("idle for %.0f s: started a sleep cycle (pid %d): %s", now - last_request, self.child.pid,
                    " ".join(self.command))
        return "started"

    def close(self) -> None:
        """Stops a running cycle: it publishes atomically (checkpoint first, then the pointer), so
        stopping it loses that cycle's work and never leaves a half-published version."""
        if self.child is None:
            return
        if self.child.poll() is None:
            logger.warning("sleep cycle (pid %d) still running at shutdown: terminated", self.child.pid)
            self.child.terminate()
        self.child.wait()
        self.child = None
