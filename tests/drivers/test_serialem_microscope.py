"""SerialEMElectronMicroscope beyond the shared contract: config, what it tells SerialEM, and
how SerialEM's failures reach the caller. Real TCP to the SerialEM twin over the simulator;
behaviour common to every backend is in test_electron_contract.py."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from drivers.base import AutofocusFailed, LowDoseArea
from drivers.clock import VirtualClock
from drivers.errors import (
    Aborted,
    ConfigError,
    HardwareFault,
    InvalidState,
    LimitViolation,
)
from drivers.serialem.client import SerialEMScriptError
from drivers.serialem.config import SerialEMConfig
from drivers.serialem.microscope import SerialEMElectronMicroscope
from simulators.electron import SimulatedElectronMicroscope
from simulators.serialem_server import SerialEMTwin, TwinFaults

CAMERA = (96, 128)
Make = Callable[..., tuple[SerialEMTwin, SerialEMElectronMicroscope]]


@pytest.fixture
def make(make_serialem: Make) -> Make:
    """(twin, driver) pairs opened as the daemon opens them (conftest.make_serialem):
    ``config`` overrides driver settings, ``faults`` the twin's, ``environ`` the address."""
    return functools.partial(make_serialem, CAMERA)


def _sim(twin: SerialEMTwin) -> SimulatedElectronMicroscope:
    assert isinstance(twin.em, SimulatedElectronMicroscope)
    return twin.em


# --------------------------------------------------------------------------- config


def _valid(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "magnifications": [{"index": 10, "magnification": 4700, "pixel_size_um": 0.0023},
                           {"index": 20, "magnification": 39000, "pixel_size_um": 0.00028}],
        "low_dose": {"record": {"mag_index": 20, "exposure_s": 1.0}},
    }
    return {**values, **changes}


@pytest.mark.parametrize(("changes", "field"), [
    ({"magnifications": []}, "em.settings.magnifications"),
    ({"magnifications": [{"index": 1, "magnification": 10, "pixel_size_um": -1.0}]},
     "em.settings.magnifications.0.pixel_size_um"),
    ({"low_dose": {"record": {"mag_index": 99, "exposure_s": 1.0}}},
     "em.settings.low_dose.record.mag_index"),
    ({"low_dose": {"preview": {"mag_index": 20, "exposure_s": 1.0}}},
     "em.settings.low_dose.preview"),
    ({"low_dose": {"record": {"mag_index": 20, "exposure_s": 0.0}}},
     "em.settings.low_dose.record.exposure_s"),
    ({"tilt_limits_deg": (60.0, -60.0)}, "em.settings.tilt_limits_deg"),
    ({"port": 70000}, "em.settings.port"),
    ({"hostname": "x"}, "em.settings.hostname"),
], ids=["no-mags", "negative-pixel", "area-mag-unknown", "not-an-area", "zero-exposure",
        "tilt-reversed", "port", "misspelt-key"])
def test_config_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        SerialEMConfig.build(**_valid(**changes))
    assert info.value.field == field


def test_address_comes_from_the_environment_when_not_configured(make: Make) -> None:
    twin, _ = make()
    host, port = twin.address
    config = twin.driver_config().model_copy(update={"host": None, "port": None})
    em = SerialEMElectronMicroscope.from_config(
        config, clock=VirtualClock(),
        environ={"PY_SERIALEM_IP": host, "PY_SERIALEM_PORT": str(port)})
    try:
        assert em.status().high_voltage_kv == 300.0
    finally:
        em.close()


