"""A pure-Python SerialEM client: the compiled ``serialem`` module's behaviour over a socket.

Why our own client: the compiled module is Windows-first, keeps its socket in globals (one
connection per process), has no timeouts and reports every failure as the same exception.
This client speaks the same bytes (drivers/serialem/wire.py), checks arguments against the
command table before sending (drivers/serialem/commands.py), raises drivers.errors classes,
and can be used from several threads: one lock spans a request and its reply.

Behaviour copied from the module (PySEMSocket.cpp, SerialEMModule.cpp):

- function 3 ("OK to run") before the first command and after any exit;
- on a failed send, or a connection closed/reset within ``resend_window_s`` after sending,
  reconnect and resend once (SerialEM replaces a stale connection; the command has not run);
- after a negative retval the socket is closed and reopened by the next call;
- regular commands wait for their reply as long as they take. Only status calls
  (``CommandTable.is_status``) have a reply timeout, ``status_timeout_s``; on expiry the
  socket is closed, because a late reply would otherwise answer the next request.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from typing import Any, Literal, Protocol, Self

import numpy as np
import structlog
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from drivers.clock import Clock, RealClock
from drivers.errors import (
    Aborted,
    ConfigError,
    ConnectionLost,
    DeviceBusy,
    DeviceTimeout,
    HardwareFault,
    InvalidState,
    ProtocolError,
)
from drivers.serialem.commands import EXIT_COMMAND, CommandTable
from drivers.serialem.framing import (
    image_from_bytes,
    image_to_bytes,
    num_chunks,
    read_frame,
    recv_image_chunks,
    send_all,
)
from drivers.serialem.wire import (
    CLIENT_CHUNK_BYTES,
    NUM_BUFFERS,
    NUM_FFT_BUFFERS,
    ErrorFlag,
    ErrorReply,
    Function,
    GetImageRequest,
    ImageInfo,
    OkToRunReply,
    OkToRunRequest,
    PutImageAck,
    PutImageRequest,
    RegularReply,
    Reply,
    ServerCode,
    WireLimitExceeded,
    decode_reply,
    encode_request,
)

log = structlog.get_logger(__name__)

DEFAULT_PORT = 48888
DEFAULT_HOST = "127.0.0.1"
BUFFER_PROCESSED = -1   # SerialEM's capture flag for a processed (not acquired) image

Result = None | float | str | tuple[float | str, ...]


class SerialEMScriptError(HardwareFault):
    """A command failed inside SerialEM; the message is SerialEM's own."""


class SerialEMExited(InvalidState):
    """SerialEM ended external control (a script ``Exit``); the next call restarts it."""

    retryable = True


class SerialEMLink(Protocol):
    """What the ElectronMicroscope over SerialEM needs, whichever backend carries it."""

    def call(self, name: str, *args: object) -> Result: ...

    def get_image(self, buffer: str = "A", *, fft: bool = False) -> NDArray[Any]: ...

    def put_image(self, image: NDArray[Any], buffer: str = "A", *,
                  base_buffer: str | None = None, more_binning: int = 1,
                  cap_flag: int = BUFFER_PROCESSED) -> None: ...

    def close(self) -> None: ...


