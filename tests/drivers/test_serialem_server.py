"""The SerialEM twin (simulators/serialem_server.py) against the real client, over loopback TCP.

Everything goes through real sockets: the client (drivers/serialem/client.py) for what a
SerialEM user does, and a raw socket for what no well-behaved client sends (out-of-bounds
indices, garbage, half-closed connections). The twin is backed by the simulated TEM on a
virtual clock, so no test waits for simulated hardware.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from drivers.base import LowDoseArea
from drivers.clock import VirtualClock
from drivers.errors import Aborted, ConnectionLost, DeviceBusy, InvalidState
from drivers.serialem import framing as fr
from drivers.serialem import wire as w
from drivers.serialem.client import Result, SerialEMClient, SerialEMExited, SerialEMScriptError
from drivers.serialem.commands import CommandTable
from simulators.electron import SimulatedElectronMicroscope
from simulators.serialem_server import SerialEMTwin, TwinFaults, main
from simulators.specimen import Specimen, SquareState

TABLE = CommandTable.load()
CAMERA = (128, 96)


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return Specimen.generate(seed=3)


@pytest.fixture
def make_twin(specimen: Specimen) -> Iterator[Callable[..., SerialEMTwin]]:
    twins: list[SerialEMTwin] = []

    def factory(**kw: Any) -> SerialEMTwin:
        em = SimulatedElectronMicroscope.for_tests(specimen, VirtualClock(), camera=CAMERA)
        twin = SerialEMTwin(em, **kw).start()
        twins.append(twin)
        return twin

    yield factory
    for twin in twins:
        twin.close()


@pytest.fixture
def twin(make_twin: Callable[..., SerialEMTwin]) -> SerialEMTwin:
    return make_twin()


@pytest.fixture
def connect() -> Iterator[Callable[..., SerialEMClient]]:
    clients: list[SerialEMClient] = []

    def factory(twin: SerialEMTwin, **kw: Any) -> SerialEMClient:
        kw.setdefault("resend_window_s", 5.0)
        client = SerialEMClient(*twin.address, status_timeout_s=5.0, **kw)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        with contextlib.suppress(ConnectionLost, InvalidState):   # tests that cut the link
            client.close()


@pytest.fixture
def client(twin: SerialEMTwin, connect: Callable[..., SerialEMClient]) -> SerialEMClient:
    return connect(twin)


class Raw:
    """A bare socket to the twin, for bytes no client would send."""

    def __init__(self, twin: SerialEMTwin) -> None:
        self.sock = socket.create_connection(twin.address, timeout=5.0)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, function: w.Function) -> w.Reply:
        return w.decode_reply(function, fr.read_frame(self.sock))

    def regular(self, index: int, *args: w.WireArg) -> w.Reply:
        self.send(w.encode_request(w.RegularRequest(index, args)))
        return self.reply(w.Function.REGULAR)

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(twin: SerialEMTwin) -> Iterator[Callable[[], Raw]]:
    opened: list[Raw] = []

    def factory() -> Raw:
        r = Raw(twin)
        opened.append(r)
        return r

    yield factory
    for r in opened:
        r.close()


def several(result: Result) -> tuple[float | str, ...]:
    """A call's reported values when it reports more than one."""
    assert isinstance(result, tuple), result
    return result


def index_of(name: str) -> int:
    return TABLE.spec(name).index


# --------------------------------------------------------------------------- stage, optics


def test_stage_moves_read_back(client: SerialEMClient) -> None:
    client.call("MoveStageTo", 120.5, -40.25)
    assert client.call("ReportStageXYZ") == pytest.approx((120.5, -40.25, 0.0))
    client.call("MoveStage", -20.5, 10.0, 3.0)
    assert client.call("ReportStageXYZ") == pytest.approx((100.0, -30.25, 3.0))
    client.call("TiltTo", 30.0)
    client.call("TiltBy", -5.0)
    assert client.call("ReportTiltAngle") == pytest.approx(25.0)


def test_optics_read_back(twin: SerialEMTwin, client: SerialEMClient) -> None:
    client.call("SetMagIndex", 20)
    assert client.call("ReportMagIndex") == (20.0, 0.0)       # index, low-mag flag
    client.call("SetDefocus", -3.5)
    client.call("ChangeFocus", 1.0)
    assert client.call("ReportDefocus") == pytest.approx(-2.5)
    assert client.call("ImageShiftByMicrons", 1.5, -0.5) == 0.0       # 0: done
    assert client.call("ImageShiftByMicrons", 0.5, 0.0) == 0.0
    assert client.call("ReportSpecimenShift") == pytest.approx((2.0, -0.5))


