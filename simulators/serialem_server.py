"""A SerialEM twin on TCP: SerialEM's external-Python socket protocol over a simulated TEM.

Any SerialEM client (clemd's drivers/serialem, the compiled ``serialem`` module) can connect
to it as it would to SerialEM; behind it is a ``SimulatedElectronMicroscope`` on its virtual
clock, so commands answer at once in wall time while simulated time advances.

What it copies from SerialEM (docs/serialem-socket-protocol.md, BaseServer.cpp,
PythonServer.cpp):

- one client per port; a new connection replaces the old one, and a client that goes away
  ends external control;
- function 3 answers TRUE only when it starts external control (FALSE when busy or already
  in control); any other function arriving outside control starts it, or answers -9 when
  SerialEM is busy and -10 when the operator pressed STOP; STOP during control ends the next
  command with the user-STOP flag;
- a failed command answers error flag 1 with SerialEM's message in slot 0; an out-of-bounds
  command index answers error flag 1 with the previous reply's values, as SerialEM does
  (CMacCmd::TaskDone logs its message and never sets the reply); ``Exit`` ends control;
- SerialEM neither counts arguments nor refuses script-only commands (the serialem module
  does both before sending): the twin refuses a short call with its own message and
  answers a command it has no handler for as not implemented;
- images: buffers A-T, new acquisitions roll into A, gets in chunks with a ``[8][2]``
  handshake between chunks, puts streamed without handshakes;
- malformed frames answer their negative code; a frame whose length cannot be trusted
  (garbage, oversized), a truncated frame or a half-closed socket drops that connection and
  the twin keeps serving. One write per reply, TCP_NODELAY.

Test hooks model the operator, not faults inside SerialEM: ``press_stop()``,
``set_busy(True)``. Faults are typed options (``TwinFaults``).

``main(argv)`` runs it standalone: ``clemd sim serialem --port 48888 [--seed N] [--camera 512]``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Self

import structlog

from drivers.base import ElectronMicroscope
from drivers.clock import VirtualClock
from drivers.errors import ConnectionLost, DeviceTimeout, ProtocolError
from drivers.serialem.commands import EXIT_COMMAND, CommandTable, UnknownCommand
from drivers.serialem.config import SerialEMConfig
from drivers.serialem.framing import (
    image_from_bytes,
    image_to_bytes,
    num_chunks,
    read_frame,
    recv_image_stream,
    send_all,
    send_image_chunks,
)
from drivers.serialem.wire import (
    NUM_BUFFERS,
    SERVER_CHUNK_BYTES,
    ErrorFlag,
    FrameRejected,
    GetImageRequest,
    HandshakeRequest,
    ImageInfo,
    OkToRunReply,
    OkToRunRequest,
    PutImageAck,
    PutImageRequest,
    RegularReply,
    RegularRequest,
    Request,
    ServerCode,
    decode_request,
    encode_error,
    encode_reply,
)
from simulators.serialem_commands import COMMANDS
from simulators.serialem_focus_commands import FOCUS_COMMANDS
from simulators.serialem_montage_commands import MONTAGE_COMMANDS
from simulators.serialem_nav_commands import NAV_COMMANDS
from simulators.serialem_state import ScriptError, SerialEMState, image_buffer, run

log = structlog.get_logger(__name__)

DEFAULT_PORT = 48888
MAX_REQUEST_FRAME = 64 * 1024      # SerialEM regrows its buffer; anything this big is garbage
MAX_PUT_BYTES = 1 << 30
_NO_IMAGE = ImageInfo(0, 0, 0, 0, 0, 0)
HANDLERS = {**COMMANDS, **FOCUS_COMMANDS, **NAV_COMMANDS, **MONTAGE_COMMANDS}


@dataclass(frozen=True)
class TwinFaults:
    """Faults the twin injects, for tests of the client's recovery.

    ``drop_link_after_n``: the n-th regular command (counted from 1 over the twin's life) is
    not run; its connection is cut instead, once, as a network fault would.
    ``drop_link_on``: the same for the first regular command with this name (``"Montage"``:
    the link goes down while SerialEM would be montaging).
    """

    drop_link_after_n: int | None = None
    drop_link_on: str | None = None


class SerialEMTwin:
    """The simulated SerialEM server. ``start()`` binds and serves on background threads.

    Parameters
    ----------
    em:
        The microscope behind it (a ``SimulatedElectronMicroscope``); the twin does not own it.
    host, port:
        Where to listen; port 0 picks a free port (see ``address``).
    chunk_bytes:
        Largest image chunk of a get (SerialEM: 33,620,000); smaller in tests to exercise the
        handshakes.
    """

    def __init__(self, em: ElectronMicroscope, *, host: str = "127.0.0.1", port: int = 0,
                 faults: TwinFaults | None = None, chunk_bytes: int = SERVER_CHUNK_BYTES,
                 table: CommandTable | None = None) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.em = em
        self.state = SerialEMState(em)
        self.faults = faults or TwinFaults()
        self._host, self._port = host, port
        self._chunk_bytes = chunk_bytes
        self._table = table or CommandTable.load()
        self._lock = threading.Lock()          # SerialEM runs one thing at a time
        self._conn_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._in_control = False
        self._busy = False
        self._stop_pending = False
        self._regular_count = 0
        self._dropped_on = False
        self._last_values: tuple[float | str, ...] = ()   # what the last reply reported
        self.connections = 0

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind, listen and accept on a background thread."""
        if self._listener is not None:
            raise RuntimeError("the twin is already started")
        self._listener = socket.create_server((self._host, self._port))
        thread = threading.Thread(target=self._accept_loop, name="serialem-twin-accept",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()
        log.info("serialem_twin.listening", host=self.address[0], port=self.address[1])
        return self

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the twin is not started")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop accepting, cut the connection, and join every thread."""
        with self._conn_lock:
            self._closing = True
            conn, listener = self._conn, self._listener
        for sock in (listener, conn):
            if sock is not None:
                with contextlib.suppress(OSError):   # already shut down by its peer
                    sock.shutdown(socket.SHUT_RDWR)
        if listener is not None:
            listener.close()
        for thread in self._threads:
            thread.join(10)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._threads:
            raise RuntimeError(f"{len(self._threads)} twin threads did not stop")

    def __enter__(self) -> Self:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operator hooks -----------------------------------------------------------------------

    def press_stop(self) -> None:
        """The operator presses STOP: the next command (or function) is refused as stopped."""
        with self._lock:
            self._stop_pending = True

    def set_busy(self, busy: bool) -> None:
        """SerialEM runs something of its own: external control cannot start meanwhile."""
        with self._lock:
            self._busy = busy

    def driver_config(self, **overrides: Any) -> SerialEMConfig:
        """Settings for drivers/serialem that match this twin's microscope and address."""
        em = self.em
        host, port = self.address
        values: dict[str, Any] = {
            "host": host, "port": port,
            "magnifications": [{"index": m.index, "magnification": m.magnification,
                                "pixel_size_um": m.pixel_size_um, "rotation_deg": m.rotation_deg}
                               for m in em.magnifications.values()],
            "low_dose": {area.name.lower(): {
                "mag_index": s.mag_index, "exposure_s": s.exposure_s, "binning": s.binning,
                "dose_rate_e_per_a2_s": s.dose_rate_e_per_a2_s,
                "defocus_offset_um": s.defocus_offset_um} for area, s in em.low_dose.items()},
            "stage_limits_um": (em.limits.x.lower, em.limits.x.upper),
            "z_limits_um": (em.limits.z.lower, em.limits.z.upper),
            "tilt_limits_deg": (em.tilt_limits.lower, em.tilt_limits.upper),
        }
        return SerialEMConfig.build(**{**values, **overrides})

    @property
    def in_control(self) -> bool:
        with self._lock:
            return self._in_control

    # -- connections --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return                       # listener closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conn_lock:
                if self._closing:
                    conn.close()
                    return
                old, self._conn = self._conn, conn
                self.connections += 1
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._session, args=(conn,),
                                          name="serialem-twin-session", daemon=True)
                self._threads.append(thread)
            if old is not None:              # a new client replaces the old one
                with contextlib.suppress(OSError):
                    old.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._in_control = False
            log.info("serialem_twin.connected", peer=str(peer), replaced=old is not None)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        try:
            while self._serve_one(conn):
                pass
        except (ConnectionLost, DeviceTimeout) as err:   # ProtocolError included
            log.info("serialem_twin.dropped", reason=str(err))
        finally:
            with self._conn_lock:
                current = self._conn is conn
                if current:
                    self._conn = None
            if current:
                with self._lock:
                    self._in_control = False    # the client went away: control ends
            conn.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        """Read and answer one request; False drops the connection."""
        try:
            frame = read_frame(conn, max_bytes=MAX_REQUEST_FRAME)
        except FrameRejected as err:         # garbage length: the stream cannot be trusted
            log.warning("serialem_twin.bad_frame", reason=str(err))
            send_all(conn, encode_error(err.code))
            return False
        except ConnectionLost:
            return False                     # closed or half-closed between frames
        try:
            request = decode_request(frame)
        except FrameRejected as err:         # framed, but malformed: answer and go on
            log.warning("serialem_twin.bad_request", reason=str(err))
            send_all(conn, encode_error(err.code))
            return True
        return self._dispatch(conn, request)

    # -- requests -----------------------------------------------------------------------------

    def _dispatch(self, conn: socket.socket, request: Request) -> bool:
        if isinstance(request, HandshakeRequest):   # only valid between image chunks
            send_all(conn, encode_error(ServerCode.UNKNOWN_FUNCTION))
            return True
        with self._lock:
            if isinstance(request, OkToRunRequest):
                send_all(conn, self._ok_to_run())
                return True
            refusal = self._admit(request)
            if refusal is not None:
                send_all(conn, refusal)
                return True
            if isinstance(request, RegularRequest):
                return self._regular(conn, request)
            if isinstance(request, GetImageRequest):
                self._get_image(conn, request)
                return True
            return self._put_image(conn, request)

    def _ok_to_run(self) -> bytes:
        if self._stop_pending:
            self._stop_pending = False
            return encode_error(ServerCode.STOP_PENDING)
        ok = not (self._busy or self._in_control)
        self._in_control = self._in_control or ok
        return encode_reply(OkToRunReply(ok))

    def _admit(self, request: Request) -> bytes | None:
        """None if the request may run now (starting control if needed), else the refusal."""
        if self._stop_pending:
            self._stop_pending = False
            in_control, self._in_control = self._in_control, False
            if in_control and isinstance(request, RegularRequest):
                return encode_reply(RegularReply(ErrorFlag.USER_STOP))
            return encode_error(ServerCode.STOP_PENDING)
        if not self._in_control:
            if self._busy:
                return encode_error(ServerCode.BUSY)
            self._in_control = True
        return None

    def _regular(self, conn: socket.socket, request: RegularRequest) -> bool:
        self._regular_count += 1
        if self._regular_count == self.faults.drop_link_after_n or self._drop_on(request):
            log.warning("serialem_twin.fault_drop", request=self._regular_count)
            return False
        reply = self._execute(request)
        self._last_values = reply.values
        send_all(conn, encode_reply(reply))
        return True

    def _drop_on(self, request: RegularRequest) -> bool:
        """True once, for the first command named ``faults.drop_link_on``."""
        name = self.faults.drop_link_on
        if name is None or self._dropped_on:
            return False
        try:
            spec = self._table.by_index(request.command_index)
        except UnknownCommand:
            return False
        self._dropped_on = spec.name == name
        return self._dropped_on

    def _execute(self, request: RegularRequest) -> RegularReply:
        index = request.command_index
        try:
            spec, args = self._table.interpret(request)
        except UnknownCommand:
            # SerialEM's "maximum" is its command count; the index equal to it passes
            # SerialEM's check and reaches a null entry, which the twin refuses too.
            log.info("serialem_twin.script_error",
                     message=f"External script interpreter passed an out-of-bounds function "
                             f"code of {index} (maximum is {len(self._table)})")
            return RegularReply(ErrorFlag.SCRIPT_ERROR, self._last_values)
        if spec.name == EXIT_COMMAND:
            self._in_control = False
            no_exception = bool(args) and not isinstance(args[0], str) and args[0] != 0
            return RegularReply(ErrorFlag.EXIT_NO_EXCEPTION if no_exception
                                else ErrorFlag.NORMAL_EXIT)
        try:
            values = run(self.state, HANDLERS, spec, args)
        except ScriptError as err:
            log.info("serialem_twin.script_error", command=spec.name, message=str(err))
            return _script_error(str(err))
        return RegularReply(ErrorFlag.OK, values)

    def _get_image(self, conn: socket.socket, request: GetImageRequest) -> None:
        buf = None if request.fft else self.state.buffers[request.buffer_index]
        if buf is None:
            send_all(conn, encode_reply(_NO_IMAGE))
            return
        info, raw = image_to_bytes(buf.data)
        chunks = num_chunks(info.num_bytes, self._chunk_bytes)
        info = ImageInfo(info.mode, info.row_bytes, info.width, info.height, info.num_bytes,
                         chunks)
        send_all(conn, encode_reply(info))
        send_image_chunks(conn, raw, chunks)

    def _put_image(self, conn: socket.socket, request: PutImageRequest) -> bool:
        r = request
        row = _row_bytes(r.mode, r.width)
        if (row is None or r.height < 1 or r.num_bytes != row * r.height
                or r.num_bytes > MAX_PUT_BYTES or not 0 <= r.to_buffer < NUM_BUFFERS):
            send_all(conn, encode_error(ServerCode.WRONG_LENGTH))
            return True
        send_all(conn, encode_reply(PutImageAck()))
        raw = recv_image_stream(conn, r.num_bytes)
        info = ImageInfo(r.mode, row, r.width, r.height, r.num_bytes, 1)
        try:
            data = image_from_bytes(info, raw)
        except ProtocolError as err:
            log.warning("serialem_twin.bad_put", reason=str(err))
            return False
        image_buffer(self.state, r.to_buffer, data, r.base_buffer)
        return True


def _script_error(message: str) -> RegularReply:
    return RegularReply(ErrorFlag.SCRIPT_ERROR, (message,))


def _row_bytes(mode: int, width: int) -> int | None:
    size = {0: 1, 1: 2, 2: 4, 6: 2, 16: 3}.get(mode)
    return None if size is None or width < 1 else size * width


# --------------------------------------------------------------------------- standalone


def build_twin(*, seed: int = 0, camera: int = 512, host: str = "127.0.0.1",
               port: int = DEFAULT_PORT) -> SerialEMTwin:
    """A twin over a fresh simulated specimen and TEM on a virtual clock (not started)."""
    from simulators.electron import SimulatedElectronMicroscope
    from simulators.electron_config import ElectronSimConfig
    from simulators.specimen import Specimen
    from simulators.specimen_config import SpecimenConfig

    specimen = Specimen.generate(SpecimenConfig.build(seed=seed))
    config = ElectronSimConfig().replace(camera_shape=(camera, camera), seed=seed)
    em = SimulatedElectronMicroscope(specimen, VirtualClock(), config)
    return SerialEMTwin(em, host=host, port=port)


def main(argv: list[str] | None = None, *, stop: threading.Event | None = None,
         ready: threading.Event | None = None) -> int:
    """``clemd sim serialem``: serve until SIGINT/SIGTERM (or ``stop`` is set, for tests);
    ``ready`` is set once the twin listens. Returns 1 if the address cannot be bound."""
    parser = argparse.ArgumentParser(prog="clemd sim serialem",
                                     description="A simulated SerialEM on TCP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--camera", type=int, default=512,
                        help="camera size in pixels (square); the real one is 4096")
    args = parser.parse_args(argv)
    done = stop or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if stop is None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: done.set())
    try:
        twin = build_twin(seed=args.seed, camera=args.camera, host=args.host, port=args.port)
        with twin:
            log.info("serialem_twin.ready", host=twin.address[0], port=twin.address[1],
                     seed=args.seed, camera=args.camera)
            if ready is not None:
                ready.set()
            done.wait()
    except OSError as err:
        log.error("serialem_twin.cannot_listen", host=args.host, port=args.port, error=str(err))
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