def resolve_address(host: str | None, port: int | None,
                    environ: Mapping[str, str]) -> tuple[str, int]:
    """Host and port as the module picks them: given, else PY_SERIALEM_IP/PORT, else default."""
    host = host or environ.get("PY_SERIALEM_IP") or DEFAULT_HOST
    if port is None:
        text = environ.get("PY_SERIALEM_PORT")
        try:
            port = int(text) if text else DEFAULT_PORT
        except ValueError:
            raise ConfigError("PY_SERIALEM_PORT", f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ConfigError("em.serialem.port", f"{port} outside 1..65535")
    return host, port


def buffer_index(letter: str, fft: bool = False) -> int:
    """Buffer letter -> index (A = 0); FFT buffers exist for A..H only."""
    limit = NUM_FFT_BUFFERS if fft else NUM_BUFFERS
    index = ord(letter) - ord("A") if len(letter) == 1 else -1
    if not 0 <= index < limit:
        raise WireLimitExceeded(f"buffer {letter!r}{' (FFT)' if fft else ''} is not one of "
                                f"A..{chr(ord('A') + limit - 1)}")
    return index


class SerialEMClient:
    """One external-control connection to SerialEM.

    Parameters
    ----------
    host, port:
        SerialEM's address. The environment (PY_SERIALEM_IP / PY_SERIALEM_PORT) is read by
        ``open_serialem``, never here, so a client is exactly what its arguments say.
    status_timeout_s:
        Reply timeout for status calls only; long commands wait without limit.
    connect_timeout_s:
        Timeout of each TCP connect.
    resend_window_s:
        A connection that drops this soon after a request was sent is taken as stale and
        the request is resent once (the module uses 200 ms).
    """

    def __init__(self, host: str, port: int, *,
                 status_timeout_s: float = 10.0, connect_timeout_s: float = 5.0,
                 resend_window_s: float = 0.2, clock: Clock | None = None,
                 table: CommandTable | None = None) -> None:
        if not host:
            raise ConfigError("em.serialem.host", "must not be empty")
        if not 0 < port < 65536:
            raise ConfigError("em.serialem.port", f"{port} outside 1..65535")
        self.host, self.port = host, port
        if not (status_timeout_s > 0 and connect_timeout_s > 0 and resend_window_s >= 0):
            raise ConfigError("em.serialem", "timeouts must be positive")
        self.status_timeout_s = status_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.resend_window_s = resend_window_s
        self._clock = clock or RealClock()
        self._table = table or CommandTable.load()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._in_control = False
        self._closed = False

    # -- public ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection now (calls open it on demand anyway)."""
        with self._lock:
            self._socket()

    def call(self, name: str, *args: object) -> Result:
        """Run an external script command; None, a float, a str, or a tuple of them.

        Raises (before sending) UnknownCommand, NotExternalCommand, ArgumentError; (after)
        SerialEMScriptError, Aborted (user STOP), DeviceBusy, SerialEMExited, DeviceTimeout
        (status calls only), ConnectionLost, ProtocolError.
        """
        request = self._table.prepare(name, args)
        frame = encode_request(request)
        timeout = self.status_timeout_s if self._table.is_status(name) else None
        with self._lock:
            self._ensure_control()
            reply = self._exchange(frame, Function.REGULAR, timeout)
            if name == EXIT_COMMAND:
                self._in_control = False
            return self._regular_result(name, reply)

    def get_image(self, buffer: str = "A", *, fft: bool = False) -> NDArray[Any]:
        """The image in SerialEM buffer ``buffer`` as a contiguous array (rows as SerialEM
        holds them, probably Y-flipped relative to its MRC files); RGB comes as HxWx3."""
        request = GetImageRequest(buffer_index(buffer, fft), fft)
        with self._lock:
            self._ensure_control()
            reply = self._exchange(encode_request(request), Function.GET_IMAGE, None)
            self._raise_for_code(reply)
            assert isinstance(reply, ImageInfo)
            if reply.num_bytes == 0:
                raise InvalidState(f"there is no image in SerialEM buffer {buffer}")
            try:
                return image_from_bytes(reply, recv_image_chunks(self._socket(), reply))
            except (ConnectionLost, DeviceTimeout):   # ProtocolError included
                self._drop()
                raise

    def put_image(self, image: NDArray[Any], buffer: str = "A", *,
                  base_buffer: str | None = None, more_binning: int = 1,
                  cap_flag: int = BUFFER_PROCESSED) -> None:
        """Place ``image`` in SerialEM buffer ``buffer``, taking metadata from ``base_buffer``."""
        info, raw = image_to_bytes(np.asarray(image))
        request = PutImageRequest(
            mode=info.mode, width=info.width, height=info.height, num_bytes=info.num_bytes,
            to_buffer=buffer_index(buffer), base_buffer=buffer_index(base_buffer or buffer),
            more_binning=more_binning, cap_flag=cap_flag,
            num_chunks=num_chunks(info.num_bytes, CLIENT_CHUNK_BYTES))
        with self._lock:
            self._ensure_control()
            reply = self._exchange(encode_request(request), Function.PUT_IMAGE, None)
            self._raise_for_code(reply)
            try:
                send_all(self._socket(), raw)
            except ConnectionLost:
                self._drop()
                raise

    def close(self) -> None:
        """End external control with ``Exit 1`` if we hold it, then close the socket."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._sock is not None and self._in_control:
                    request = self._table.prepare(EXIT_COMMAND, (1,))
                    reply = self._exchange(encode_request(request), Function.REGULAR,
                                           self.status_timeout_s)
                    self._in_control = False
                    self._regular_result(EXIT_COMMAND, reply)
            finally:
                self._closed = True
                self._drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection --------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if self._closed:
            raise InvalidState("SerialEM client is closed")
        if self._sock is None:
            try:
                sock = socket.create_connection((self.host, self.port),
                                                timeout=self.connect_timeout_s)
            except OSError as err:
                raise ConnectionLost(f"cannot connect to SerialEM at {self.host}:{self.port}: "
                                     f"{err}") from err
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            log.info("serialem.connected", host=self.host, port=self.port)
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            log.info("serialem.disconnected", host=self.host, port=self.port)

    def _exchange(self, frame: bytes, function: Function, timeout: float | None) -> Reply:
        """Send a request and read its reply, reconnecting and resending once if stale."""
        for trial in (0, 1):
            sock = self._socket()
            try:
                sock.settimeout(None)
                send_all(sock, frame)
            except ConnectionLost as err:
                self._drop()
                if trial:
                    raise
                log.warning("serialem.resend", reason=str(err))
                continue
            sent_at = self._clock.now()
            try:
                sock.settimeout(timeout)
                reply = decode_reply(function, read_frame(sock))
                sock.settimeout(None)
            except (ProtocolError, DeviceTimeout):
                self._drop()
                raise
            except ConnectionLost as err:
                self._drop()
                if trial or self._clock.now() - sent_at >= self.resend_window_s:
                    raise
                log.warning("serialem.resend", reason=str(err))
                continue
            if isinstance(reply, ErrorReply):
                self._drop()     # the module closes after any negative code
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_control(self) -> None:
        if self._in_control:
            return
        reply = self._exchange(encode_request(OkToRunRequest()), Function.OK_TO_RUN, None)
        self._raise_for_code(reply)
        assert isinstance(reply, OkToRunReply)
        if not reply.ok:
            raise DeviceBusy("SerialEM is busy or another client holds external control")
        self._in_control = True

    # -- results -----------------------------------------------------------------------------

    def _raise_for_code(self, reply: Reply) -> None:
        if not isinstance(reply, ErrorReply):
            return
        code = reply.code
        if code == ServerCode.BUSY:
            raise DeviceBusy("SerialEM is busy or not under external control (-9)")
        if code == ServerCode.STOP_PENDING:
            self._in_control = False
            raise Aborted("the operator pressed STOP in SerialEM (-10)")
        if code in (ServerCode.MEMORY, ServerCode.REPLY_BUFFER):
            raise HardwareFault(f"SerialEM ran out of memory handling the request ({code})")
        raise ProtocolError(f"SerialEM refused the request frame ({code}); "
                            f"it may be older than this client")

    def _regular_result(self, name: str, reply: Reply) -> Result:
        self._raise_for_code(reply)
        if isinstance(reply, PutImageAck | ImageInfo | OkToRunReply):
            raise ProtocolError(f"unexpected reply {reply} to {name}")
        assert isinstance(reply, RegularReply)
        flag, values = reply.error_flag, reply.values
        if flag == ErrorFlag.EXIT_NO_EXCEPTION:
            self._in_control = False
            return None
        if flag == ErrorFlag.USER_STOP:
            self._in_control = False
            raise Aborted(f"{name}: the operator pressed STOP in SerialEM")
        if flag == ErrorFlag.NORMAL_EXIT:
            self._in_control = False
            raise SerialEMExited(f"{name}: SerialEM ended external control (normal exit)")
        if flag != ErrorFlag.OK:
            message = values[0] if values and isinstance(values[0], str) \
                else "No message from command error"
            raise SerialEMScriptError(f"{name}: {message}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- backends


class SerialEMSettings(BaseModel):
    """The ``[em.serialem]`` config table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["socket", "module"] = "socket"
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    status_timeout_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)