def test_report_image_shift_is_is_units_pixels_and_stage(twin: SerialEMTwin,
                                                          client: SerialEMClient) -> None:
    # CMacCmd::ReportImageShift: IS x y, unbinned camera pixels (negated), stage if reset;
    # the third and fourth values are not specimen um
    client.call("SetMagIndex", 20)
    client.call("ImageShiftByMicrons", 2.0, -0.5)
    px = twin.em.magnification(20).pixel_size_um
    assert client.call("ReportImageShift") == pytest.approx(
        (2.0, -0.5, -2.0 / px, 0.5 / px, 2.0, -0.5))


def test_image_shift_past_serialem_limit_reports_1_and_does_nothing(
        twin: SerialEMTwin, client: SerialEMClient) -> None:
    twin.state.image_shift_limit_um = 5.0
    client.call("ImageShiftByMicrons", 4.0, 0.0)
    assert client.call("ImageShiftByMicrons", 2.0, 0.0) == 1.0        # 6 um: refused
    assert client.call("SetImageShift", 0.0, 7.0) == 1.0
    assert client.call("ReportSpecimenShift") == pytest.approx((4.0, 0.0))
    assert client.call("SetImageShift", 1.0, 1.0) == 0.0
    assert client.call("ReportSpecimenShift") == pytest.approx((1.0, 1.0))


def test_camera_properties_reports_six_values(twin: SerialEMTwin,
                                              client: SerialEMClient) -> None:
    client.call("SetMagIndex", 20)
    h, w = CAMERA
    px_nm = twin.em.magnification(20).pixel_size_um * 1e3
    values = several(client.call("CameraProperties"))
    assert len(values) == 6
    assert values[:2] == (w, h) and values[4] == pytest.approx(px_nm) and values[5] == 1.0


def test_status_commands(twin: SerialEMTwin, client: SerialEMClient) -> None:
    assert client.call("ReportVacuumGauge", "IGPco") == pytest.approx((0.0, 2e-6))
    assert client.call("ReportColumnOrGunValve") == 1.0
    assert client.call("ReportHighVoltage") == 300.0
    assert client.call("AreDewarsFilling") == 0.0
    client.call("SetColumnOrGunValve", 0)
    assert client.call("ReportColumnOrGunValve") == 0.0
    with pytest.raises(SerialEMScriptError, match="no vacuum gauge named Nope"):
        client.call("ReportVacuumGauge", "Nope")


# --------------------------------------------------------------------------- images


def test_acquisitions_land_in_a_and_roll(twin: SerialEMTwin, client: SerialEMClient) -> None:
    client.call("SetLowDoseMode", 1)
    client.call("Record")
    record = client.get_image("A")
    view_settings = twin.em.low_dose[LowDoseArea.VIEW]
    client.call("View")
    view = client.get_image("A")
    h, w = CAMERA
    assert record.shape == (h, w) and record.dtype == np.uint16
    b = view_settings.binning
    assert view.shape == (h // b, w // b) and view.dtype == np.uint16
    assert np.array_equal(client.get_image("B"), record)
    props = several(client.call("ImageProperties", "A"))
    assert props[:4] == (w // b, h // b, b, view_settings.exposure_s)
    assert props[5] == 0.0                                   # parameter set 0: View
    assert several(client.call("ImageProperties", "B"))[5] == 3.0      # 3: Record
    assert client.call("ReportLowDose") == (1.0, 0.0)      # in low dose, at View


def test_go_to_low_dose_area_takes_an_upper_case_letter_in_low_dose(
        client: SerialEMClient) -> None:
    with pytest.raises(SerialEMScriptError, match="must be in low dose mode"):
        client.call("GoToLowDoseArea", "R")
    assert client.call("SetLowDoseMode", 1) == 0.0          # reports the previous state
    for bad in ("r", "3", "P"):
        with pytest.raises(SerialEMScriptError, match="one of V, F, T, R, or S"):
            client.call("GoToLowDoseArea", bad)
    client.call("GoToLowDoseArea", "S")
    assert client.call("ReportLowDose") == (1.0, 4.0)      # 4: Search
    with pytest.raises(SerialEMScriptError, match="Inappropriate parameter set"):
        client.call("SetExposure", "X", 1.0)


def test_empty_buffer_is_refused(client: SerialEMClient) -> None:
    with pytest.raises(InvalidState, match="no image in SerialEM buffer D"):
        client.get_image("D")
    with pytest.raises(SerialEMScriptError, match="no image in buffer D"):
        client.call("ImageProperties", "D")


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "uint16"])
def test_put_then_get_in_chunks(make_twin: Callable[..., SerialEMTwin],
                                connect: Callable[..., SerialEMClient], dtype: str) -> None:
    twin = make_twin(chunk_bytes=1000)      # several chunks, each acknowledged by [8][2]
    client = connect(twin)
    image = (np.arange(77 * 53) % 251 - 100).astype(dtype).reshape(77, 53)
    if dtype.startswith("u"):
        image = np.abs(image)
    client.put_image(image, "C")
    back = client.get_image("C")
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, image)


