"""Image payloads and framed sockets for SerialEM's protocol, for both ends of the wire.

Split from the message codec (drivers/serialem/wire.py). Images travel as raw rows after
their header (doc section 5): ``image_to_bytes`` / ``image_from_bytes`` convert, and
``chunk_sizes`` says how SerialEM cuts them. The socket helpers read exactly the announced
number of bytes and translate every socket failure into a drivers.errors class: ``ConnectionLost`` when the peer goes away at a frame boundary,
``ProtocolError`` when it goes away inside a frame (the stream is then unusable), and
``DeviceTimeout`` on a socket timeout. The client (drivers/serialem/client.py) and the
simulated SerialEM (simulators/serialem_server.py) both use them.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.errors import ConnectionLost, DeviceTimeout, ProtocolError
from drivers.serialem.wire import (
    MAX_REPLY_BYTES,
    SERVER_CHUNK_BYTES,
    FrameRejected,
    HandshakeRequest,
    ImageInfo,
    ServerCode,
    WireLimitExceeded,
    encode_request,
)

_I32 = struct.Struct("<i")
_HANDSHAKE = encode_request(HandshakeRequest())


# --------------------------------------------------------------------------- images

_MODE_DTYPES: dict[int, tuple[np.dtype[Any], int]] = {
    0: (np.dtype("<u1"), 1), 1: (np.dtype("<i2"), 1), 2: (np.dtype("<f4"), 1),
    6: (np.dtype("<u2"), 1), 16: (np.dtype("<u1"), 3),
}


def mode_of(array: NDArray[Any]) -> int:
    """SerialEM image mode of a numpy array (2D, or HxWx3 uint8 for RGB)."""
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if array.ndim == 3 and array.shape[2] == 3 and dt == np.uint8:
        return 16
    if array.ndim == 2:
        for mode, (dtype, channels) in _MODE_DTYPES.items():
            if channels == 1 and dt == dtype:
                return mode
    raise WireLimitExceeded(f"array of dtype {array.dtype} and shape {array.shape} has no "
                            f"SerialEM mode (uint8, int16, float32, uint16, HxWx3 uint8)")


def image_to_bytes(array: NDArray[Any], row_bytes: int | None = None) -> tuple[ImageInfo, bytes]:
    """Raw bytes of an image and its header; rows are padded to ``row_bytes`` if given."""
    mode = mode_of(array)
    dtype, channels = _MODE_DTYPES[mode]
    height, width = array.shape[:2]
    data = np.ascontiguousarray(array, dtype=dtype)
    line = width * channels * dtype.itemsize
    row_bytes = line if row_bytes is None else row_bytes
    if row_bytes < line:
        raise WireLimitExceeded(f"row_bytes {row_bytes} shorter than a {line}-byte row")
    if row_bytes > line:
        padded = np.zeros((height, row_bytes), np.uint8)
        padded[:, :line] = data.view(np.uint8).reshape(height, line)
        raw = padded.tobytes()
    else:
        raw = data.tobytes()
    return ImageInfo(mode, row_bytes, width, height, len(raw), num_chunks(len(raw))), raw


def image_from_bytes(info: ImageInfo, data: bytes | bytearray | memoryview) -> NDArray[Any]:
    """A contiguous numpy image from the raw bytes of ``info`` (row padding dropped)."""
    if info.mode not in _MODE_DTYPES:
        raise ProtocolError(f"image mode {info.mode} is not one SerialEM sends")
    dtype, channels = _MODE_DTYPES[info.mode]
    line = info.width * channels * dtype.itemsize
    if (info.width < 1 or info.height < 1 or info.row_bytes < line
            or info.num_bytes != info.row_bytes * info.height or len(data) != info.num_bytes):
        raise ProtocolError(f"inconsistent image: {info} with {len(data)} bytes")
    shape: tuple[int, ...] = (info.height, info.width) if channels == 1 else \
        (info.height, info.width, channels)
    strides: tuple[int, ...] = (info.row_bytes, dtype.itemsize) if channels == 1 else \
        (info.row_bytes, channels, 1)
    view = np.ndarray(shape, dtype=dtype, buffer=memoryview(data), strides=strides)
    return np.ascontiguousarray(view).astype(dtype.newbyteorder("="), copy=False)


def num_chunks(num_bytes: int, max_chunk: int = SERVER_CHUNK_BYTES) -> int:
    """How many chunks SerialEM splits ``num_bytes`` into."""
    return (num_bytes + max_chunk - 1) // max_chunk


def chunk_sizes(num_bytes: int, chunks: int) -> list[int]:
    """Sizes of the chunks: ceil(num_bytes / chunks) each, the last one what remains."""
    if chunks < 1:
        raise ProtocolError(f"{chunks} chunks for {num_bytes} bytes")
    size = (num_bytes + chunks - 1) // chunks
    out = []
    left = num_bytes
    while left > 0:
        out.append(min(size, left))
        left -= out[-1]
    return out


# --------------------------------------------------------------------------- sockets


def _fill(sock: socket.socket, view: memoryview, at_boundary: bool) -> None:
    """Fill ``view`` from the socket, translating every way a read can fail."""
    n, got = len(view), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError as err:
            raise DeviceTimeout(f"no data within {sock.gettimeout()} s "
                                f"({got} of {n} bytes read)") from err
        except OSError as err:
            if got == 0 and at_boundary:
                raise ConnectionLost(f"connection lost: {err}") from err
            raise ProtocolError(f"connection lost after {got} of {n} bytes: {err}") from err
        if k == 0:
            if got == 0 and at_boundary:
                raise ConnectionLost("connection closed by peer")
            raise ProtocolError(f"truncated: connection closed after {got} of {n} bytes")
        got += k


def recv_exact(sock: socket.socket, n: int, *, at_boundary: bool = True) -> bytearray:
    """Read exactly ``n`` bytes.

    EOF or a reset before the first byte raises ``ConnectionLost`` when ``at_boundary`` (the
    peer closed between frames), otherwise and after the first byte ``ProtocolError`` (a
    truncated frame); a socket timeout raises ``DeviceTimeout``.
    """
    buf = bytearray(n)
    _fill(sock, memoryview(buf), at_boundary)
    return buf


def read_frame(sock: socket.socket, *, max_bytes: int = MAX_REPLY_BYTES) -> bytes:
    """Read one length-prefixed frame (prefix included).

    A length below 8 or above ``max_bytes`` raises ``FrameRejected`` (-4 / -5), since the
    stream cannot be trusted past it.
    """
    head = recv_exact(sock, 4)
    (total,) = _I32.unpack(head)
    if total < 8:
        raise FrameRejected(ServerCode.TOO_SHORT, f"frame length {total} below 8")
    if total > max_bytes:
        raise FrameRejected(ServerCode.TOO_BIG, f"frame length {total} above {max_bytes}")
    return bytes(head + recv_exact(sock, total - 4, at_boundary=False))


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Send everything or raise ``ConnectionLost`` (``DeviceTimeout`` on a send timeout)."""
    try:
        sock.sendall(data)
    except TimeoutError as err:
        raise DeviceTimeout(f"send did not complete within {sock.gettimeout()} s") from err
    except OSError as err:
        raise ConnectionLost(f"send failed: {err}") from err