class ModuleClient:
    """The compiled ``serialem`` module behind the same interface, for sites that want it.

    Arguments are checked against the same command table; the module's exceptions are
    translated (SEMerror -> SerialEMScriptError, SEMexited -> Aborted/SerialEMExited,
    SEMmoduleError -> ConnectionLost).
    """

    def __init__(self, module: Any, host: str, port: int, *,
                 table: CommandTable | None = None) -> None:
        self._sem = module
        self._table = table or CommandTable.load()
        self._lock = threading.Lock()
        with self._lock, self._translated("ConnectToSEM"):
            module.ConnectToSEM(port, host)

    def call(self, name: str, *args: object) -> Result:
        self._table.prepare(name, args)
        with self._lock, self._translated(name):
            result: Result = getattr(self._sem, name)(*args)
        return result

    def get_image(self, buffer: str = "A", *, fft: bool = False) -> NDArray[Any]:
        spec = buffer + ("F" if fft else "")
        buffer_index(buffer, fft)
        with self._lock, self._translated("bufferImage"):
            return np.array(self._sem.bufferImage(spec), copy=True)

    def put_image(self, image: NDArray[Any], buffer: str = "A", *,
                  base_buffer: str | None = None, more_binning: int = 1,
                  cap_flag: int = BUFFER_PROCESSED) -> None:
        arr = np.ascontiguousarray(image)
        with self._lock, self._translated("PutImageInBuffer"):
            self._sem.PutImageInBuffer(arr, buffer, arr.shape[1], arr.shape[0],
                                       base_buffer or buffer, more_binning, cap_flag)

    def close(self) -> None:
        self.call(EXIT_COMMAND, 1)

    def _translated(self, name: str) -> _ModuleErrors:
        return _ModuleErrors(self._sem, name)


