"""SerialEMClient over real TCP on loopback against a scripted peer speaking wire.py.

The peer is a test double at the wire: it decodes each request with the shared codec and
answers from a script. The full client <-> simulated-SerialEM tests (simulators/
serialem_server.py) come with phase 2 of issue 4.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

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
from drivers.serialem import framing as fr
from drivers.serialem import wire as w
from drivers.serialem.client import (
    ModuleClient,
    SerialEMClient,
    SerialEMExited,
    SerialEMScriptError,
    SerialEMSettings,
    open_serialem,
    resolve_address,
)
from drivers.serialem.commands import (
    ArgumentError,
    CommandTable,
    NotExternalCommand,
    UnknownCommand,
)

TABLE = CommandTable.load()
EXIT_NO_EXC = w.RegularReply(w.ErrorFlag.EXIT_NO_EXCEPTION)

Handler = Callable[["Peer", socket.socket, w.Request], None]


class Peer:
    """Accepts connections one at a time; hands every decoded request to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frames: list[bytes] = []        # every request frame, in order
        self.connections = 0
        self.eofs = 0                        # connections the client closed
        self.errors: list[BaseException] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self._conn: socket.socket | None = None
        self.eof_seen = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        out = []
        for f in self.frames:
            req = w.decode_request(f)
            out.append(TABLE.by_index(req.command_index).name
                       if isinstance(req, w.RegularRequest) else type(req).__name__)
        return out

    def bump(self, key: str) -> int:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(5.0)    # a client that stops talking ends the session, not the run
            self._conn = conn
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        while True:
            try:
                frame = fr.read_frame(conn)
            except (ProtocolError, DeviceTimeout) as err:
                self.errors.append(err)
                return
            except ConnectionLost:
                self.eofs += 1
                self.eof_seen.set()
                return
            self.frames.append(frame)
            try:
                self.handler(self, conn, w.decode_request(frame))
            except _Hangup:
                return
            except Exception as err:  # noqa: BLE001 - a broken script fails the test, not hangs it
                self.errors.append(err)
                return

    def close(self) -> None:
        """Stop accepting and cut the open connection, so the serving thread ends now."""
        for sock in (self.listener, self._conn):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


class _Hangup(Exception):
    """Raised by a handler to drop the connection."""


def reply(conn: socket.socket, r: w.Reply) -> None:
    conn.sendall(w.encode_reply(r))


def scripted(answers: dict[str, w.Reply | Callable[[Peer, socket.socket], None]]) -> Handler:
    """OK-to-run answers TRUE, Exit answers exit-without-exception, the rest from ``answers``."""

    def handle(peer: Peer, conn: socket.socket, req: w.Request) -> None:
        if isinstance(req, w.OkToRunRequest):
            reply(conn, w.OkToRunReply(True))
            return
        assert isinstance(req, w.RegularRequest)
        name = TABLE.by_index(req.command_index).name
        answer = answers.get(name, EXIT_NO_EXC if name == "Exit" else w.RegularReply())
        if callable(answer):
            answer(peer, conn)
        else:
            reply(conn, answer)

    return handle


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[Peer, SerialEMClient]]]:
    made: list[tuple[Peer, SerialEMClient]] = []

    def factory(handler: Handler, **kw: Any) -> tuple[Peer, SerialEMClient]:
        peer = Peer(handler)
        kw.setdefault("resend_window_s", 5.0)
        client = SerialEMClient("127.0.0.1", peer.port, table=TABLE, **kw)
        made.append((peer, client))
        return peer, client

    yield factory
    for peer, client in made:
        try:
            client.close()
        except (ConnectionLost, InvalidState):
            pass    # tests that broke the link on purpose
        peer.close()


# --------------------------------------------------------------------------- normal calls


def test_normal_calls_send_the_captured_bytes(make: Any) -> None:
    peer, client = make(scripted({"ReportStageXYZ": w.RegularReply(0, (10.0, 20.0, -5.5)),
                                  "ReportMag": w.RegularReply(0, (4800.0,))}))
    assert client.call("MoveStageTo", 10, 20) is None
    assert client.call("ReportStageXYZ") == (10.0, 20.0, -5.5)
    assert client.call("ReportMag") == 4800.0
    assert peer.frames[:3] == [
        bytes.fromhex("0800000003000000"),
        bytes.fromhex("44000000010000001e010000020000000c000000" + "00" * 12
                      + "0000000000000000" "0000000000002440" "0000000000003440"
                      + "0031302e0032302e00000000"),
        bytes.fromhex("180000000100000025010000000000000100000000000000"),
    ]
    assert peer.connections == 1 and peer.errors == []