# --------------------------------------------------------------------------- navigator


def test_navigator_edits(client: SerialEMClient) -> None:
    assert client.call("ReportNumTableItems") == 0.0
    assert client.call("AddStagePosAsNavPoint", 10.0, 20.0, -1.0) == 1.0
    assert client.call("AddStagePosAsNavPoint", -30.0, 5.0, 0.0) == 2.0
    client.call("ChangeItemLabel", 2, "target-7")
    client.call("ChangeItemNote", 2, "bead cluster, 3 um")
    client.call("SetItemAcquire", 2, 1)
    # index, X, Y, Z, type: five values, no registration
    assert client.call("ReportOtherItem", -1) == (2.0, -30.0, 5.0, 0.0, 0.0)
    assert client.call("GetVariable", "navLabel") == "target-7"
    assert client.call("GetVariable", "navNote") == "bead cluster, 3 um"
    assert client.call("GetVariable", "navIndex") == 2.0      # a numeric variable
    assert client.call("GetVariable", "navRegis") == 1.0
    assert client.call("ReportItemAcquire", 2) == 1.0
    assert client.call("ReportItemAcquire", 1) == 0.0
    assert client.call("NavIndexWithLabel", "TARGET-7") == 2.0     # case ignored
    assert client.call("GetRealignToItemError") == (-999.0, -999.0, 0.0, 0.0)  # none yet
    client.call("MoveToNavItem", 1)
    assert client.call("ReportStageXYZ") == pytest.approx((10.0, 20.0, -1.0))
    client.call("RealignToOtherItem", 2, 1)
    assert several(client.call("ReportStageXYZ"))[:2] == pytest.approx((-30.0, 5.0))
    assert client.call("GetRealignToItemError") == (0.0, 0.0, 0.0, 0.0)   # a point, no map
    with pytest.raises(SerialEMScriptError, match="Index is out of range in statement"):
        client.call("ReportOtherItem", 3)


def test_navigator_index_conventions(client: SerialEMClient) -> None:
    """Which commands count from the end, which take 0 as the current item, which neither."""
    client.call("AddStagePosAsNavPoint", 1.0, 2.0, 0.0)
    client.call("AddStagePosAsNavPoint", 3.0, 4.0, 0.0)
    with pytest.raises(SerialEMScriptError, match="Index is out of range"):
        client.call("ReportOtherItem", 0)                    # 0 is not "current" here
    with pytest.raises(SerialEMScriptError, match="no current Navigator item"):
        client.call("SetItemAcquire", 0)                     # 0 is the current item
    client.call("SetItemAcquire", -1)                        # -1: the last item
    assert client.call("ReportItemAcquire", 2) == 1.0
    with pytest.raises(SerialEMScriptError, match="index, -1, is out of range"):
        client.call("ChangeItemLabel", -1, "x")              # from 1 only
    with pytest.raises(SerialEMScriptError, match="index, 0, is out of range"):
        client.call("ChangeItemNote", 0, "x")
    with pytest.raises(SerialEMScriptError, match="must be positive"):
        client.call("MoveToNavItem", -1)
    with pytest.raises(SerialEMScriptError, match="failure 1 in Realign to Item"):
        client.call("RealignToOtherItem", -1, 1)
    with pytest.raises(SerialEMScriptError, match="failure -1 in Realign to Item"):
        client.call("RealignToNavItem", 1)                   # no current item yet
    client.call("MoveToNavItem", 2)
    client.call("SetItemAcquire", 0, 0)                      # now 0 is item 2
    assert client.call("ReportItemAcquire") == 0.0
    assert client.call("ReportNavItem") == (2.0, 3.0, 4.0, 0.0, 0.0)


