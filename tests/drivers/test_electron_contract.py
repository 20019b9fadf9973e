"""The ElectronMicroscope contract, written once and run on every backend.

Backends: "simulated" is simulators/electron.py called directly; "serialem" is the real
driver (drivers/serialem/microscope.py) over TCP to the SerialEM twin
(simulators/serialem_server.py), which is backed by the same simulator. Tests use only the
contract (drivers/base.py) and take limits, areas and sizes from the instance, so a new
backend joins by adding a parameter to the ``em`` fixture.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from drivers.base import AcquisitionSettings, AutofocusFailed, ElectronMicroscope, LowDoseArea
from drivers.clock import VirtualClock
from drivers.errors import Aborted, ConfigError, LimitViolation
from drivers.serialem.microscope import SerialEMElectronMicroscope
from simulators.electron import SimulatedElectronMicroscope
from simulators.electron_config import ElectronSimConfig
from simulators.serialem_server import SerialEMTwin
from simulators.specimen import Specimen, SquareState

CAMERA = (128, 128)
#: Focus at 1,250x on the small camera: a 1.1 um field, which holds a hole edge on most film.
FOCUS_LOW_DOSE = {
    "record": {"mag_index": 24, "exposure_s": 1.0, "binning": 1, "dose_rate_e_per_a2_s": 2.0},
    "focus": {"mag_index": 11, "exposure_s": 0.5, "binning": 1, "dose_rate_e_per_a2_s": 1.0},
}


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return Specimen.generate(seed=5)


def _simulator(specimen: Specimen, **fields: Any) -> SimulatedElectronMicroscope:
    """Small frames; ``fields`` replace ElectronSimConfig fields whole (not merged)."""
    config = ElectronSimConfig.build(camera_shape=CAMERA, **fields)
    return SimulatedElectronMicroscope(specimen, VirtualClock(), config)


@pytest.fixture(params=["simulated", "serialem"])
def make_em(request: pytest.FixtureRequest,
            specimen: Specimen) -> Iterator[Any]:
    """Factory: an ElectronMicroscope of the parameter's kind on a simulator made with
    ``overrides`` (ElectronSimConfig fields)."""
    closing: list[Any] = []

    def factory(**overrides: Any) -> ElectronMicroscope:
        sim = _simulator(specimen, **overrides)
        if request.param == "simulated":
            closing.append(sim)
            return sim
        twin = SerialEMTwin(sim).start()
        closing.append(twin)
        # with a montage folder, montage() is SerialEM's own Montage (native_montage)
        em = SerialEMElectronMicroscope.from_config(
            twin.driver_config(montage_dir="D:\\clemd\\montages"), clock=VirtualClock(),
            environ={})
        closing.append(em)
        return em

    yield factory
    for thing in reversed(closing):
        thing.close()


@pytest.fixture
def em(make_em: Any) -> ElectronMicroscope:
    built: ElectronMicroscope = make_em()
    return built


# --------------------------------------------------------------------------- stage


def test_moves_read_back(em: ElectronMicroscope) -> None:
    em.move_stage(120.0, -45.5)
    assert em.stage_position()[:2] == pytest.approx((120.0, -45.5), abs=1e-3)
    em.move_stage(-10.0, 20.0, 4.0)
    assert em.stage_position() == pytest.approx((-10.0, 20.0, 4.0), abs=1e-3)


@pytest.mark.parametrize("where", ["x-above", "y-below", "z-above", "x-nan"])
def test_stage_limits_refused_before_moving(em: ElectronMicroscope, where: str) -> None:
    em.move_stage(10.0, 10.0)
    before = em.stage_position()
    lim = em.limits
    with pytest.raises(LimitViolation, match="outside"):
        if where == "x-above":
            em.move_stage(lim.x.upper + 1.0, 0.0)
        elif where == "y-below":
            em.move_stage(0.0, lim.y.lower - 1.0)
        elif where == "z-above":
            em.move_stage(0.0, 0.0, lim.z.upper + 1.0)
        else:
            em.move_stage(math.nan, 0.0)
    assert em.stage_position() == before


def test_tilt_reads_back_and_limits(em: ElectronMicroscope) -> None:
    em.tilt_to(30.0)
    assert em.tilt() == pytest.approx(30.0)
    with pytest.raises(LimitViolation, match="tilt"):
        em.tilt_to(em.tilt_limits.upper + 5.0)
    assert em.tilt() == pytest.approx(30.0)


# --------------------------------------------------------------------------- optics


def test_magnification_reads_back_and_unknown_is_refused(em: ElectronMicroscope) -> None:
    index = sorted(em.magnifications)[len(em.magnifications) // 2]
    em.set_mag_index(index)
    assert em.mag_index() == index
    with pytest.raises(LimitViolation, match="magnification index 999"):
        em.set_mag_index(999)
    assert em.mag_index() == index


def test_defocus_and_image_shift_read_back(em: ElectronMicroscope) -> None:
    em.set_defocus(-4.25)
    assert em.defocus() == pytest.approx(-4.25)
    em.set_image_shift(1.5, -2.0)
    assert em.image_shift() == pytest.approx((1.5, -2.0))
    em.set_image_shift(0.0, 0.5)
    assert em.image_shift() == pytest.approx((0.0, 0.5))
    with pytest.raises(LimitViolation):
        em.set_image_shift(50.0, 0.0)


# --------------------------------------------------------------------------- acquisition


@pytest.mark.parametrize("area", [LowDoseArea.RECORD, LowDoseArea.VIEW, LowDoseArea.SEARCH])
def test_acquire_returns_an_image_with_its_geometry(em: ElectronMicroscope,
                                                    area: LowDoseArea) -> None:
    em.move_stage(40.0, -25.0)
    em.tilt_to(-12.0)
    settings = em.low_dose[area]
    image = em.acquire(area)
    mag = em.magnifications[settings.mag_index]
    assert image.shape == em.camera_shape(settings.binning)
    assert image.data.dtype == np.uint16
    assert image.mag_index == settings.mag_index and image.binning == settings.binning
    assert image.pixel_size_um == pytest.approx(mag.pixel_size_um * settings.binning)
    assert image.low_dose_area == area.value and image.instrument == "em"
    assert image.tilt_deg == pytest.approx(-12.0)
    assert image.exposure_s == pytest.approx(settings.exposure_s)
    assert image.dose_e_per_a2 == pytest.approx(settings.dose_rate_e_per_a2_s
                                                 * settings.exposure_s)
    h, w = image.shape
    centre = image.pixel_to_stage_xy([(w - 1) / 2, (h - 1) / 2])
    assert centre == pytest.approx((40.0, -25.0), abs=1e-6)
    # one pixel along x moves by the pixel size along the magnification's rotation
    step = image.pixel_to_stage_xy([1.0, 0.0]) - image.pixel_to_stage_xy([0.0, 0.0])
    theta = math.radians(mag.rotation_deg)
    assert step == pytest.approx(image.pixel_size_um * np.array([math.cos(theta),
                                                                 math.sin(theta)]))


def test_image_shift_moves_the_image_centre(em: ElectronMicroscope) -> None:
    em.move_stage(0.0, 0.0)
    em.set_image_shift(2.0, -1.0)
    image = em.acquire(LowDoseArea.RECORD)
    h, w = image.shape
    assert image.pixel_to_stage_xy([(w - 1) / 2, (h - 1) / 2]) == pytest.approx((2.0, -1.0))


def test_unconfigured_area_is_refused(make_em: Any) -> None:
    em = make_em(low_dose={"record": {"mag_index": 24, "exposure_s": 1.0}})
    assert em.acquire(LowDoseArea.RECORD).shape == CAMERA
    with pytest.raises(LimitViolation, match="SEARCH is not configured"):
        em.acquire(LowDoseArea.SEARCH)


def test_acquire_with_settings_overrides_the_preset_for_one_shot(em: ElectronMicroscope
                                                                ) -> None:
    preset = em.low_dose[LowDoseArea.RECORD]
    other = next(i for i in sorted(em.magnifications) if i != preset.mag_index)
    once = replace(preset, mag_index=other, binning=2, exposure_s=0.3,
                   dose_rate_e_per_a2_s=0.5)
    image = em.acquire(LowDoseArea.RECORD, settings=once)
    assert (image.mag_index, image.binning) == (other, 2)
    assert image.shape == em.camera_shape(2)
    assert image.exposure_s == pytest.approx(0.3)
    assert image.dose_e_per_a2 == pytest.approx(0.15)
    assert image.pixel_size_um == pytest.approx(em.magnifications[other].pixel_size_um * 2)
    assert em.low_dose[LowDoseArea.RECORD] == preset
    again = em.acquire(LowDoseArea.RECORD)
    assert (again.mag_index, again.binning) == (preset.mag_index, preset.binning)
    assert again.exposure_s == pytest.approx(preset.exposure_s)


def test_acquire_settings_with_a_defocus_offset_are_described(em: ElectronMicroscope) -> None:
    em.set_defocus(-4.0)
    once = replace(em.low_dose[LowDoseArea.RECORD], defocus_offset_um=-20.0)
    assert em.acquire(LowDoseArea.RECORD, once).defocus_um == pytest.approx(-24.0)
    assert em.defocus() == pytest.approx(-4.0)
    assert em.acquire(LowDoseArea.RECORD).defocus_um == pytest.approx(
        -4.0 + em.low_dose[LowDoseArea.RECORD].defocus_offset_um)


@pytest.mark.parametrize("bad", ["mag-index", "binning-past-camera", "area"])
def test_bad_acquire_settings_are_refused_before_anything(em: ElectronMicroscope,
                                                          bad: str) -> None:
    preset = em.low_dose[LowDoseArea.RECORD]
    em.set_mag_index(preset.mag_index)
    if bad == "mag-index":
        settings, area, match = replace(preset, mag_index=999), LowDoseArea.RECORD, \
            "magnification index 999"
    elif bad == "binning-past-camera":
        settings, area, match = replace(preset, binning=4 * max(CAMERA)), LowDoseArea.RECORD, \
            r"settings\.binning"
    else:
        settings, area, match = preset, LowDoseArea.TRIAL, "TRIAL is not configured"
    if bad == "area":
        em.low_dose.pop(LowDoseArea.TRIAL, None)
    with pytest.raises(LimitViolation, match=match):
        em.acquire(area, settings)
    assert em.mag_index() == preset.mag_index


def test_settings_themselves_refuse_zero_exposure_and_binning() -> None:
    with pytest.raises(ConfigError, match="exposure_s"):
        AcquisitionSettings(mag_index=1, exposure_s=0.0)
    with pytest.raises(ConfigError, match="binning"):
        AcquisitionSettings(mag_index=1, exposure_s=1.0, binning=0)


def test_montage_tiles(em: ElectronMicroscope) -> None:
    # binning 1: SerialEM's montage wants frames of at least 32 px and 16 px overlaps
    settings = replace(em.low_dose[LowDoseArea.VIEW], binning=1)
    assert em.native_montage == isinstance(em, SerialEMElectronMicroscope)
    tiles = em.montage((100.0, 50.0), (2, 3), overlap=0.2, area=LowDoseArea.VIEW,
                       settings=settings)
    assert len(tiles) == 6
    assert [t.index for t in tiles] == [{"tile": k} for k in range(6)]
    wanted = em.montage_positions((100.0, 50.0), (2, 3), 0.2, settings)
    for t, (x, y) in zip(tiles, wanted, strict=True):
        assert t.shape == em.camera_shape(1) and t.binning == 1
        assert t.pixel_size_um == pytest.approx(em.magnifications[settings.mag_index]
                                                .pixel_size_um)
        assert t.low_dose_area == LowDoseArea.VIEW.value
        assert t.stage_um[:2] == pytest.approx((x, y), abs=1e-2)
        h, w = t.shape     # each tile's affine is centred on its own stage position
        assert t.pixel_to_stage_xy([(w - 1) / 2, (h - 1) / 2]) == \
            pytest.approx(t.stage_um[:2], abs=1e-6)
    xs = [t.stage_um[0] for t in tiles]
    ys = [t.stage_um[1] for t in tiles]
    assert np.mean(xs) == pytest.approx(100.0, abs=1e-3)
    assert np.mean(ys) == pytest.approx(50.0, abs=1e-3)


def test_montage_outside_travel_is_refused_before_moving(em: ElectronMicroscope) -> None:
    em.move_stage(5.0, 5.0)
    with pytest.raises(LimitViolation):
        em.montage((em.limits.x.upper, 0.0), (3, 3), area=LowDoseArea.VIEW)
    assert em.stage_position()[:2] == pytest.approx((5.0, 5.0))


# --------------------------------------------------------------------------- autofocus


def _square_centre(specimen: Specimen) -> tuple[float, float]:
    """EM stage position of the middle of a whole square with good film."""
    sq = next(s for s in specimen.squares if s.state == SquareState.OK and not s.partial
              and not s.cell_ids and abs(s.i) + abs(s.j) > 0)
    x, y = specimen.truth.grid_to_em_stage(np.asarray(sq.centre_um, float))
    return float(x), float(y)


def _on_film_that_focuses(em: ElectronMicroscope, specimen: Specimen) -> None:
    """Step across a square's film until autofocus finds a hole edge (contract calls only)."""
    x0, y0 = _square_centre(specimen)
    for k in range(12):
        em.move_stage(x0 + 0.7 * k, y0 + 0.3 * k)
        try:
            em.autofocus(apply=False)
            return
        except AutofocusFailed:
            continue
    raise AssertionError("no place with contrast found on the film")


