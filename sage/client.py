"""Client of `python -m sage serve`: submit requests, wait for answers by request id, solve Sudokus.

    with Client("hrm") as client:                       # attaches the server's inbox
        answer = client.solve_sudoku(puzzle)  # 81 characters, '.' for blanks
        print(answer.grid, answer.response.steps, answer.valid)
        rid = client.submit(tokens, stream="camera-1", priority=5, timeout=0.2)   # any HRM task
        response = client.wait(rid)

Each Client creates its own reply mailbox (removed by close()), so any number of client processes
can share one server; one Client may be used by many threads. A request is acknowledged once
`submit` returns (see sage/serve.py). Answers to ids this client is not waiting for (a duplicate a
server re-sent after a crash) are dropped.

`python -m sage solve PUZZLE --inbox NAME` is the command-line form.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import threading
import time
from typing import Self

import numpy as np

from sage.mailbox import Mailbox, MailboxNotFoundError, PushStatus
from sage.protocol import Request, Response, Status, decode_response, encode_request

REPLY_RECORD_SIZE = 8192


class ClientError(ValueError):
    """A request that cannot be sent or answered; the message says what to do."""


class ServerUnavailableError(ClientError):
    """No server behind the inbox (mailbox missing, its server dead, or no answer in time)."""


@dataclasses.dataclass(frozen=True)
class SudokuAnswer:
    grid: str  # 81 characters, the predicted digits
    valid: bool  # a complete grid that keeps every given and breaks no rule
    response: Response


class Client:
    def __init__(self, inbox: str, *, focus_inbox: str | None = None, reply_capacity: int = 1024) -> None:
        """inbox: the server's --inbox; focus_inbox: its --focus-inbox, for submit(focus=True)."""
        self.inbox = _attach(inbox, "--inbox")
        self.focus = _attach(focus_inbox, "--focus-inbox") if focus_inbox else None
        name = f"sage-reply-{os.getpid()}-{secrets.token_hex(4)}"
        self.replies = Mailbox.create(name, record_size=REPLY_RECORD_SIZE, capacity=reply_capacity)
        self._cond = threading.Condition()
        self._waiting: set[int] = set()
        self._answers: dict[int, Response] = {}
        self._receiving = False
        self.duplicates = 0  # answers to ids not awaited: re-sent after a server crash, or after wait gave up

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.inbox.close()
        if self.focus is not None:
            self.focus.close()
        self.replies.unlink()
        self.replies.close()

    def server_alive(self) -> bool:
        """False when the process that created the inbox (the server) is gone."""
        return self.inbox.creator.alive()

    def submit(self, inputs, *, puzzle_identifier: int = 0, stream: str = "", priority: int = 0,
               timeout: float | None = None, reset_carry: bool = False, max_steps: int = 0,
               block: float = 1.0, focus: bool = False) -> int:
        """Send one example; returns its request id once the inbox holds it (acknowledged).
        timeout: seconds from now to the request's deadline (None: no deadline); block: how long to wait
        for room in a full inbox; focus: send it to the focus inbox (ahead of all inbox requests)."""
        if focus and self.focus is None:
            raise ClientError("submit(focus=True) needs Client(..., focus_inbox=NAME), the server's --focus-inbox")
        box = self.focus if focus else self.inbox
        now = time.time()
        request = Request(secrets.randbits(63), np.asarray(inputs).reshape(-1), puzzle_identifier, stream, priority,
                          0.0 if timeout is None else now + timeout, now, max_steps, reset_carry, self.replies.name)
        payload = encode_request(request)
        with self._cond:
            self._waiting.add(request.request_id)
        status = box.push(payload, timeout=block)
        if status is PushStatus.OK:
            return request.request_id
        with self._cond:
            self._waiting.discard(request.request_id)
        if status is PushStatus.TOO_BIG:
            raise ClientError(f"a request of {len(payload)} bytes does not fit the records of inbox "
                              f"{box.name!r} ({box.record_size} bytes); restart the server with a "
                              "larger --record-size")
        raise ServerUnavailableError(f"inbox {box.name!r} stayed full for {block} s "
                                     f"({box.capacity} records): {self._server_state()}")

    def wait(self, request_id: int, timeout: float = 30.0) -> Response:
        """The answer to `request_id`; ServerUnavailableError if none comes within `timeout` seconds."""
        give_up = time.monotonic() + timeout
        while True:
            remaining = give_up - time.monotonic()
            with self._cond:
                if request_id in self._answers:
                    return self._answers.pop(request_id)
                if remaining <= 0:
                    self._waiting.discard(request_id)
                    raise ServerUnavailableError(f"no answer to request {request_id} within {timeout} s from the "
                                                 f"server on inbox {self.inbox.name!r}: {self._server_state()}")
                if self._receiving:  # another thread is popping; it wakes us when it stores an answer
                    self._cond.wait(min(remaining, 0.05))
                    continue
                self._receiving = True
            try:
                record = self.replies.pop(timeout=min(remaining, 0.05))
            finally:
                with self._cond:
                    self._receiving = False
                    if record is not None:
                        response = decode_response(record.payload)
                        if response.request_id in self._waiting:
                            self._waiting.discard(response.request_id)
                            self._answers[response.request_id] = response
                        else:
                            self.duplicates += 1
                    self._cond.notify_all()

    def _server_state(self) -> str:
        if not self.server_alive():
            return (f"its server (pid {self.inbox.creator.pid}) is not running; start one with "
                    "`python -m sage serve`")
        return "the server is alive but behind; see `python -m sage stats`"

    def solve(self, inputs, *, wait: float = 30.0, **submit) -> Response:
        return self.wait(self.submit(inputs, **submit), wait)

    def solve_sudoku(self, puzzle: str, **solve) -> SudokuAnswer:
        """Solve an 81-character puzzle ('1'-'9' givens, '.' or '0' blanks) with a Sudoku model."""
        from hrm_jax.data.sudoku_solver import (  # hrm_jax (and jax): only Sudoku callers pay
            is_valid_solution,
            parse_puzzle,
        )

        grid = parse_puzzle(puzzle)  # SudokuFormatError (a ValueError) names what is wrong
        # The reference's encoding (sapientinc/HRM dataset/build_sudoku_dataset.py): blank 1, digit d -> d + 1.
        response = self.solve(grid.astype(np.int32) + 1, **solve)
        if response.status is not Status.OK:
            raise ClientError(f"the server answered {response.status.name}: {response.message}")
        digits = response.prediction - 1
        if digits.shape != (81,):
            raise ClientError(f"the server's model answers {digits.size} tokens, a Sudoku has 81: it does not "
                              "serve a Sudoku model")
        valid = bool(np.all((digits >= 1) & (digits <= 9))) and is_valid_solution(grid, digits.astype(np.int8))
        return SudokuAnswer("".join(str(int(d)) if 0 <= d <= 9 else "?" for d in digits), valid, response)


