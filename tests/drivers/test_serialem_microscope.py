"""SerialEMElectronMicroscope beyond the shared contract: config, what it tells SerialEM, and
how SerialEM's failures reach the caller. Real TCP to the SerialEM twin over the simulator;
behaviour common to every backend is in test_electron_contract.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from drivers.base import LowDoseArea
from drivers.clock import VirtualClock
from drivers.errors import Aborted, ConfigError, ConnectionLost, InvalidState
from drivers.serialem.client import SerialEMScriptError
from drivers.serialem.config import SerialEMConfig
from drivers.serialem.microscope import SerialEMElectronMicroscope
from simulators.electron import SimulatedElectronMicroscope
from simulators.serialem_server import SerialEMTwin, TwinFaults
from simulators.specimen import Specimen

CAMERA = (96, 128)
Make = Callable[..., tuple[SerialEMTwin, SerialEMElectronMicroscope]]


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return Specimen.generate(seed=7)


@pytest.fixture
def make(specimen: Specimen) -> Iterator[Make]:
    """(twin, driver) pairs; ``config`` overrides driver settings, ``faults`` the twin's."""
    made: list[tuple[SerialEMTwin, SerialEMElectronMicroscope]] = []

    def factory(faults: TwinFaults | None = None, environ: dict[str, str] | None = None,
                **config: Any) -> tuple[SerialEMTwin, SerialEMElectronMicroscope]:
        sim = SimulatedElectronMicroscope.for_tests(specimen, VirtualClock(), camera=CAMERA)
        twin = SerialEMTwin(sim, faults=faults).start()
        em = SerialEMElectronMicroscope.from_config(twin.driver_config(**config),
                                                    clock=VirtualClock(), environ=environ or {})
        made.append((twin, em))
        return twin, em

    yield factory
    for twin, em in made:
        with contextlib.suppress(ConnectionLost, InvalidState):
            em.close()
        twin.close()


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