def test_autofocus_measures_and_corrects_the_defocus(make_em: Any,
                                                     specimen: Specimen) -> None:
    em = make_em(low_dose=FOCUS_LOW_DOSE)
    _on_film_that_focuses(em, specimen)
    em.set_defocus(-3.0)
    first = em.autofocus(apply=False)
    assert em.defocus() == pytest.approx(-3.0)          # measuring changes nothing
    error = em.autofocus()
    assert error == pytest.approx(first, abs=0.5)       # two measurements agree within noise
    assert em.defocus() == pytest.approx(-3.0 - error)  # corrected by minus the error
    # the error belongs to the place (its height), not to the lens: measured again at the
    # corrected lens it is the same, and moving on keeps it
    assert em.autofocus(apply=False) == pytest.approx(error, abs=0.5)


def test_autofocus_on_a_grid_bar_fails_and_leaves_the_focus(make_em: Any,
                                                            specimen: Specimen) -> None:
    em = make_em(low_dose=FOCUS_LOW_DOSE)
    x0, y0 = _square_centre(specimen)
    pitch = specimen.config.pitch_um
    sq = specimen.truth.em_stage_to_grid(np.array([x0, y0]))
    bar = specimen.truth.grid_to_em_stage(np.array([sq[0] + pitch / 2, sq[1]]))
    em.move_stage(float(bar[0]), float(bar[1]))
    em.set_defocus(-2.0)
    with pytest.raises(AutofocusFailed, match="autofocus"):
        em.autofocus()
    assert em.defocus() == pytest.approx(-2.0)