def _attach(name: str, flag: str) -> Mailbox:
    try:
        return Mailbox.attach(name)
    except MailboxNotFoundError:
        raise ServerUnavailableError(f"no mailbox {name!r}: start a server with `python -m sage serve {flag} "
                                     f"{name} ... --model MODEL`") from None


# ---- python -m sage solve ----
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("puzzle", help="81 characters, row by row: '1'-'9' givens, '.' or '0' blanks")
    parser.add_argument("--inbox", required=True, help="the server's inbox mailbox")
    parser.add_argument("--focus-inbox", default=None, help="send to the server's focus inbox instead")
    parser.add_argument("--stream", default="", help="stream id (keeps the carry between calls)")
    parser.add_argument("--reset", action="store_true", help="start the stream from H_init/L_init")
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=None, help="seconds the answer may take on the server")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the answer (default 30)")


def main(args: argparse.Namespace) -> int:
    from hrm_jax.data.sudoku_solver import parse_puzzle  # hrm_jax (and jax): only Sudoku callers pay

    parse_puzzle(args.puzzle)  # a malformed puzzle is reported before any mailbox is touched
    with Client(args.inbox, focus_inbox=args.focus_inbox) as client:
        if not client.server_alive():
            raise ServerUnavailableError(f"the server of inbox {args.inbox!r} (pid {client.inbox.creator.pid}) "
                                         "is not running; start one with `python -m sage serve`")
        answer = client.solve_sudoku(args.puzzle, stream=args.stream, reset_carry=args.reset,
                                     priority=args.priority, timeout=args.deadline, wait=args.wait,
                                     focus=args.focus_inbox is not None)
    r = answer.response
    for row in range(9):
        print(" ".join(answer.grid[row * 9:row * 9 + 9]))
    print(f"ACT steps {r.steps}, q_halt {r.q_halt:+.3f} (q_continue {r.q_continue:+.3f}), server latency "
          f"{1e3 * r.latency:.1f} ms, {'a valid solution' if answer.valid else 'NOT a valid solution'}")
    return 0 if answer.valid else 1