def test_string_reply(make: Any) -> None:
    _, client = make(scripted({"ReportNavFile": w.RegularReply(0, ("C:\\data\\nav.nav",)),
                               "ReportLowDose": w.RegularReply(0, (1.0, "View"))}))
    assert client.call("ReportNavFile") == "C:\\data\\nav.nav"
    assert client.call("ReportLowDose") == (1.0, "View")


def test_script_error_carries_serialem_message(make: Any) -> None:
    _, client = make(scripted({"SetMagIndex": w.RegularReply(1, ("Mag index 99 is out of range",))
                               }))
    with pytest.raises(SerialEMScriptError, match="Mag index 99 is out of range") as info:
        client.call("SetMagIndex", 99)
    assert isinstance(info.value, HardwareFault)


def test_user_stop_aborts_and_control_is_asked_for_again(make: Any) -> None:
    peer, client = make(scripted({"Record": w.RegularReply(w.ErrorFlag.USER_STOP)}))
    with pytest.raises(Aborted):
        client.call("Record")
    assert client.call("ReportMag") is None
    assert peer.names() == ["OkToRunRequest", "Record", "OkToRunRequest", "ReportMag"]


def test_normal_exit_raises_exited(make: Any) -> None:
    _, client = make(scripted({"Exit": w.RegularReply(w.ErrorFlag.NORMAL_EXIT)}))
    with pytest.raises(SerialEMExited):
        client.call("Exit")


@pytest.mark.parametrize(("code", "error"), [(-9, DeviceBusy), (-10, Aborted),
                                             (-6, ProtocolError), (-2, HardwareFault)])
def test_negative_codes_close_and_reconnect(make: Any, code: int, error: type) -> None:
    def first_refused(peer: Peer, conn: socket.socket) -> None:
        if peer.bump("Record") == 1:
            conn.sendall(w.encode_error(code))
        else:
            reply(conn, w.RegularReply())

    peer, client = make(scripted({"Record": first_refused}))
    with pytest.raises(error):
        client.call("Record")
    assert client.call("Record") is None
    assert peer.connections == 2 and peer.eofs >= 1


def test_ok_to_run_false_is_busy(make: Any) -> None:
    def refuse(peer: Peer, conn: socket.socket, req: w.Request) -> None:
        reply(conn, w.OkToRunReply(False))

    peer, client = make(refuse)
    with pytest.raises(DeviceBusy):
        client.call("ReportMag")
    assert peer.names() == ["OkToRunRequest"]


# --------------------------------------------------------------------------- broken links


def test_dropped_connection_is_reconnected_and_resent(make: Any) -> None:
    def drop_first(peer: Peer, conn: socket.socket) -> None:
        if peer.bump("Record") == 1:
            raise _Hangup
        reply(conn, w.RegularReply(0, (1.0,)))

    peer, client = make(scripted({"Record": drop_first}))
    assert client.call("Record") == 1.0
    assert peer.names() == ["OkToRunRequest", "Record", "Record"]
    assert peer.frames[1] == peer.frames[2]
    assert peer.connections == 2


def test_drop_after_the_resend_window_is_not_resent(make: Any) -> None:
    def drop(peer: Peer, conn: socket.socket) -> None:
        raise _Hangup

    peer, client = make(scripted({"Montage": drop}), resend_window_s=0.0)
    with pytest.raises(ConnectionLost):
        client.call("Montage")
    assert peer.names().count("Montage") == 1


def test_truncated_reply_is_protocol_error_and_reconnects(make: Any) -> None:
    def truncated(peer: Peer, conn: socket.socket) -> None:
        if peer.bump("ReportStageXYZ") == 1:
            conn.sendall(w.encode_reply(w.RegularReply(0, (1.0, 2.0, 3.0)))[:30])
            raise _Hangup
        reply(conn, w.RegularReply(0, (1.0, 2.0, 3.0)))

    peer, client = make(scripted({"ReportStageXYZ": truncated}))
    with pytest.raises(ProtocolError):
        client.call("ReportStageXYZ")
    assert peer.names().count("ReportStageXYZ") == 1      # not resent
    assert client.call("ReportStageXYZ") == (1.0, 2.0, 3.0)
    assert peer.connections == 2


def test_inconsistent_reply_closes_the_socket(make: Any) -> None:
    def inconsistent(peer: Peer, conn: socket.socket) -> None:
        frame = bytearray(w.encode_reply(w.RegularReply(0, (1.0,))))
        frame[16] = 9    # array word count no longer matches the frame
        conn.sendall(frame)

    peer, client = make(scripted({"ReportMag": inconsistent}))
    with pytest.raises(ProtocolError):
        client.call("ReportMag")
    assert client.call("ReportSpotSize") is None
    assert peer.connections == 2 and peer.eofs == 1    # the client closed the first one