def test_undefined_variable_message(client: SerialEMClient) -> None:
    with pytest.raises(SerialEMScriptError,
                       match=r"The variable nope is not defined in line:\n\nGetVariable\(nope\)"):
        client.call("GetVariable", "nope")


# --------------------------------------------------------------------------- errors


def test_limit_is_a_script_error_with_the_simulators_message(client: SerialEMClient) -> None:
    client.call("MoveStageTo", 1.0, 2.0)
    with pytest.raises(SerialEMScriptError, match=r"stage x 5000 um outside \[-1600, 1600\]"):
        client.call("MoveStageTo", 5000.0, 0.0)
    with pytest.raises(SerialEMScriptError, match="magnification index 999 not in the table"):
        client.call("SetMagIndex", 999)
    assert client.call("ReportStageXYZ") == pytest.approx((1.0, 2.0, 0.0))   # still usable


def test_unknown_and_script_only_indices(raw: Callable[[], Raw]) -> None:
    r = raw()
    r.send(w.encode_request(w.OkToRunRequest()))
    assert r.reply(w.Function.OK_TO_RUN) == w.OkToRunReply(True)
    assert r.regular(index_of("ReportHighVoltage")) == w.RegularReply(0, (300.0,))
    # SerialEM only logs the out-of-bounds message; the reply carries error flag 1 and
    # whatever the previous command reported (CMacCmd::TaskDone)
    for index in (len(TABLE) + 100, len(TABLE), -1):
        out = r.regular(index)
        assert out == w.RegularReply(w.ErrorFlag.SCRIPT_ERROR, (300.0,))
    # SerialEM does not refuse script-only commands; the twin has no handler for them
    out = r.regular(index_of("Label"))
    assert isinstance(out, w.RegularReply) and out.error_flag == w.ErrorFlag.SCRIPT_ERROR
    assert "Label is not implemented" in str(out.values[0])
    # nor does it count arguments (the serialem module does, before sending): the twin
    # refuses a short call with its own message
    out = r.regular(index_of("MoveStageTo"), w.WireArg("10.", 10.0))    # one of two args
    assert isinstance(out, w.RegularReply) and out.error_flag == w.ErrorFlag.SCRIPT_ERROR
    assert "needs at least 2 arguments" in str(out.values[0])
    out = r.regular(len(TABLE) + 1)                          # stale: the last error message
    assert out == w.RegularReply(w.ErrorFlag.SCRIPT_ERROR, out.values)
    assert "needs at least 2 arguments" in str(out.values[0])
    out = r.regular(index_of("ReportHighVoltage"))                     # still serving
    assert out == w.RegularReply(0, (300.0,))


def test_user_stop_during_control(twin: SerialEMTwin, client: SerialEMClient) -> None:
    client.call("MoveStageTo", 5.0, 5.0)
    twin.press_stop()
    with pytest.raises(Aborted, match="STOP"):
        client.call("MoveStageTo", 50.0, 50.0)
    assert not twin.in_control
    assert client.call("ReportStageXYZ") == pytest.approx((5.0, 5.0, 0.0))  # it did not run


def test_stop_pending_outside_control_answers_minus_10(twin: SerialEMTwin,
                                                       raw: Callable[[], Raw],
                                                       client: SerialEMClient) -> None:
    twin.press_stop()
    r = raw()
    assert r.regular(index_of("ReportHighVoltage")) == w.ErrorReply(-10)
    twin.press_stop()
    with pytest.raises(Aborted, match="-10"):
        client.call("ReportHighVoltage")
    assert client.call("ReportHighVoltage") == 300.0        # STOP was consumed


def test_busy(twin: SerialEMTwin, raw: Callable[[], Raw], client: SerialEMClient) -> None:
    twin.set_busy(True)
    with pytest.raises(DeviceBusy):
        client.call("ReportHighVoltage")                     # OK-to-run answers FALSE
    r = raw()
    assert r.regular(index_of("ReportHighVoltage")) == w.ErrorReply(-9)
    twin.set_busy(False)
    assert client.call("ReportHighVoltage") == 300.0


def test_ok_to_run_is_false_while_in_control(raw: Callable[[], Raw]) -> None:
    r = raw()
    r.send(w.encode_request(w.OkToRunRequest()))
    assert r.reply(w.Function.OK_TO_RUN) == w.OkToRunReply(True)
    r.send(w.encode_request(w.OkToRunRequest()))
    assert r.reply(w.Function.OK_TO_RUN) == w.OkToRunReply(False)


