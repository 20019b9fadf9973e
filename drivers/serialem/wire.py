"""The byte codec of SerialEM's external-Python socket protocol, for both ends of the wire.

docs/serialem-socket-protocol.md is the contract; this module is its executable form. The
client (drivers/serialem/client.py) encodes requests and decodes replies; the simulated
SerialEM (simulators/serialem_server.py) decodes requests and encodes replies with the same
functions, so the two can never disagree about a byte. Where the document is silent the
behaviour follows SerialEM's BaseServer.cpp/PythonServer.cpp and the module's
PySEMSocket.cpp/SerialEMModule.cpp.

Everything here is a pure function or a frozen dataclass over the protocol's messages. Image
payloads (bytes <-> numpy, chunking) and reading and writing on sockets are
drivers/serialem/framing.py.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from drivers.errors import ClemdError, ProtocolError

# --------------------------------------------------------------------------- constants


class Function(IntEnum):
    """Function codes: the second int32 of every request."""

    REGULAR = 1
    HANDSHAKE = 2
    OK_TO_RUN = 3
    GET_IMAGE = 4
    PUT_IMAGE = 5


class ServerCode(IntEnum):
    """Negative retvals SerialEM sends as an 8-byte reply ``[8][code]``."""

    UNKNOWN_FUNCTION = -1
    MEMORY = -2
    REPLY_BUFFER = -3
    TOO_SHORT = -4
    TOO_BIG = -5
    WRONG_LENGTH = -6
    BUSY = -9
    STOP_PENDING = -10


class ErrorFlag(IntEnum):
    """The error flag of a regular-command reply (its second long)."""

    OK = 0
    SCRIPT_ERROR = 1
    NORMAL_EXIT = -123456
    EXIT_NO_EXCEPTION = -654321
    USER_STOP = -234561


MAX_LONGS = 16          # per frame, including the function code / retval
MAX_BOOLS = 8
MAX_DOUBLES = 8
MAX_ARGS = 19           # command arguments (slots 1..19)
MAX_REPORTED = 6        # reported values in a reply
# SerialEM's receive buffer is 1024 bytes and regrows when a frame exceeds 1020; keep below.
MAX_REQUEST_BYTES = 1020
MAX_REPLY_BYTES = 1 << 24
SERVER_CHUNK_BYTES = 33_620_000      # BaseServer mSuperChunkSize: image get
CLIENT_CHUNK_BYTES = 336_200_000     # PySEMSocket mSuperChunkSize: image put
NUM_BUFFERS = 20
NUM_FFT_BUFFERS = 8

_I32 = struct.Struct("<i")
_HEADER = struct.Struct("<ii")
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


class FrameRejected(ProtocolError):
    """A request the server must refuse; ``code`` is the negative retval SerialEM sends."""

    def __init__(self, code: ServerCode, message: str) -> None:
        super().__init__(f"{message} (SerialEM answers {int(code)})")
        self.code = code


class WireLimitExceeded(ClemdError, ValueError):
    """A value does not fit the protocol's limits; raised before anything is sent."""


# --------------------------------------------------------------------------- numbers


def format_double(value: float) -> str:
    """The module's text for a double: ``%f`` with trailing zeros stripped (10.0 -> "10.")."""
    text = f"{value:f}"
    return text.rstrip("0") if "." in text else text


def format_int(value: int) -> str:
    """The module's text for an int: ``%d``."""
    return f"{value:d}"


_ATOF = re.compile(r"\s*([+-]?(?:0[xX][0-9a-fA-F]*\.?[0-9a-fA-F]*(?:[pP][+-]?\d+)?"
                   r"|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))", re.IGNORECASE)


def c_atof(text: str) -> float:
    """C ``atof``: the numeric prefix of ``text``, 0.0 if none (the double of a string arg)."""
    m = _ATOF.match(text)
    if not m:
        return 0.0
    s = m.group(1)
    if "x" in s.lower():
        body = s.lstrip("+-")[2:]
        if not body.strip("."):
            return 0.0   # "0x" alone: C reads the 0
        return float.fromhex(s if "p" in s.lower() else s + "p0")
    return float(s)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class WireArg:
    """One argument slot: what SerialEM reads is the string (empty = omitted) and the double."""

    text: str
    number: float
    integer: int = 0   # the module always sends 0 here


@dataclass(frozen=True)
class RegularRequest:
    """Function 1: run script command ``command_index`` with arguments in slots 1..N."""

    command_index: int
    args: tuple[WireArg, ...] = ()


@dataclass(frozen=True)
class OkToRunRequest:
    """Function 3: ask to start external control."""


