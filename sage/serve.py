"""`python -m sage serve`: a process that answers HRM requests from a mailbox, with persistent carries.

    python -m sage serve --model model.onnx --backend onnx --inbox hrm --outbox hrm-out

Requests (sage/protocol.py) arrive on the inbox PBM ring (sage/mailbox.py), and on the optional
--focus-inbox, a second ring for high-trust work: it is read first (sage.schedule.FocusScheduler),
its requests rank ahead of every inbox request, and a flood that fills the inbox cannot keep them
out. Answers go to the request's reply-to mailbox, or to --outbox when it names none. The ACT
loop, batching and priorities are sage/engine.py; carries per stream sage/carry.py; the
write-ahead journal sage/journal.py; telemetry sage/telemetry.py. Everything the server keeps
lives in --state-dir (default $SAGE_STATE_DIR or ~/.local/state/sage, then the inbox name):
carries/, journal.log, stats.json, metrics.prom and a lock file that keeps a second server off the
same state.

Guarantees (the test of each is named in BUILD_NOTES.md, "Serving"):
- A request is *acknowledged* when its push into the inbox returned PushStatus.OK (Client.submit
  returned). Every acknowledged request is answered exactly once across SIGTERM and restarts, and at
  least once across a SIGKILL of the server (an answer sent just before the kill may be sent again
  by the next server; clients drop answers to ids they are not waiting for), as long as the machine
  keeps running (the inbox is in shared memory) and the state directory is kept. The one window a
  SIGKILL loses a request in is between `pop` returning it and its journal entry being written.
- SIGTERM (or SIGINT): the server stops taking requests from the inbox (the rest stay there for the
  next server), finishes every request it had taken (within --drain-timeout; past it they are
  answered SHUTDOWN), snapshots every carry, writes its stats and exits 0.
- --weights-dir DIR: the server serves the version DIR publishes (sage/weights.py; --model only
  while nothing is published) and swaps to each newer one between two segment steps without
  dropping a request; rows in flight finish on the new weights (sage/hot_swap.py). With
  --sleep-when-idle S and --experiences STORE, S seconds without a request start one sleep cycle
  (`python -m sage sleep`) in a child process while the server keeps serving.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

from sage.backends import BACKENDS, SegmentBackend, carry_shape, load_backend
from sage.carry import CarryStore
from sage.engine import Engine, Job
from sage.hot_swap import IdleSleeper, WeightsReloader
from sage.journal import Journal
from sage.mailbox import Mailbox, MailboxNotFoundError, PushStatus
from sage.protocol import ProtocolError, Request, Response, Status, decode_request, encode_response, peek_request_id
from sage.schedule import FocusScheduler, Lane
from sage.segment import SegmentError
from sage.telemetry import Telemetry
from sage.weights import read_current

logger = logging.getLogger(__name__)

DEFAULT_RECORD_SIZE = 4096
DEFAULT_CAPACITY = 1024
# Journal entries start with the lane, so a replayed request keeps its place ahead of the periphery.
_LANE_TAGS = {False: b"P", True: b"F"}


def journal_entry(payload: bytes, focus: bool = False) -> bytes:
    return _LANE_TAGS[focus] + payload


class ServerError(ValueError):
    """The server cannot start (state directory in use, mailbox geometry); the message says what to do."""


def default_state_dir(inbox: str) -> Path:
    base = os.environ.get("SAGE_STATE_DIR") or Path.home() / ".local" / "state" / "sage"
    return Path(base) / inbox


def open_or_create(name: str, record_size: int, capacity: int) -> Mailbox:
    """Attach to `name`; if it does not exist create it; if its creator is dead, take it over with its
    records (a restarted server keeps the requests queued for the old one)."""
    try:
        box = Mailbox.attach(name)
    except MailboxNotFoundError:
        return Mailbox.create(name, record_size=record_size, capacity=capacity)
    if box.creator.alive():
        return box
    geometry = {"record_size": box.record_size, "capacity": box.capacity}
    box.close()
    return Mailbox.create(name, **geometry, stale="adopt")


class ReplyBoxes:
    """Attached reply mailboxes by name, least recently used closed beyond `limit`."""

    def __init__(self, default: Mailbox, limit: int = 256) -> None:
        self.default, self.limit = default, limit
        self._boxes: collections.OrderedDict[str, Mailbox] = collections.OrderedDict()

    def get(self, name: str) -> Mailbox:
        if not name or name == self.default.name:
            return self.default
        if name in self._boxes:
            self._boxes.move_to_end(name)
            return self._boxes[name]
        box = self._boxes[name] = Mailbox.attach(name)
        if len(self._boxes) > self.limit:
            self._boxes.popitem(last=False)[1].close()
        return box

    def forget(self, name: str) -> None:
        box = self._boxes.pop(name, None)
        if box is not None:
            box.close()

    def close(self) -> None:
        for box in self._boxes.values():
            box.close()
        self._boxes.clear()


class Server:
    def __init__(self, backend: SegmentBackend, inbox: Mailbox, outbox: Mailbox, state_dir: Path, *,
                 focus: Mailbox | None = None, max_batch: int = 32, max_wait: float = 0.002,
                 max_live_streams: int = 1024,
                 max_pending: int = 4096, snapshot_interval: float = 5.0, stats_interval: float = 0.5,
                 drain_timeout: float = 30.0, reply_timeout: float = 0.1,
                 reloader: WeightsReloader | None = None, sleeper: IdleSleeper | None = None) -> None:
        self.backend, self.inbox, self.focus, self.state_dir = backend, inbox, focus, state_dir
        self.lanes = FocusScheduler(focus, inbox) if focus is not None else None
        self.replies = ReplyBoxes(outbox)
        self.max_pending, self.drain_timeout, self.reply_timeout = max_pending, drain_timeout, reply_timeout
        self.snapshot_interval, self.stats_interval = snapshot_interval, stats_interval
        self.telemetry = Telemetry()
        self.carries = CarryStore(state_dir / "carries", max_live_streams, carry_shape(backend.config),
                                  backend.carry_dtype)
        self.journal = Journal(state_dir / "journal.log")
        self.engine = Engine(backend, self.carries, self.telemetry, self._send, max_batch=max_batch,
                             max_wait=max_wait)
        self.reloader, self.sleeper = reloader, sleeper
        if reloader is not None and reloader.version is not None:
            self.telemetry.weights_version.set(reloader.version)
        self.last_request = time.monotonic()
        self.stopping = False

    # ---- answers ----
    def _send(self, job: Job, response: Response) -> None:
        """Push the answer; a reply mailbox that stays full for reply_timeout (a client that stopped
        reading) costs that answer, counted, rather than stalling every other client."""
        name = job.request.reply_to
        try:
            status = self.replies.get(name).push(encode_response(response), timeout=self.reply_timeout)
        except (SegmentError, OSError, ValueError) as err:  # gone, unlinked, or not a valid mailbox name
            logger.debug("reply mailbox %r: %s", name, err)
            status = None
        if status is not PushStatus.OK:
            reason = "no_reply_mailbox" if status is None else status.value
            self.telemetry.on_drop(reason)
            self.replies.forget(name)
            logger.warning("answer to request %d could not be delivered to %r (%s)", response.request_id,
                           name or self.replies.default.name, reason)
        if job.journal_id is not None:
            self.journal.done(job.journal_id)

    # ---- requests ----
    def _take(self, payload: bytes, journal_id: int, focus: bool) -> None:
        self.telemetry.on_received()
        self.last_request = time.monotonic()
        if self.sleeper is not None:
            self.sleeper.on_request()
        try:
            request = decode_request(payload)
        except ProtocolError as err:
            request_id = peek_request_id(payload)
            logger.warning("bad request record (%s)", err)
            if request_id is None:
                self.telemetry.on_drop("unreadable_request")
                self.journal.done(journal_id)
                return
            request = Request(request_id, inputs=np.zeros(0, np.int32))
            self._send(Job(request, 0.0, -1, journal_id), Response(request_id, Status.BAD_REQUEST, message=str(err)))
            self.telemetry.on_answer("bad_request", 0.0, 0.0, 0)
            return
        self.engine.submit(request, journal_id, focus=focus)

    def _pop(self, timeout: float) -> tuple[bool, bytes] | None:
        """(focus?, payload) of the next record: focus first; past max_pending queued, focus only
        (up to twice that), so a backlog of peripheral work never shuts focus requests out."""
        queued = len(self.engine.queue)
        if self.lanes is None:
            record = self.inbox.pop(timeout=timeout) if queued < self.max_pending else None
            return None if record is None else (False, record.payload)
        if queued >= 2 * self.max_pending:
            return None
        if queued >= self.max_pending:
            record = self.focus.pop(timeout=timeout)
            return None if record is None else (True, record.payload)
        got = self.lanes.next(timeout)
        return None if got is None else (got[0] is Lane.FOCUS, got[1].payload)

    def _receive(self) -> None:
        """Take what the mailboxes hold; block briefly only when there is no work."""
        hint = self.engine.wait_hint()
        timeout = 0.05 if hint is None else min(hint, 0.05)
        while (got := self._pop(timeout)) is not None:
            focus, payload = got
            self._take(payload, self.journal.begin(journal_entry(payload, focus)), focus)
            timeout = 0

    def replay_journal(self) -> int:
        unfinished = self.journal.unfinished()
        for ident, entry in unfinished:
            self._take(entry[1:], ident, entry[:1] == _LANE_TAGS[True])
        if unfinished:
            logger.info("replaying %d requests a previous server took and did not answer", len(unfinished))
        return len(unfinished)

    # ---- the loop ----
    def request_stop(self, *_) -> None:
        if not self.stopping:
            logger.info("stopping: no new requests; finishing the %d taken", len(self.engine.queue)
                        + len(self.engine.active))
        self.stopping = True

    def run(self) -> int:
        self.replay_journal()
        next_stats = next_snapshot = 0.0
        drain_deadline = None
        while True:
            if not self.stopping:
                self._receive()
            self.engine.step()
            now = time.monotonic()
            self._between_steps(now)
            if now >= next_stats:
                self.write_stats()
                next_stats = now + self.stats_interval
            if now >= next_snapshot:
                self.carries.flush()
                next_snapshot = now + self.snapshot_interval
            if self.stopping:
                drain_deadline = drain_deadline or now + self.drain_timeout
                if self.engine.idle:
                    break
                if now > drain_deadline:
                    count = self.engine.abort(Status.SHUTDOWN, "the server stopped before finishing; send it again")
                    logger.warning("drain timeout: answered %d requests SHUTDOWN", count)
                    break
        self.shutdown()
        return 0

    def _between_steps(self, now: float) -> None:
        """A newer published version replaces the backend here, between two segment steps."""
        if self.sleeper is not None and not self.stopping:
            event = self.sleeper.poll(now, self.last_request)
            if event is not None:
                self.telemetry.on_sleep_cycle(event)
        if self.reloader is None:
            return
        built = self.reloader.poll(now)
        if built is None:
            return
        version, backend = built
        try:
            self.engine.swap_backend(backend)
        except ValueError as err:
            self.reloader.refuse(version, str(err))
            return
        logger.info("now serving weights version %d (was %s)", version, self.reloader.version)
        self.backend, self.reloader.version = backend, version
        self.telemetry.on_weight_swap(version)

    def shutdown(self) -> None:
        if self.sleeper is not None:
            self.sleeper.close()
        if self.reloader is not None:
            self.reloader.close()
        written = self.carries.flush()
        self.write_stats(final=True)
        self.journal.close()
        self.replies.close()
        logger.info("stopped; %d carries snapshotted", written)

    def write_stats(self, final: bool = False) -> None:
        inbox = self.inbox.stats()
        self.telemetry.set_gauges(queue_depth=len(self.engine.queue), active_rows=len(self.engine.active),
                                  live_streams=len(self.carries), inbox_depth=inbox.depth,
                                  journal_pending=self.journal.pending)
        self.telemetry.write(self.state_dir, inbox=self.inbox.name, outbox=self.replies.default.name,
                             backend=self.backend.name, stopped=final, carries_on_disk=self.carries.on_disk(),
                             carry_evictions=self.carries.evictions, inbox_full=inbox.full,
                             inbox_expired=inbox.expired, inbox_too_big=inbox.too_big,
                             weights_version=None if self.reloader is None else self.reloader.version)


def lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ServerError(f"{state_dir} is in use by another server (pid {other}); stop it or pass another "
                          "--state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--model", required=True, help="an exported .onnx file (python -m export onnx), an orbax "
                        "checkpoint directory, or a state dict .safetensors/.pt (with --config)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnx")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--config", default=None, help="HRMConfig JSON for a state-dict --model")
    parser.add_argument("--inbox", required=True, help="mailbox the requests arrive on (created if missing)")
    parser.add_argument("--outbox", required=True, help="mailbox for answers to requests without a reply-to")
    parser.add_argument("--focus-inbox", default=None, help="a second inbox read first, whose requests rank "
                        "ahead of every --inbox request (created if missing)")
    parser.add_argument("--state-dir", type=Path, default=None, help="carries, journal, stats (default "
                        "$SAGE_STATE_DIR/INBOX or ~/.local/state/sage/INBOX)")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per segment (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="how long a new batch waits to fill (default 2 ms)")
    parser.add_argument("--max-streams", type=int, default=1024, help="carries kept in memory (default 1024); "
                        "older ones are evicted to disk")
    parser.add_argument("--snapshot-interval", type=float, default=5.0, help="seconds between carry snapshots")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for taken requests")
    parser.add_argument("--record-size", type=int, default=DEFAULT_RECORD_SIZE,
                        help="record size of mailboxes this server creates")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="records per mailbox it creates")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--metrics-port", type=int, default=None, help="also serve Prometheus metrics over HTTP")
    parser.add_argument("--weights-dir", default=None, help="published-weights directory (python -m sage sleep): "
                        "serve its current version and hot-swap to each newer one")
    parser.add_argument("--reload-interval", type=float, default=2.0,
                        help="seconds between polls of --weights-dir (default 2)")
    parser.add_argument("--sleep-when-idle", type=float, default=None, metavar="SECONDS",
                        help="after this long without a request, run one sleep cycle in a child process "
                        "(needs --weights-dir, --experiences and --sleep-args)")
    parser.add_argument("--experiences", default=None, help="experience store the sleep cycle draws from")
    parser.add_argument("--sleep-args", default="", help="further `python -m sage sleep` flags, one string, "
                        "e.g. \"--heldout data/sudoku --task sudoku\"")


def main(args: argparse.Namespace) -> int:
    for flag in ("max_batch", "max_streams", "record_size", "capacity"):
        if getattr(args, flag) < 1:
            raise ServerError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_weights_flags(args)
    state_dir = args.state_dir or default_state_dir(args.inbox)
    lock = lock_state_dir(state_dir)
    try:
        return _serve(args, state_dir)
    finally:
        os.close(lock)


def check_weights_flags(args: argparse.Namespace) -> None:
    if args.reload_interval <= 0:
        raise ServerError(f"--reload-interval must be > 0 seconds, got {args.reload_interval}")
    if args.sleep_when_idle is None:
        return
    if args.sleep_when_idle <= 0:
        raise ServerError(f"--sleep-when-idle must be > 0 seconds, got {args.sleep_when_idle}")
    if not args.weights_dir or not args.experiences:
        raise ServerError("--sleep-when-idle needs --weights-dir (where the cycle publishes) and --experiences "
                          "(the store it draws from)")
    if "--heldout" not in shlex.split(args.sleep_args):
        raise ServerError("--sleep-when-idle needs the sleep cycle's held-out split: pass --sleep-args "
                          "\"--heldout DATASET_DIR ...\" (see python -m sage sleep --help)")


def sleep_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "sage", "sleep", "--weights", args.weights_dir, "--store", args.experiences,
            *shlex.split(args.sleep_args)]


def _serve(args: argparse.Namespace, state_dir: Path) -> int:
    def load(model: str) -> SegmentBackend:
        return load_backend(model, args.backend, device=args.device, config_path=args.config,
                            cache_dir=state_dir / "models", threads=args.threads)

    reloader = sleeper = None
    if args.weights_dir:
        current = read_current(args.weights_dir)
        backend = load(current["path"] if current else args.model)
        reloader = WeightsReloader(args.weights_dir, load, current["version"] if current else None,
                                   args.reload_interval)
        if args.sleep_when_idle is not None:
            sleeper = IdleSleeper(sleep_command(args), args.sleep_when_idle)
    else:
        backend = load(args.model)
    inbox = open_or_create(args.inbox, args.record_size, args.capacity)
    outbox = open_or_create(args.outbox, args.record_size, args.capacity)
    focus = open_or_create(args.focus_inbox, args.record_size, args.capacity) if args.focus_inbox else None
    try:
        server = Server(backend, inbox, outbox, state_dir, focus=focus, max_batch=args.max_batch,
                        max_wait=args.max_wait_ms / 1e3, max_live_streams=args.max_streams,
                        snapshot_interval=args.snapshot_interval, drain_timeout=args.drain_timeout,
                        reloader=reloader, sleeper=sleeper)
        if args.metrics_port:
            from prometheus_client import start_http_server  # an HTTP thread only when asked

            start_http_server(args.metrics_port, registry=server.telemetry.registry)
        signal.signal(signal.SIGTERM, server.request_stop)
        signal.signal(signal.SIGINT, server.request_stop)
        print(f"sage serve: {backend.name} model {args.model} on inbox {inbox.name!r}, answers to {outbox.name!r}, "
              f"state in {state_dir}", flush=True)
        return server.run()
    finally:
        for box in (inbox, outbox, focus):
            if box is not None:
                box.close()