def test_exit_ends_control(twin: SerialEMTwin, client: SerialEMClient) -> None:
    assert client.call("Exit", 1) is None
    assert not twin.in_control
    assert client.call("ReportHighVoltage") == 300.0        # control asked for again
    with pytest.raises(SerialEMExited):
        client.call("Exit")
    assert not twin.in_control


# --------------------------------------------------------------------------- the link


def test_dropped_connection_mid_call_is_reconnected_and_resent(
        make_twin: Callable[..., SerialEMTwin], connect: Callable[..., SerialEMClient]) -> None:
    twin = make_twin(faults=TwinFaults(drop_link_after_n=2))
    client = connect(twin)
    client.call("MoveStageTo", 1.0, 1.0)
    client.call("MoveStageTo", 7.0, 8.0)          # dropped unanswered, resent on a new link
    assert client.call("ReportStageXYZ") == pytest.approx((7.0, 8.0, 0.0))
    assert twin.connections == 2


def test_drop_outside_the_resend_window_raises_then_reconnects(
        make_twin: Callable[..., SerialEMTwin], connect: Callable[..., SerialEMClient]) -> None:
    twin = make_twin(faults=TwinFaults(drop_link_after_n=1))
    client = connect(twin, resend_window_s=0.0)
    with pytest.raises(ConnectionLost):
        client.call("MoveStageTo", 3.0, 4.0)
    assert not twin.in_control
    client.call("MoveStageTo", 3.0, 4.0)
    assert client.call("ReportStageXYZ") == pytest.approx((3.0, 4.0, 0.0))
    assert twin.connections == 2


@pytest.mark.parametrize(("garbage", "code"), [
    (struct.pack("<i", 3), -4),                     # shorter than a header
    (struct.pack("<i", 2**30) + b"\0" * 8, -5),     # absurdly long
    (b"\xff" * 64, -4),                             # noise: length -1
])
def test_garbage_drops_that_connection_only(twin: SerialEMTwin, raw: Callable[[], Raw],
                                            client: SerialEMClient, garbage: bytes,
                                            code: int) -> None:
    r = raw()
    r.send(garbage)
    assert fr.read_frame(r.sock) == w.encode_error(code)
    assert r.at_eof()
    assert client.call("ReportHighVoltage") == 300.0


def test_framed_but_malformed_request_is_answered_and_served_on(raw: Callable[[], Raw]) -> None:
    r = raw()
    r.send(struct.pack("<3i", 12, 4, 0))            # get-image needs 16 bytes
    assert fr.read_frame(r.sock) == w.encode_error(-4)
    r.send(struct.pack("<2i", 8, 77))               # no such function
    assert fr.read_frame(r.sock) == w.encode_error(-1)
    assert r.regular(index_of("ReportHighVoltage")) == w.RegularReply(0, (300.0,))


@pytest.mark.parametrize("sent", ["nothing", "half a frame"])
def test_half_closed_connection_is_dropped(twin: SerialEMTwin, raw: Callable[[], Raw],
                                           client: SerialEMClient, sent: str) -> None:
    r = raw()
    if sent == "half a frame":
        r.send(w.encode_request(w.OkToRunRequest())[:5])
    r.sock.shutdown(socket.SHUT_WR)
    assert r.at_eof()                               # the twin closed its side
    assert client.call("ReportHighVoltage") == 300.0


def test_new_connection_replaces_the_old(twin: SerialEMTwin, raw: Callable[[], Raw],
                                         client: SerialEMClient) -> None:
    client.call("MoveStageTo", 2.0, 2.0)
    assert twin.in_control
    r = raw()
    r.send(w.encode_request(w.OkToRunRequest()))
    assert r.reply(w.Function.OK_TO_RUN) == w.OkToRunReply(True)   # the old one lost control
    assert client.call("ReportStageXYZ") == pytest.approx((2.0, 2.0, 0.0))  # reconnects
    assert r.at_eof()                               # ...and replaces the raw one in turn
    assert twin.connections == 3


def test_main_serves_standalone_until_stopped() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop, ready = threading.Event(), threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        main(["--port", str(port), "--camera", "64", "--seed", "2"], stop=stop, ready=ready)))
    thread.start()
    try:
        assert ready.wait(30), "the twin did not start listening"
        client = SerialEMClient("127.0.0.1", port, connect_timeout_s=5.0)
        client.call("Record")
        assert client.get_image("A").shape == (64, 64)
        client.close()
    finally:
        stop.set()
        thread.join(20)
    assert result == [0]


