"""Focus before periphery: one consumer loop over a high-trust "focus" ring and a "peripheral" ring.

Focus records are always served first, so a flood of peripheral records never delays focus work.
`peripheral_every=k` bounds the other direction: after k focus records in a row, one waiting
peripheral record is served (None: strict priority, the periphery may wait while focus is busy).
While both rings are empty the loop sleeps on both doorbells at once (no core spins).
"""

from __future__ import annotations

import enum
import select
import time

from sage.mailbox import Mailbox, Record

_SLICE_NS = 500_000_000


class Lane(enum.Enum):
    FOCUS = "focus"
    PERIPHERAL = "peripheral"


class FocusScheduler:
    def __init__(self, focus: Mailbox, peripheral: Mailbox, *, peripheral_every: int | None = None):
        if peripheral_every is not None and (not isinstance(peripheral_every, int) or peripheral_every < 1):
            raise ValueError(f"peripheral_every must be None or an int >= 1, got {peripheral_every!r}")
        self.focus, self.peripheral, self.peripheral_every = focus, peripheral, peripheral_every
        self._focus_run = 0

    def next(self, timeout: float | None = None) -> tuple[Lane, Record] | None:
        """The next record to serve and its lane, or None after `timeout` seconds (None: no wait)."""
        give_up = time.monotonic_ns() + int((timeout or 0) * 1e9)
        while True:
            served = self._take()
            if served is not None:
                return served
            now = time.monotonic_ns()
            if now >= give_up:
                return None
            wake_at = min(give_up, now + _SLICE_NS)
            if self.focus.arm_doorbell(wake_at):
                continue
            if self.peripheral.arm_doorbell(wake_at):
                self.focus.disarm_doorbell()
                continue
            ready, _, _ = select.select([self.focus.doorbell_fd(), self.peripheral.doorbell_fd()], [], [],
                                        (wake_at - now) / 1e9)
            for box in (self.focus, self.peripheral):
                box.disarm_doorbell()
                if box.doorbell_fd() in ready:
                    box.sleep_on_doorbell(0)  # drain its rings

    def _take(self) -> tuple[Lane, Record] | None:
        if self.peripheral_every is not None and self._focus_run >= self.peripheral_every:
            record = self.peripheral.pop()
            if record is not None:
                self._focus_run = 0
                return Lane.PERIPHERAL, record
        record = self.focus.pop()
        if record is not None:
            self._focus_run += 1
            return Lane.FOCUS, record
        self._focus_run = 0
        record = self.peripheral.pop()
        return None if record is None else (Lane.PERIPHERAL, record)
