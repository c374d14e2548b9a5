"""Stopping a run cleanly on SIGTERM or SIGINT: finish the step, save, exit.

Schedulers and preemptible machines send SIGTERM and wait a grace period before SIGKILL; Ctrl-C
sends SIGINT. Inside `StopSignals` the first of either only raises a flag that the training loop
reads between steps (so the step in flight completes and a checkpoint is written); a second SIGINT
raises KeyboardInterrupt as usual, for a person who does not want to wait.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Self

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: `.requested` is the name of the first stop signal received, else None.

    Handlers are installed only in the main thread (Python delivers signals there); elsewhere the
    context does nothing and the process keeps its default behaviour.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            logger.warning("%s received: finishing the current step and saving a checkpoint", name)
        self.requested = self.requested or name

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
