"""The request and response records of `python -m sage serve`: version 1, little-endian, one record each.

A request is one example (one row of a batch) for one stream; it fits one PBM record (sage.mailbox)
of the inbox. Layout (struct format `REQUEST_HEADER`, 52 bytes, then the variable parts in order):

    offset size field
     0      4   magic b"SGRQ"
     4      2   version (1)
     6      2   flags: bit 0 RESET_CARRY (start from H_init/L_init), bit 1 STATELESS (no stream carry)
     8      8   request_id (u64, chosen by the client, unique among its pending requests)
    16      8   deadline (f64, seconds since the Unix epoch; 0 = none)
    24      8   sent_at (f64, Unix seconds when the client built the request)
    32      4   priority (i32; larger is served first; ties FIFO)
    36      4   puzzle_identifier (i32)
    40      2   max_steps (u16; 0 = the model's halt_max_steps)
    42      1   token dtype: 1 = uint8, 2 = int32
    43      1   reserved (0)
    44      2   stream id length S (bytes of UTF-8)
    46      2   reply-to mailbox name length R (bytes of UTF-8; 0 = the server's --outbox)
    48      4   number of tokens N
    52      S   stream id, then R bytes reply-to, then N tokens of the token dtype

A response (struct `RESPONSE_HEADER`, 48 bytes, then the message and the prediction):

     0      4   magic b"SGRS"
     4      2   version (1)
     6      1   status (Status)
     7      1   token dtype of the prediction (1 = uint8, 2 = int32)
     8      8   request_id
    16      4   steps (ACT segments run for this request)
    20      4   q_halt (f32, the Q head's halt logit of the last segment)
    24      4   q_continue (f32)
    28      4   latency (f32 seconds, from the server popping the request to sending the answer)
    32      4   queue_wait (f32 seconds spent queued before the first segment)
    36      4   batch (u32, rows in the batch of the last segment)
    40      2   message length M (UTF-8; the reason for a non-OK status)
    42      2   reserved (0)
    44      4   number of prediction tokens N (0 unless status is OK or EXPIRED with a partial answer)
    48      M   message, then N prediction tokens

Tokens go as uint8 when every value fits (Sudoku, mazes, ARC), else int32. A reader refuses another
magic or version with ProtocolError, so a server and a client of different versions fail loudly.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

import numpy as np

REQUEST_MAGIC, RESPONSE_MAGIC = b"SGRQ", b"SGRS"
VERSION = 1
REQUEST_HEADER = struct.Struct("<4sHHQddiiHBxHHI")
RESPONSE_HEADER = struct.Struct("<4sHBBQIffffIHxxI")
FLAG_RESET_CARRY, FLAG_STATELESS = 1, 2
_TOKEN_DTYPES = {1: np.uint8, 2: np.int32}
MAX_NAME_BYTES = 1024


class ProtocolError(ValueError):
    """A record that is not a valid version-1 request or response."""


class Status(enum.IntEnum):
    OK = 0
    EXPIRED = 1  # the deadline passed before the answer was ready (a partial answer may be attached)
    BAD_REQUEST = 2  # the record or its input does not fit the model; the message says why
    SHUTDOWN = 3  # the server stopped before it could run the request; send it again
    ERROR = 4  # the backend failed on this batch; the message says how


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: int
    inputs: np.ndarray  # int[seq_len] tokens of one example
    puzzle_identifier: int = 0
    stream: str = ""  # "" = stateless
    priority: int = 0
    deadline: float = 0.0  # Unix seconds; 0 = none
    sent_at: float = 0.0
    max_steps: int = 0
    reset_carry: bool = False
    reply_to: str = ""

    @property
    def stateful(self) -> bool:
        return bool(self.stream)


@dataclasses.dataclass(frozen=True)
class Response:
    request_id: int
    status: Status
    prediction: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    steps: int = 0
    q_halt: float = 0.0
    q_continue: float = 0.0
    latency: float = 0.0
    queue_wait: float = 0.0
    batch: int = 0
    message: str = ""


def _token_code(tokens: np.ndarray) -> int:
    return 1 if tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 256) else 2


def _encode_tokens(tokens: np.ndarray) -> tuple[int, bytes]:
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ProtocolError(f"tokens must be integers, got dtype {tokens.dtype}")
    code = _token_code(tokens)
    return code, tokens.astype(np.dtype(_TOKEN_DTYPES[code]).newbyteorder("<")).tobytes()


def _decode_tokens(code: int, count: int, data: bytes, offset: int) -> np.ndarray:
    if code not in _TOKEN_DTYPES:
        raise ProtocolError(f"unknown token dtype code {code}")
    dtype = np.dtype(_TOKEN_DTYPES[code]).newbyteorder("<")
    end = offset + count * dtype.itemsize
    if end != len(data):
        raise ProtocolError(f"record holds {len(data)} bytes, its header announces {end}")
    return np.frombuffer(data, dtype, count, offset).astype(np.int32)


def _name_bytes(text: str, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_NAME_BYTES:
        raise ProtocolError(f"{what} is {len(raw)} bytes long; at most {MAX_NAME_BYTES}")
    return raw


def encode_request(request: Request) -> bytes:
    code, tokens = _encode_tokens(request.inputs)
    stream, reply = _name_bytes(request.stream, "stream id"), _name_bytes(request.reply_to, "reply-to name")
    flags = (FLAG_RESET_CARRY if request.reset_carry else 0) | (0 if request.stateful else FLAG_STATELESS)
    if not 0 <= request.max_steps < 1 << 16:
        raise ProtocolError(f"max_steps must be in 0..65535, got {request.max_steps}")
    header = REQUEST_HEADER.pack(REQUEST_MAGIC, VERSION, flags, request.request_id, request.deadline,
                                 request.sent_at, request.priority, request.puzzle_identifier, request.max_steps,
                                 code, len(stream), len(reply), np.asarray(request.inputs).size)
    return header + stream + reply + tokens


def _check_magic(data: bytes, header: struct.Struct, magic: bytes, what: str) -> tuple:
    if len(data) < header.size:
        raise ProtocolError(f"a {what} record needs at least {header.size} bytes, got {len(data)}")
    fields = header.unpack_from(data)
    if fields[0] != magic:
        raise ProtocolError(f"not a sage {what} record (magic {fields[0]!r}, expected {magic!r})")
    if fields[1] != VERSION:
        raise ProtocolError(f"{what} record version {fields[1]}, this build speaks version {VERSION}")
    return fields


def decode_request(data: bytes) -> Request:
    (_, _, flags, request_id, deadline, sent_at, priority, puzzle_identifier, max_steps, code, stream_len,
     reply_len, count) = _check_magic(data, REQUEST_HEADER, REQUEST_MAGIC, "request")
    offset = REQUEST_HEADER.size
    try:
        stream = data[offset:offset + stream_len].decode()
        reply = data[offset + stream_len:offset + stream_len + reply_len].decode()
    except UnicodeDecodeError as err:
        raise ProtocolError(f"stream id or reply-to name is not UTF-8 ({err})") from None
    inputs = _decode_tokens(code, count, data, offset + stream_len + reply_len)
    return Request(request_id, inputs, puzzle_identifier, "" if flags & FLAG_STATELESS else stream, priority,
                   deadline, sent_at, max_steps, bool(flags & FLAG_RESET_CARRY), reply)


def encode_response(response: Response) -> bytes:
    code, tokens = _encode_tokens(response.prediction)
    message = response.message.encode()[:4096]
    header = RESPONSE_HEADER.pack(RESPONSE_MAGIC, VERSION, int(response.status), code, response.request_id,
                                  response.steps, response.q_halt, response.q_continue, response.latency,
                                  response.queue_wait, response.batch, len(message),
                                  np.asarray(response.prediction).size)
    return header + message + tokens


def decode_response(data: bytes) -> Response:
    (_, _, status, code, request_id, steps, q_halt, q_continue, latency, queue_wait, batch, message_len,
     count) = _check_magic(data, RESPONSE_HEADER, RESPONSE_MAGIC, "response")
    offset = RESPONSE_HEADER.size
    message = data[offset:offset + message_len].decode(errors="replace")
    prediction = _decode_tokens(code, count, data, offset + message_len)
    try:
        status = Status(status)
    except ValueError:
        raise ProtocolError(f"unknown response status {status}") from None
    return Response(request_id, status, prediction, steps, q_halt, q_continue, latency, queue_wait, batch, message)


def peek_request_id(data: bytes) -> int | None:
    """The request id of a record too damaged to decode, so the server can still answer it."""
    if len(data) >= 16 and data[:4] == REQUEST_MAGIC:
        return struct.unpack_from("<Q", data, 8)[0]
    return None