# --------------------------------------------------------------------------- autofocus

#: Focus at 1,250x: a 1.1 um field on the small camera, so that film shows hole edges.
_FOCUS_LOW_DOSE = {
    "record": {"mag_index": 24, "exposure_s": 1.0, "binning": 1},
    "focus": {"mag_index": 11, "exposure_s": 0.5, "binning": 1},
}


@pytest.fixture
def focus_twin(specimen: Specimen) -> Iterator[SerialEMTwin]:
    em = SimulatedElectronMicroscope.for_tests(specimen, VirtualClock(), camera=(128, 128),
                                               low_dose=_FOCUS_LOW_DOSE)
    twin = SerialEMTwin(em).start()
    yield twin
    twin.close()


def _pair(result: Result) -> tuple[float, float]:
    assert isinstance(result, tuple) and len(result) == 2
    return float(result[0]), float(result[1])


def _film(specimen: Specimen, twin: SerialEMTwin, client: SerialEMClient) -> float:
    """Move across a square's film until AutoFocus -1 succeeds; its measured defocus."""
    sq = next(s for s in specimen.squares if s.state == SquareState.OK and not s.partial
              and not s.cell_ids and abs(s.i) + abs(s.j) > 0)
    x0, y0 = specimen.truth.grid_to_em_stage(np.asarray(sq.centre_um, float))
    client.call("SetLowDoseMode", 1)
    for k in range(12):
        client.call("MoveStageTo", float(x0) + 0.7 * k, float(y0) + 0.3 * k)
        client.call("AutoFocus", -1)
        measured, code = _pair(client.call("ReportAutoFocus"))
        if code == 0:
            return measured
    raise AssertionError("no film with contrast found")


def test_autofocus_measures_without_changing_focus(specimen: Specimen,
                                                  focus_twin: SerialEMTwin,
                                                  connect: Callable[..., SerialEMClient]
                                                  ) -> None:
    client = connect(focus_twin)
    client.call("SetDefocus", -3.0)
    measured = _film(specimen, focus_twin, client)
    sim = focus_twin.em
    assert isinstance(sim, SimulatedElectronMicroscope)
    x, y, z = sim.true_stage_position()
    height = float(specimen.truth.em_height.height(np.array([x, y]))) - z
    # measured = lens defocus less the film's height above the tilt axis, within the noise
    assert measured == pytest.approx(-3.0 - height, abs=0.35)
    assert client.call("ReportDefocus") == pytest.approx(-3.0)
    assert focus_twin.state.area == LowDoseArea.FOCUS


def test_autofocus_changes_focus_to_the_target(specimen: Specimen, focus_twin: SerialEMTwin,
                                               connect: Callable[..., SerialEMClient]) -> None:
    client = connect(focus_twin)
    client.call("SetDefocus", -1.0)
    measured = _film(specimen, focus_twin, client)
    client.call("SetTargetDefocus", -2.5)
    assert client.call("ReportTargetDefocus") == pytest.approx(-2.5)
    client.call("AutoFocus")
    defocus = client.call("ReportDefocus")
    assert isinstance(defocus, float)
    changed = defocus - (-1.0)
    assert changed == pytest.approx(-2.5 - measured, abs=0.35)
    client.call("AutoFocus", -1)
    after, code = _pair(client.call("ReportAutoFocus"))
    assert code == 0 and after == pytest.approx(-2.5, abs=0.35)


def test_failed_autofocus_is_reported_not_raised(specimen: Specimen, focus_twin: SerialEMTwin,
                                                 connect: Callable[..., SerialEMClient]) -> None:
    client = connect(focus_twin)
    assert client.call("ReportAutoFocus") == (0.0, -1.0)     # nothing measured yet
    pitch = specimen.config.pitch_um
    x, y = specimen.truth.grid_to_em_stage(np.array([pitch / 2, 0.0]))     # a grid bar
    client.call("SetLowDoseMode", 1)
    client.call("MoveStageTo", float(x), float(y))
    client.call("SetDefocus", -4.0)
    client.call("AutoFocus")                                  # no script error
    assert _pair(client.call("ReportAutoFocus"))[1] == -1.0
    assert client.call("ReportDefocus") == pytest.approx(-4.0)
    with pytest.raises(SerialEMScriptError, match="not simulated"):
        client.call("AutoFocus", -2)
