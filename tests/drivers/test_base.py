"""The contracts' own checks: limits, clocks, image geometry, config validation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from drivers.base import (
    AcquisitionSettings, AxisLimits, Channel, ConfigError, Image, LimitViolation, Magnification,
    Objective, RealClock, StageLimits, VirtualClock, affine_from, invert_affine,
)


def test_axis_limits_name_value_limit_and_setting() -> None:
    tilt = AxisLimits(-60, 60, "tilt", unit="deg", setting="em.tilt_limits_deg")
    assert tilt.check(59.5) == 59.5
    with pytest.raises(LimitViolation, match=r"tilt 72 deg outside \[-60, 60\] \(em.tilt_limits_deg\)"):
        tilt.check(72.0)
    with pytest.raises(LimitViolation):
        tilt.check(float("nan"))
    with pytest.raises(ConfigError, match="em.bad"):
        AxisLimits(5, -5, "x", setting="em.bad")


def test_stage_limits_check_both_axes() -> None:
    lim = StageLimits.symmetric(1000, 50, "lm")
    assert lim.check_xy(999, -1000) == (999.0, -1000.0)
    with pytest.raises(LimitViolation, match="stage y"):
        lim.check_xy(0, 1000.5)


@pytest.mark.parametrize("factory,field", [
    (lambda: Objective("100x", 100, 1.49, -0.065), "objectives.100x.pixel_size_um"),
    (lambda: Objective("20x", 20, 0.0, 0.325), "objectives.20x.numerical_aperture"),
    (lambda: Channel("488", exposure_s=0), "channels.488.exposure_s"),
    (lambda: Magnification(16, 4700, -0.0023), "em.magnifications.16.pixel_size_um"),
    (lambda: AcquisitionSettings(16, 1.0, binning=0), "binning"),
])
def test_invalid_values_name_the_field(factory, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        factory()
    assert info.value.field == field


@pytest.mark.parametrize("rotation,mirror", [(0.0, False), (0.7, False), (-123.0, True)])
def test_image_pixel_stage_round_trip(rotation: float, mirror: bool) -> None:
    a = affine_from(0.065, rotation, (120.0, -40.0), (256, 512), mirror)
    img = Image(data=np.zeros((256, 512), np.uint16), pixel_size_um=0.065, pixel_to_stage=a,
                instrument="lm")
    # the image centre sits at the stage position, and pixel steps are one pixel size long
    centre = img.pixel_to_stage_xy([(511 / 2, 255 / 2)])[0]
    assert centre == pytest.approx([120.0, -40.0])
    step = img.pixel_to_stage_xy([(1, 0)]) - img.pixel_to_stage_xy([(0, 0)])
    assert np.linalg.norm(step) == pytest.approx(0.065)
    assert (np.linalg.det(a[:, :2]) < 0) == mirror
    pts = np.random.default_rng(0).uniform(0, 500, size=(20, 2))
    assert img.stage_to_pixel_xy(img.pixel_to_stage_xy(pts)) == pytest.approx(pts)
    assert invert_affine(invert_affine(a)) == pytest.approx(a)


def test_image_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2D"):
        Image(data=np.zeros((2, 2, 2)), pixel_size_um=1, pixel_to_stage=np.eye(2, 3),
              instrument="lm")
    with pytest.raises(ValueError, match="pixel_size_um"):
        Image(data=np.zeros((2, 2)), pixel_size_um=0, pixel_to_stage=np.eye(2, 3),
              instrument="lm")


def test_virtual_clock_runs_forty_minutes_instantly() -> None:
    clock = VirtualClock()
    wall = time.perf_counter()
    for _ in range(9):
        clock.sleep(300.0)
    clock.sleep_until(2400.0)
    clock.sleep(-5)
    assert clock.now() == pytest.approx(2700.0)
    assert time.perf_counter() - wall < 0.5


def test_real_clock_is_monotonic() -> None:
    c = RealClock()
    a = c.now()
    c.sleep(0.0)
    assert c.now() >= a