def test_status_call_times_out_but_long_command_waits(make: Any) -> None:
    def silent(peer: Peer, conn: socket.socket) -> None:
        return None   # never answers

    def slow(peer: Peer, conn: socket.socket) -> None:
        threading.Event().wait(0.3)   # longer than the status timeout
        reply(conn, w.RegularReply(0, (2.0,)))

    peer, client = make(scripted({"ReportStageBusy": silent, "Record": slow}),
                        status_timeout_s=0.1)
    with pytest.raises(DeviceTimeout):
        client.call("ReportStageBusy")
    assert client.call("Record") == 2.0
    assert peer.connections == 2


def test_connect_failure_is_connection_lost() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    client = SerialEMClient("127.0.0.1", port, connect_timeout_s=1.0)
    with pytest.raises(ConnectionLost):
        client.call("ReportMag")
    client.close()


# --------------------------------------------------------------------------- refused early


@pytest.mark.parametrize(("name", "args", "error"), [
    ("MoveStageTo", ("a", 2), ArgumentError),
    ("MoveStageTo", (1,), ArgumentError),
    ("SetMagIndex", (1.5,), ArgumentError),
    ("MoveStageToo", (1, 2), UnknownCommand),
    ("Loop", (2,), NotExternalCommand),
])
def test_refused_before_anything_is_sent(make: Any, name: str, args: tuple[Any, ...],
                                         error: type) -> None:
    peer, client = make(scripted({}))
    with pytest.raises(error):
        client.call(name, *args)
    assert peer.frames == [] and peer.connections == 0
    assert client.call("ReportMag") is None
    assert peer.names() == ["OkToRunRequest", "ReportMag"]


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize(("dtype", "chunks", "pad"), [
    ("int16", 3, 6), ("uint8", 1, 0), ("float32", 2, 4), ("uint16", 5, 0), ("rgb", 2, 3)])
def test_get_image_in_chunks_with_handshakes(make: Any, dtype: str, chunks: int,
                                             pad: int) -> None:
    rng = np.random.default_rng(7)
    image = (rng.integers(0, 255, (33, 21, 3), dtype=np.uint8) if dtype == "rgb"
             else (rng.random((33, 21)) * 30000).astype(dtype))
    sent: list[int] = []

    def handle(peer: Peer, conn: socket.socket, req: w.Request) -> None:
        if isinstance(req, w.OkToRunRequest):
            reply(conn, w.OkToRunReply(True))
        elif isinstance(req, w.GetImageRequest):
            assert req == w.GetImageRequest(2, False)
            info, raw = fr.image_to_bytes(image, row_bytes=image.strides[0] + pad)
            reply(conn, replace(info, num_chunks=chunks))
            fr.send_image_chunks(conn, raw, chunks)     # raises unless [8][2] comes between
            sent.append(len(raw))
        else:
            reply(conn, EXIT_NO_EXC)

    peer, client = make(handle)
    got = client.get_image("C")
    assert got.dtype == image.dtype and np.array_equal(got, image)
    client.close()
    peer.close()
    assert peer.errors == [] and sent == [(image.strides[0] + pad) * 33]


def test_get_image_of_empty_buffer(make: Any) -> None:
    def handle(peer: Peer, conn: socket.socket, req: w.Request) -> None:
        if isinstance(req, w.OkToRunRequest):
            reply(conn, w.OkToRunReply(True))
        else:
            reply(conn, w.ImageInfo(0, 0, 0, 0, 0, 0))

    _, client = make(handle)
    with pytest.raises(InvalidState, match="no image in SerialEM buffer A"):
        client.get_image("A")
    with pytest.raises(w.WireLimitExceeded):
        client.get_image("U")


def test_put_image_streams_without_handshakes(make: Any) -> None:
    received: list[np.ndarray] = []

    def handle(peer: Peer, conn: socket.socket, req: w.Request) -> None:
        if isinstance(req, w.OkToRunRequest):
            reply(conn, w.OkToRunReply(True))
        elif isinstance(req, w.PutImageRequest):
            assert (req.to_buffer, req.base_buffer, req.num_chunks) == (3, 0, 1)
            reply(conn, w.PutImageAck())
            data = fr.recv_image_stream(conn, req.num_bytes)
            info = w.ImageInfo(req.mode, req.num_bytes // req.height, req.width, req.height,
                               req.num_bytes, 1)
            received.append(fr.image_from_bytes(info, data))
        else:
            reply(conn, w.RegularReply(0, (5.0,)))

    _, client = make(handle)
    image = np.arange(24 * 16, dtype=np.uint16).reshape(24, 16)
    client.put_image(image, "D", base_buffer="A")
    assert client.call("ReportMag") == 5.0     # the stream ended where the server expected
    assert len(received) == 1 and np.array_equal(received[0], image)