def test_autofocus_in_an_unconfigured_area_is_refused(make_em: Any) -> None:
    em = make_em(low_dose={"record": FOCUS_LOW_DOSE["record"]})
    with pytest.raises(LimitViolation, match="FOCUS is not configured"):
        em.autofocus()


# --------------------------------------------------------------------------- navigator


def test_nav_points(em: ElectronMicroscope) -> None:
    assert em.nav_items() == []
    first = em.add_nav_point(10.0, 20.0, -2.0, label="sq-3", note="bead cluster", acquire=True)
    second = em.add_nav_point(-30.0, 40.0)
    assert (first.label, first.note, first.acquire, first.kind) == \
        ("sq-3", "bead cluster", True, "point")
    assert first.stage_um == pytest.approx((10.0, 20.0, -2.0))
    assert second.acquire is False and second.item_id != first.item_id
    assert em.nav_items() == [first, second]
    with pytest.raises(LimitViolation):
        em.add_nav_point(em.limits.x.upper + 10.0, 0.0)
    assert len(em.nav_items()) == 2


def test_realign_to_item_moves_there(em: ElectronMicroscope) -> None:
    item = em.add_nav_point(-60.0, 35.0)
    em.move_stage(0.0, 0.0)
    shift = em.realign_to_item(item.item_id)
    assert len(shift) == 2
    assert em.stage_position()[:2] == pytest.approx((-60.0, 35.0))
    with pytest.raises(LimitViolation, match="does not exist"):
        em.realign_to_item(item.item_id + 100)


# --------------------------------------------------------------------------- status, abort


def test_status(em: ElectronMicroscope) -> None:
    status = em.status()
    assert status.vacuum_ok and status.column_valve_open and not status.dewar_filling
    assert status.high_voltage_kv == pytest.approx(300.0)
    assert status.ready


def test_vacuum_fault_is_reported(make_em: Any) -> None:
    em = make_em(faults={"vacuum_fault_after_s": 0.0})
    status = em.status()
    assert not status.vacuum_ok and not status.column_valve_open and not status.ready


def test_abort_stops_the_next_step(em: ElectronMicroscope) -> None:
    em.move_stage(1.0, 1.0)
    em.abort()
    with pytest.raises(Aborted):
        em.move_stage(2.0, 2.0)
    assert em.stage_position()[:2] == pytest.approx((1.0, 1.0))
    em.move_stage(2.0, 2.0)
    assert em.stage_position()[:2] == pytest.approx((2.0, 2.0))