@dataclass(frozen=True)
class HandshakeRequest:
    """Function 2: the client's acknowledgement after an image chunk."""


@dataclass(frozen=True)
class GetImageRequest:
    """Function 4: send the image in buffer ``buffer_index`` (0 = A), or its FFT buffer."""

    buffer_index: int
    fft: bool = False


@dataclass(frozen=True)
class PutImageRequest:
    """Function 5: ``num_bytes`` of raw image follow the ``[8][0]`` acknowledgement."""

    mode: int
    width: int
    height: int
    num_bytes: int
    to_buffer: int
    base_buffer: int
    more_binning: int = 1
    cap_flag: int = -1
    num_chunks: int = 1


Request = RegularRequest | OkToRunRequest | HandshakeRequest | GetImageRequest | PutImageRequest


@dataclass(frozen=True)
class RegularReply:
    """Function 1 answer: ``values`` are the reported values (str or float), at most six."""

    error_flag: int = ErrorFlag.OK
    values: tuple[float | str, ...] = ()


@dataclass(frozen=True)
class ImageInfo:
    """Function 4 answer: the image's geometry; ``num_bytes`` raw bytes follow in chunks."""

    mode: int
    row_bytes: int
    width: int
    height: int
    num_bytes: int
    num_chunks: int


@dataclass(frozen=True)
class ErrorReply:
    """A negative retval: the request was refused (busy, STOP, malformed...)."""

    code: int


@dataclass(frozen=True)
class OkToRunReply:
    ok: bool


@dataclass(frozen=True)
class PutImageAck:
    """``[8][0]``: the server is ready for the raw image bytes."""


Reply = RegularReply | ImageInfo | ErrorReply | OkToRunReply | PutImageAck

# (longs in, bools in, doubles in, longs out, bools out, doubles out) besides code/retval
_LAYOUT: dict[int, tuple[int, int, int, int, int, int]] = {
    Function.REGULAR: (3, 0, 0, 3, 0, 0),
    Function.OK_TO_RUN: (0, 0, 0, 0, 1, 0),
    Function.GET_IMAGE: (2, 0, 0, 6, 0, 0),
    Function.PUT_IMAGE: (9, 0, 0, 0, 0, 0),
}


# --------------------------------------------------------------------------- packing


def _check_i32(value: int, what: str) -> int:
    if not _I32_MIN <= int(value) <= _I32_MAX:
        raise WireLimitExceeded(f"{what} {value} does not fit an int32")
    return int(value)


def _frame(code: int, longs: Sequence[int] = (), bools: Sequence[bool] = (),
           doubles: Sequence[float] = (), array: bytes = b"") -> bytes:
    """``[total][code] longs bools doubles array`` with the limits of both ends checked."""
    if len(longs) + 1 > MAX_LONGS or len(bools) > MAX_BOOLS or len(doubles) > MAX_DOUBLES:
        raise WireLimitExceeded(f"{len(longs) + 1} longs, {len(bools)} BOOLs, {len(doubles)} "
                                f"doubles exceed {MAX_LONGS}/{MAX_BOOLS}/{MAX_DOUBLES}")
    body = b"".join((
        struct.pack(f"<{len(longs) + 1}i", _check_i32(code, "code"),
                    *(_check_i32(v, "long") for v in longs)),
        struct.pack(f"<{len(bools)}i", *(1 if b else 0 for b in bools)),
        struct.pack(f"<{len(doubles)}d", *doubles),
        array,
    ))
    return _I32.pack(len(body) + 4) + body


def _words(nbytes: int) -> int:
    """Array length in words for ``nbytes`` before the terminating NUL (doc section 2)."""
    return (nbytes + 5) // 4


def _pad(data: bytes, words: int) -> bytes:
    return data + b"\0" * (words * 4 - len(data))


def _cstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise WireLimitExceeded(f"string {text!r} contains a NUL byte")
    return raw + b"\0"


def request_array(args: Sequence[WireArg]) -> bytes:
    """The long-array of a regular request: ints, doubles, strings of slots 0..N, NUL, pad."""
    if len(args) > MAX_ARGS:
        raise WireLimitExceeded(f"{len(args)} arguments exceed {MAX_ARGS}")
    if not args:
        return b"\0\0\0\0"
    slots = (WireArg("", 0.0, 0), *args)
    data = b"".join((
        struct.pack(f"<{len(slots)}i", *(_check_i32(a.integer, "int arg") for a in slots)),
        struct.pack(f"<{len(slots)}d", *(float(a.number) for a in slots)),
        *(_cstr(a.text) for a in slots),
    ))
    return _pad(data, _words(len(data)))