def recv_image_chunks(sock: socket.socket, info: ImageInfo) -> bytearray:
    """Client side of an image get: read every chunk, sending ``[8][2]`` between chunks."""
    buf = bytearray(info.num_bytes)
    view, pos = memoryview(buf), 0
    for i, size in enumerate(chunk_sizes(info.num_bytes, info.num_chunks)):
        if i:
            send_all(sock, _HANDSHAKE)
        _fill(sock, view[pos:pos + size], at_boundary=False)
        pos += size
    return buf


def send_image_chunks(sock: socket.socket, data: bytes | bytearray | memoryview,
                      chunks: int) -> None:
    """Server side of an image get: send each chunk and require ``[8][2]`` between chunks."""
    view, pos = memoryview(data), 0
    sizes = chunk_sizes(len(view), chunks)
    for i, size in enumerate(sizes):
        send_all(sock, view[pos:pos + size])
        pos += size
        if i < len(sizes) - 1:
            frame = bytes(recv_exact(sock, 8, at_boundary=False))
            if frame != _HANDSHAKE:
                raise ProtocolError(f"expected handshake [8][2] after chunk {i}, "
                                    f"got {frame.hex()}")


def recv_image_stream(sock: socket.socket, num_bytes: int) -> bytearray:
    """Server side of an image put: the raw bytes, streamed without handshakes."""
    return recv_exact(sock, num_bytes, at_boundary=False)