def test_camera_shape_is_asked_of_serialem_unless_configured(make: Make) -> None:
    _, asked = make()
    assert asked.camera_shape() == CAMERA
    assert asked.camera_shape(4) == (CAMERA[0] // 4, CAMERA[1] // 4)
    _, configured = make(camera_shape=(64, 64))
    assert configured.camera_shape() == (64, 64)


# --------------------------------------------------------------------------- what it sends


def test_presets_are_pushed_before_each_shot(make: Make) -> None:
    twin, em = make()
    sim = _sim(twin)
    preset = em.low_dose[LowDoseArea.RECORD]
    # someone changed SerialEM's Record set by hand
    sim.low_dose[LowDoseArea.RECORD] = replace(preset, exposure_s=9.0, binning=4)
    image = em.acquire(LowDoseArea.RECORD)
    assert image.exposure_s == pytest.approx(preset.exposure_s)
    assert image.binning == preset.binning and image.shape == CAMERA
    assert sim.low_dose[LowDoseArea.RECORD].exposure_s == pytest.approx(preset.exposure_s)
    assert twin.state.low_dose_on and twin.state.area == LowDoseArea.RECORD


def test_metadata_describes_what_serialem_did(make: Make) -> None:
    _, em = make()
    em.move_stage(12.0, -7.0)
    em.set_defocus(-3.0)
    image = em.acquire(LowDoseArea.VIEW)
    preset = em.low_dose[LowDoseArea.VIEW]
    assert image.defocus_um == pytest.approx(-3.0 + preset.defocus_offset_um)
    assert image.extra["serialem_pixel_nm"] == pytest.approx(image.pixel_size_um * 1e3)
    assert image.stage_um == pytest.approx((12.0, -7.0, 0.0))
    assert em.mag_index() == preset.mag_index


# --------------------------------------------------------------------------- failures


def test_serialem_refusal_is_a_script_error_with_its_message(make: Make) -> None:
    # the driver's travel is wider than the instrument's: SerialEM has the last word
    _, em = make(stage_limits_um=(-5000.0, 5000.0))
    em.move_stage(3.0, 4.0)
    with pytest.raises(SerialEMScriptError, match=r"stage x 3000 um outside \[-1600, 1600\]"):
        em.move_stage(3000.0, 0.0)
    assert em.stage_position()[:2] == pytest.approx((3.0, 4.0))


def test_unknown_gauge_is_a_script_error(make: Make) -> None:
    _, em = make(vacuum_gauge="Bogus")
    with pytest.raises(SerialEMScriptError, match="no vacuum gauge named Bogus"):
        em.status()


def test_user_stop_aborts_the_call_and_the_next_one_runs(make: Make) -> None:
    twin, em = make()
    em.move_stage(1.0, 1.0)
    twin.press_stop()
    with pytest.raises(Aborted):
        em.move_stage(2.0, 2.0)
    assert em.stage_position()[:2] == pytest.approx((1.0, 1.0))


def test_dropped_link_mid_acquire_is_resent(make: Make) -> None:
    twin, em = make(faults=TwinFaults(drop_link_after_n=3))
    image = em.acquire(LowDoseArea.RECORD)     # one of its commands is dropped and resent
    assert image.shape == CAMERA
    assert twin.connections == 2


def test_close_ends_external_control(make: Make) -> None:
    twin, em = make()
    em.status()
    assert twin.in_control
    em.close()
    assert not twin.in_control
    with pytest.raises(InvalidState, match="closed"):
        em.status()


# --------------------------------------------------------------------------- reply formats
# What SerialEM's source says each command reports (docs/serialem-commands-verified.md),
# played by a scripted link where the twin cannot tell a right reading from a wrong one.


class ScriptedLink:
    """A SerialEMLink that answers from a table (a value, or a function of the arguments)
    and records every call; anything not in the table answers None, as a command that
    reports nothing does."""

    def __init__(self, replies: dict[str, Any], image: Any = None) -> None:
        self.replies = replies
        self.calls: list[tuple[Any, ...]] = []
        self.image = image

    def call(self, name: str, *args: object) -> Any:
        self.calls.append((name, *args))
        reply = self.replies.get(name)
        return reply(*args) if callable(reply) else reply

    def get_image(self, buffer: str = "A", *, fft: bool = False) -> Any:
        return self.image

    def put_image(self, *args: object, **kw: object) -> None:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def _scripted(replies: dict[str, Any], image: Any = None,
              **config: Any) -> tuple[ScriptedLink, SerialEMElectronMicroscope]:
    link = ScriptedLink(replies, image)
    return link, SerialEMElectronMicroscope(SerialEMConfig.build(**_valid(**config)), link,
                                            clock=VirtualClock())


def test_image_shift_is_read_in_specimen_um_not_from_report_image_shift() -> None:
    # ReportImageShift: IS units, unbinned camera pixels, stage; never specimen um
    link, em = _scripted({"ReportSpecimenShift": (1.0, 2.0),
                          "ReportImageShift": (0.1, 0.2, 400.0, 800.0, 1.0, 2.0),
                          "ImageShiftByMicrons": 0.0})
    assert em.image_shift() == (1.0, 2.0)
    em.set_image_shift(3.0, 2.0)
    assert ("ImageShiftByMicrons", 2.0, 0.0) in link.calls
    assert not any(c[0] in ("ReportImageShift", "SetImageShift") for c in link.calls)


def test_no_specimen_calibration_is_a_hardware_fault() -> None:
    # SerialEM only logs when it cannot convert: ReportSpecimenShift reports nothing
    _, em = _scripted({"ReportSpecimenShift": None, "ReportMagIndex": (10.0, 0.0)})
    with pytest.raises(HardwareFault, match="no image-shift-to-specimen calibration"):
        em.image_shift()


def test_image_shift_serialem_refuses_is_a_limit_violation(make: Make) -> None:
    twin, em = make()
    twin.state.image_shift_limit_um = 5.0          # SerialEM's own limit, tighter
    em.set_image_shift(4.0, 0.0)
    with pytest.raises(LimitViolation, match="SerialEM refused"):
        em.set_image_shift(6.0, 0.0)               # ImageShiftByMicrons reported 1
    assert em.image_shift() == pytest.approx((4.0, 0.0))


def test_realignment_returns_the_stage_error_pair() -> None:
    # GetRealignToItemError: stage error X, Y, then local error X, Y
    replies = {"ReportNumTableItems": 1.0, "ReportOtherItem": (1.0, 5.0, 6.0, 0.0, 0.0),
               "GetVariable": "1", "ReportItemAcquire": 0.0,
               "GetRealignToItemError": (0.5, -0.25, 0.1, 0.05)}
    link, em = _scripted(replies)
    assert em.realign_to_item(1) == pytest.approx((0.5, -0.25))
    assert ("RealignToOtherItem", 1, 1) in link.calls
    replies["GetRealignToItemError"] = (-999.0, -999.0, 0.0, 0.0)   # nothing realigned
    with pytest.raises(HardwareFault, match="no realignment error"):
        em.realign_to_item(1)


def test_navigator_item_reads_five_values_and_the_nav_variables() -> None:
    variables = {"navLabel": "12", "navNote": "hole"}
    _, em = _scripted({"ReportNumTableItems": 1.0,
                       "ReportOtherItem": (1.0, 5.0, 6.0, -2.0, 2.0),
                       "GetVariable": variables.__getitem__, "ReportItemAcquire": 1.0})
    (item,) = em.nav_items()
    assert (item.item_id, item.label, item.note) == (1, "12", "hole")
    assert item.stage_um == (5.0, 6.0, -2.0) and item.kind == "map" and item.acquire


def test_super_resolution_binning_is_refused_not_truncated() -> None:
    replies = {"ReportMagIndex": (20.0, 0.0), "ReportStageXYZ": (0.0, 0.0, 0.0),
               "ReportSpecimenShift": (0.0, 0.0), "ReportTiltAngle": 0.0,
               "ReportDefocus": 0.0,
               # ImageProperties: width, height, binning, exposure, pixel nm, parameter set
               "ImageProperties": (256.0, 256.0, 0.5, 1.0, 0.14, 3.0)}
    _, em = _scripted(replies, image=np.zeros((256, 256), np.uint16))
    with pytest.raises(HardwareFault, match="binning 0.5"):
        em.acquire(LowDoseArea.RECORD)
    replies["ImageProperties"] = (128.0, 128.0, 2.0, 1.0, 0.56, 3.0)
    image = em.acquire(LowDoseArea.RECORD)
    assert image.binning == 2 and image.extra["serialem_pixel_nm"] == pytest.approx(0.56)


@pytest.mark.parametrize(("config", "ok"), [
    ({}, True),                                     # the twin's good gauge: status 0
    ({"vacuum_ok_statuses": (4,)}, False),          # a site whose plugin says 4 = valid
    ({"vacuum_max_pressure": 1e-6}, False),         # the twin reports 2e-6
    ({"vacuum_max_pressure": 1e-5}, True),
])
def test_vacuum_judgement_is_a_site_setting(make: Make, config: dict[str, Any],
                                            ok: bool) -> None:
    _, em = make(**config)
    assert em.status().vacuum_ok is ok


def test_low_dose_switched_off_by_hand_is_switched_back_on(make: Make) -> None:
    twin, em = make()
    em.acquire(LowDoseArea.VIEW)
    twin.state.low_dose_on = False                 # the operator unticked Low Dose
    twin.state.area = None
    image = em.acquire(LowDoseArea.RECORD)         # GoToLowDoseArea needs low dose on
    assert image.low_dose_area == "R" and twin.state.low_dose_on


def test_image_rows_are_the_buffer_rows_unflipped() -> None:
    # a fetched buffer is in memory order; SerialEM reverses rows only when writing MRC
    # (KStoreMRC::WriteSection -> convertForWriting(..., needFlipped=true)), so the driver
    # keeps the rows as sent and documents row 0 as the displayed top row
    frame = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    replies = {"ReportMagIndex": (20.0, 0.0), "ReportStageXYZ": (0.0, 0.0, 0.0),
               "ReportSpecimenShift": (0.0, 0.0), "ReportTiltAngle": 0.0,
               "ReportDefocus": 0.0, "ImageProperties": (48.0, 64.0, 1.0, 1.0, 0.28, 3.0)}
    _, em = _scripted(replies, image=frame)
    image = em.acquire(LowDoseArea.RECORD)
    assert np.array_equal(image.data, frame)


# --------------------------------------------------------------------------- autofocus, settings

_SHOT_REPLIES: dict[str, Any] = {
    "ReportMagIndex": (20.0, 0.0), "ReportStageXYZ": (0.0, 0.0, 0.0),
    "ReportSpecimenShift": (0.0, 0.0), "ReportTiltAngle": 0.0, "ReportDefocus": -3.0,
    "CameraProperties": (128.0, 96.0, 0.0, 5.0, 0.28, 1.0),
    "ImageProperties": (128.0, 96.0, 1.0, 1.0, 0.28, 3.0)}
_AREAS = {"low_dose": {"record": {"mag_index": 20, "exposure_s": 1.0},
                       "focus": {"mag_index": 20, "exposure_s": 0.5, "binning": 2},
                       "trial": {"mag_index": 20, "exposure_s": 0.5, "binning": 2}}}


def test_autofocus_measures_with_autofocus_minus_1_and_sets_the_defocus() -> None:
    link, em = _scripted({**_SHOT_REPLIES, "ReportAutoFocus": (-3.4, 0.0)}, **_AREAS)
    assert em.autofocus() == pytest.approx(-0.4)            # measured -3.4, lens -3.0
    assert ("AutoFocus", -1, 0) in link.calls               # measure only, Focus area
    assert ("GoToLowDoseArea", "F") in link.calls
    assert link.calls[-1] == ("SetDefocus", pytest.approx(-2.6))
    assert not any(c[0] == "SetTargetDefocus" for c in link.calls)


@pytest.mark.parametrize("code", [-1.0, 1.0, 4.0], ids=["failed", "aborted-1", "aborted-4"])
def test_autofocus_failure_reported_by_serialem_is_typed(code: float) -> None:
    link, em = _scripted({**_SHOT_REPLIES, "ReportAutoFocus": (-3.4, code)}, **_AREAS)
    with pytest.raises(AutofocusFailed, match=f"ReportAutoFocus error {code:g}"):
        em.autofocus()
    assert not any(c[0] in ("SetDefocus", "ChangeFocus") for c in link.calls)


def test_autofocus_in_trial_is_refused_before_sending() -> None:
    link, em = _scripted(dict(_SHOT_REPLIES), **_AREAS)
    with pytest.raises(LimitViolation, match="TRIAL"):
        em.autofocus(LowDoseArea.TRIAL)
    assert link.calls == []


def test_per_shot_settings_are_pushed_and_an_extra_defocus_offset_is_undone() -> None:
    link, em = _scripted(dict(_SHOT_REPLIES), image=np.zeros((96, 128), np.uint16))
    preset = em.low_dose[LowDoseArea.RECORD]
    once = replace(preset, mag_index=10, exposure_s=0.25, binning=2,
                   defocus_offset_um=preset.defocus_offset_um - 30.0)
    em.acquire(LowDoseArea.RECORD, once)
    names = [c[0] for c in link.calls]
    assert ("SetMagIndex", 10) in link.calls
    assert ("SetExposure", "R", 0.25) in link.calls and ("SetBinning", "R", 2) in link.calls
    shot = names.index("Record")
    assert link.calls[shot - 1] == ("ChangeFocus", -30.0)
    assert link.calls[shot + 1] == ("ChangeFocus", 30.0)
    assert em.low_dose[LowDoseArea.RECORD] == preset