def reply_array(values: Sequence[float | str]) -> bytes:
    """The long-array of a regular reply: is-string flags, doubles, flagged strings, NUL."""
    if len(values) > MAX_REPORTED:
        raise WireLimitExceeded(f"{len(values)} reported values exceed {MAX_REPORTED}")
    flags = [1 if isinstance(v, str) else 0 for v in values]
    data = b"".join((
        struct.pack(f"<{len(values)}i", *flags),
        struct.pack(f"<{len(values)}d", *(0.0 if isinstance(v, str) else float(v)
                                          for v in values)),
        *(_cstr(v) for v in values if isinstance(v, str)),
    ))
    return _pad(data, _words(len(data)))


# --------------------------------------------------------------------------- encode


def encode_request(request: Request) -> bytes:
    """Bytes of any request, as the compiled module sends them."""
    if isinstance(request, RegularRequest):
        array = request_array(request.args)
        frame = _frame(Function.REGULAR, (request.command_index, len(request.args),
                                          len(array) // 4), array=array)
        if len(frame) > MAX_REQUEST_BYTES:
            raise WireLimitExceeded(f"request of {len(frame)} bytes exceeds "
                                    f"{MAX_REQUEST_BYTES} (shorten the string arguments)")
        return frame
    if isinstance(request, OkToRunRequest):
        return _frame(Function.OK_TO_RUN)
    if isinstance(request, HandshakeRequest):
        return _frame(Function.HANDSHAKE)
    if isinstance(request, GetImageRequest):
        limit = NUM_FFT_BUFFERS if request.fft else NUM_BUFFERS
        if not 0 <= request.buffer_index < limit:
            raise WireLimitExceeded(f"buffer index {request.buffer_index} outside [0, {limit})")
        return _frame(Function.GET_IMAGE, (request.buffer_index, int(request.fft)))
    r = request
    return _frame(Function.PUT_IMAGE, (r.mode, r.width, r.height, r.num_bytes, r.to_buffer,
                                       r.base_buffer, r.more_binning, r.cap_flag, r.num_chunks))


def encode_reply(reply: Reply) -> bytes:
    """Bytes of any reply, as SerialEM sends them (server side)."""
    if isinstance(reply, RegularReply):
        array = reply_array(reply.values)
        return _frame(0, (len(reply.values) - 1, reply.error_flag, len(array) // 4), array=array)
    if isinstance(reply, OkToRunReply):
        return _frame(0, bools=(reply.ok,))
    if isinstance(reply, ImageInfo):
        i = reply
        return _frame(0, (i.mode, i.row_bytes, i.width, i.height, i.num_bytes, i.num_chunks))
    if isinstance(reply, ErrorReply):
        return encode_error(reply.code)
    return _frame(0)


def encode_error(code: int) -> bytes:
    """``[8][code]``: the emergency reply SerialEM sends for a negative retval."""
    return _frame(code)


# --------------------------------------------------------------------------- decode


def _header(frame: bytes) -> tuple[int, int]:
    if len(frame) < 8:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than its 8-byte header")
    total, code = _HEADER.unpack_from(frame)
    if total != len(frame):
        raise ProtocolError(f"frame announces {total} bytes but holds {len(frame)}")
    return total, code


def _split_strings(blob: bytes, count: int) -> tuple[list[str], int]:
    """``count`` NUL-terminated strings from ``blob``; returns them and the bytes used."""
    out, pos = [], 0
    for _ in range(count):
        end = blob.find(b"\0", pos)
        if end < 0:
            raise ProtocolError("string runs past the end of the array")
        out.append(blob[pos:end].decode("utf-8", errors="replace"))
        pos = end + 1
    return out, pos


def decode_request(frame: bytes) -> Request:
    """Parse one request (server side); ``FrameRejected`` carries the code to answer with."""
    if len(frame) < 8:
        raise FrameRejected(ServerCode.TOO_SHORT, f"request of {len(frame)} bytes")
    total, func = _HEADER.unpack_from(frame)
    if total != len(frame):
        raise FrameRejected(ServerCode.WRONG_LENGTH,
                            f"request announces {total} bytes but holds {len(frame)}")
    if func == Function.HANDSHAKE:
        if total != 8:
            raise FrameRejected(ServerCode.WRONG_LENGTH, f"handshake of {total} bytes")
        return HandshakeRequest()
    if func not in _LAYOUT:
        raise FrameRejected(ServerCode.UNKNOWN_FUNCTION, f"function code {func}")
    n_longs = _LAYOUT[func][0]
    needed = 8 + 4 * n_longs
    if total < needed:
        raise FrameRejected(ServerCode.TOO_SHORT, f"function {func} needs {needed} bytes, "
                                                  f"got {total}")
    longs = struct.unpack_from(f"<{n_longs}i", frame, 8)
    if func == Function.OK_TO_RUN:
        req: Request = OkToRunRequest()
    elif func == Function.GET_IMAGE:
        req = GetImageRequest(longs[0], bool(longs[1]))
    elif func == Function.PUT_IMAGE:
        req = PutImageRequest(*longs)
    else:
        index, n_args, words = longs
        needed += 4 * words
        if words < 1 or total != needed:
            raise FrameRejected(ServerCode.WRONG_LENGTH, f"regular command with {words} array "
                                                         f"words needs {needed} bytes, got {total}")
        if not 0 <= n_args <= MAX_ARGS:
            raise FrameRejected(ServerCode.TOO_BIG, f"{n_args} arguments (max {MAX_ARGS})")
        req = RegularRequest(index, _decode_request_args(frame[20:], n_args))
    if func != Function.REGULAR and total != needed:
        raise FrameRejected(ServerCode.WRONG_LENGTH, f"function {func} needs {needed} bytes, "
                                                     f"got {total}")
    return req


def _decode_request_args(array: bytes, n_args: int) -> tuple[WireArg, ...]:
    if n_args == 0:
        return ()
    slots = n_args + 1
    head = slots * 12
    if len(array) < head:
        raise FrameRejected(ServerCode.WRONG_LENGTH, f"array of {len(array)} bytes cannot hold "
                                                     f"{slots} argument slots")
    ints = struct.unpack_from(f"<{slots}i", array, 0)
    dbls = struct.unpack_from(f"<{slots}d", array, slots * 4)
    try:
        texts, _ = _split_strings(array[head:], slots)
    except ProtocolError as err:
        raise FrameRejected(ServerCode.WRONG_LENGTH, str(err)) from err
    return tuple(WireArg(t, d, i) for t, d, i in zip(texts[1:], dbls[1:], ints[1:], strict=True))


def decode_reply(function: Function, frame: bytes) -> Reply:
    """Parse the reply to ``function`` (client side); anything inconsistent -> ProtocolError."""
    total, retval = _header(frame)
    if retval < 0:
        if total != 8:
            raise ProtocolError(f"negative retval {retval} in a {total}-byte reply (expected 8)")
        return ErrorReply(retval)
    if retval > 0:
        raise ProtocolError(f"positive retval {retval} is not defined by the protocol")
    _, _, _, n_longs, n_bools, _ = _LAYOUT[function]
    needed = 8 + 4 * (n_longs + n_bools)
    if function == Function.REGULAR:
        if total < needed:
            raise ProtocolError(f"regular reply of {total} bytes is shorter than {needed}")
        high, flag, words = struct.unpack_from("<3i", frame, 8)
        return RegularReply(flag, _decode_reply_values(frame[20:], high, words))
    if total != needed:
        raise ProtocolError(f"reply to function {int(function)} has {total} bytes, "
                            f"expected {needed}")
    if function == Function.OK_TO_RUN:
        return OkToRunReply(_I32.unpack_from(frame, 8)[0] != 0)
    if function == Function.GET_IMAGE:
        info = ImageInfo(*struct.unpack_from("<6i", frame, 8))
        if info.num_bytes < 0 or (info.num_bytes > 0 and info.num_chunks < 1):
            raise ProtocolError(f"inconsistent image header {info}")
        return info
    return PutImageAck()


def _decode_reply_values(array: bytes, high: int, words: int) -> tuple[float | str, ...]:
    if not -1 <= high < MAX_REPORTED:
        raise ProtocolError(f"highest reported index {high} outside [-1, {MAX_REPORTED - 1}]")
    if len(array) != 4 * words:
        raise ProtocolError(f"reply array announces {words} words but holds {len(array)} bytes")
    n = high + 1
    if len(array) < 12 * n + 1:
        raise ProtocolError(f"reply array of {len(array)} bytes cannot hold {n} values")
    flags = struct.unpack_from(f"<{n}i", array, 0)
    dbls = struct.unpack_from(f"<{n}d", array, 4 * n)
    texts, used = _split_strings(array[12 * n:], sum(1 for f in flags if f))
    if _words(12 * n + used) != words:
        raise ProtocolError(f"reply array of {words} words does not match its contents "
                            f"({_words(12 * n + used)} words)")
    it = iter(texts)
    return tuple(next(it) if f else float(d) for f, d in zip(flags, dbls, strict=True))