class _ModuleErrors:
    """Context manager translating the module's three exception classes."""

    def __init__(self, module: Any, name: str) -> None:
        self._m, self._name = module, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: object) -> None:
        if err is None:
            return
        text = f"{self._name}: {err}"
        if isinstance(err, self._m.SEMerror):
            raise SerialEMScriptError(text) from err
        if isinstance(err, self._m.SEMexited):
            if "STOP" in str(err):
                raise Aborted(text) from err
            raise SerialEMExited(text) from err
        if isinstance(err, self._m.SEMmoduleError):
            raise ConnectionLost(text) from err


def open_serialem(settings: SerialEMSettings, *, environ: Mapping[str, str] | None = None,
                  clock: Clock | None = None) -> SerialEMLink:
    """The configured backend: the pure-Python client unless ``backend = "module"``.

    The address is resolved here, as the compiled module does it: the settings' host and
    port, else PY_SERIALEM_IP / PY_SERIALEM_PORT from ``environ`` (default ``os.environ``),
    else 127.0.0.1:48888. Asking for the compiled module where it is not importable raises
    ConfigError. Nothing is connected yet: the first call connects.
    """
    env = os.environ if environ is None else environ
    host, port = resolve_address(settings.host, settings.port, env)
    if settings.backend == "module":
        try:
            import serialem  # type: ignore[import-not-found]  # optional compiled module
        except ImportError as err:
            raise ConfigError("em.serialem.backend", "'module' chosen but the compiled "
                              "serialem module is not importable") from err
        return ModuleClient(serialem, host, port)
    return SerialEMClient(host, port, status_timeout_s=settings.status_timeout_s,
                          connect_timeout_s=settings.connect_timeout_s, clock=clock)