# --------------------------------------------------------------------------- lifetime


def test_close_sends_exit_1(make: Any) -> None:
    peer, client = make(scripted({}))
    client.call("ReportMag")
    client.close()
    peer.close()
    assert peer.frames[-1] == w.encode_request(TABLE.prepare("Exit", (1,)))
    assert w.decode_request(peer.frames[-1]) == w.RegularRequest(8, (w.WireArg("1.", 1.0),))
    assert peer.eofs == 1
    with pytest.raises(InvalidState):
        client.call("ReportMag")


def test_close_without_control_sends_nothing(make: Any) -> None:
    peer, client = make(scripted({}))
    client.connect()
    client.close()
    assert peer.eof_seen.wait(5)
    assert peer.frames == [] and peer.connections == 1


def test_calls_from_threads_do_not_cross(make: Any) -> None:
    def echo(peer: Peer, conn: socket.socket, req: w.Request) -> None:
        if isinstance(req, w.OkToRunRequest):
            reply(conn, w.OkToRunReply(True))
        else:
            assert isinstance(req, w.RegularRequest)
            value = req.args[0].number if req.args else 0.0
            conn.sendall(w.encode_reply(w.RegularReply(0, (value,)))[:9])
            conn.sendall(w.encode_reply(w.RegularReply(0, (value,)))[9:])

    _, client = make(echo)
    bad: list[tuple[float, object]] = []

    def worker(base: int) -> None:
        for i in range(40):
            x = float(base + i)
            got = client.call("ChangeFocus", x)
            if got != x:
                bad.append((x, got))

    threads = [threading.Thread(target=worker, args=(1000 * k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert bad == []


def test_address_from_environment(make: Any) -> None:
    assert resolve_address(None, None, {}) == ("127.0.0.1", 48888)
    assert resolve_address(None, None, {"PY_SERIALEM_IP": "10.0.0.5",
                                        "PY_SERIALEM_PORT": "48890"}) == ("10.0.0.5", 48890)
    assert resolve_address("h", 1, {"PY_SERIALEM_IP": "x", "PY_SERIALEM_PORT": "2"}) == ("h", 1)
    with pytest.raises(ConfigError):
        resolve_address(None, None, {"PY_SERIALEM_PORT": "many"})
    peer = Peer(scripted({"ReportMag": w.RegularReply(0, (3.0,))}))
    client = open_serialem(SerialEMSettings(), environ={"PY_SERIALEM_IP": "127.0.0.1",
                                                        "PY_SERIALEM_PORT": str(peer.port)})
    try:
        assert client.call("ReportMag") == 3.0
    finally:
        client.close()
        peer.close()


def test_module_backend_requested_but_missing() -> None:
    with pytest.raises(ConfigError, match="backend"):
        open_serialem(SerialEMSettings(backend="module"), environ={})


def test_module_backend_translates_errors() -> None:
    class SEMerror(Exception):
        pass

    class SEMexited(Exception):
        pass

    class SEMmoduleError(Exception):
        pass

    calls: list[tuple[str, tuple[Any, ...]]] = []

    def raising(exc: Exception) -> Callable[..., None]:
        def f(*args: Any) -> None:
            raise exc
        return f

    module = SimpleNamespace(
        SEMerror=SEMerror, SEMexited=SEMexited, SEMmoduleError=SEMmoduleError,
        ConnectToSEM=lambda *a: calls.append(("ConnectToSEM", a)),
        ReportStageXYZ=lambda: (1.0, 2.0, 3.0),
        SetMagIndex=raising(SEMerror("bad mag")), Record=raising(SEMexited("User STOP")),
        Exit=raising(SEMexited("Normal exit")), Montage=raising(SEMmoduleError("socket")))
    client = ModuleClient(module, "127.0.0.1", 48888, table=TABLE)
    assert calls == [("ConnectToSEM", (48888, "127.0.0.1"))]
    assert client.call("ReportStageXYZ") == (1.0, 2.0, 3.0)
    with pytest.raises(SerialEMScriptError, match="bad mag"):
        client.call("SetMagIndex", 3)
    with pytest.raises(Aborted):
        client.call("Record")
    with pytest.raises(SerialEMExited):
        client.close()
    with pytest.raises(ConnectionLost):
        client.call("Montage")
    with pytest.raises(ArgumentError):
        client.call("SetMagIndex", "3")
