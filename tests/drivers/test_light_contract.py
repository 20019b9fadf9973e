"""The LightMicroscope contract, written once and run on every backend.

Backends: "micromanager" is the real driver on a real MMCore with Micro-Manager's demo
devices (tests/drivers/conftest.py); "simulated" is simulators/light.py. Tests use only the
contract (drivers/base.py) and take names, limits and sizes from the instance, so a new
backend joins by adding a parameter to the ``light`` fixture.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import useq

from drivers.base import AxisLimits, LightMicroscope
from drivers.clock import VirtualClock
from drivers.errors import Aborted, LimitViolation
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen

XY_TOL_UM = 0.05   # demo XY stage reads back in 0.005 um steps
Z_TOL_UM = 0.05


def mda(**fields: Any) -> useq.MDASequence:
    """A validated useq sequence from plain values, as a config file would give them."""
    return useq.MDASequence.model_validate(fields)


def _simulated_light() -> Iterator[LightMicroscope]:
    light = SimulatedLightMicroscope(Specimen.generate(seed=0), VirtualClock(), seed=0)
    yield light
    light.close()


@pytest.fixture(params=["micromanager", "simulated"])
def light(request: pytest.FixtureRequest) -> Iterator[LightMicroscope]:
    if request.param == "micromanager":
        yield request.getfixturevalue("mm_light")
    else:
        yield from _simulated_light()


def _inside(light: LightMicroscope, fraction: float) -> tuple[float, float, float]:
    """A point near the centre of travel: ``fraction`` of 2 % of the half-travel towards the
    upper limits (negative: towards the lower), so moves stay short on a real stage."""
    def at(axis: AxisLimits) -> float:
        centre = (axis.lower + axis.upper) / 2
        return round(centre + fraction * (axis.upper - centre) * 0.02, 3)
    return at(light.limits.x), at(light.limits.y), at(light.limits.z)


# -- stage ---------------------------------------------------------------------------------


def test_move_reads_back(light: LightMicroscope) -> None:
    x, y, z = _inside(light, 0.6)
    light.move_xy(x, y)
    light.move_z(z)
    assert light.position_xy() == pytest.approx((x, y), abs=XY_TOL_UM)
    assert light.position_z() == pytest.approx(z, abs=Z_TOL_UM)


@pytest.mark.parametrize("where", ["x-above", "y-below", "z-above", "z-nan"])
def test_limits_refused_before_moving(light: LightMicroscope, where: str) -> None:
    x, y, z = _inside(light, 0.3)
    light.move_xy(x, y)
    light.move_z(z)
    before = (light.position_xy(), light.position_z())
    lim = light.limits
    with pytest.raises(LimitViolation):
        if where == "x-above":
            light.move_xy(lim.x.upper + 1.0, y)
        elif where == "y-below":
            light.move_xy(x, lim.y.lower - 1.0)
        elif where == "z-above":
            light.move_z(lim.z.upper + 0.5)
        else:
            light.move_z(math.nan)
    assert (light.position_xy(), light.position_z()) == before


def test_unknown_channel_and_objective_refused(light: LightMicroscope) -> None:
    channel, objective = light.channel.name, light.objective.name
    with pytest.raises(LimitViolation, match="not available"):
        light.set_channel("no-such-channel")
    with pytest.raises(LimitViolation, match="not available"):
        light.set_objective("no-such-objective")
    with pytest.raises(LimitViolation, match="not available"):
        light.snap("no-such-channel")
    assert (light.channel.name, light.objective.name) == (channel, objective)


# -- snap ----------------------------------------------------------------------------------


def test_snap_geometry_follows_objective_and_stage(light: LightMicroscope) -> None:
    x, y, z = _inside(light, -0.4)
    light.move_xy(x, y)
    light.move_z(z)
    for name, objective in light.objectives.items():
        light.set_objective(name)
        img = light.snap()
        h, w = light.camera_shape()
        assert img.shape == (h, w)
        assert img.data.dtype.kind == "u"
        assert img.pixel_size_um == pytest.approx(objective.pixel_size_um)
        assert img.objective == name and img.channel == light.channel.name
        assert img.stage_um == pytest.approx((*light.position_xy(), light.position_z()))
        # the image centre sits at the stage position; pixel steps are one pixel size long
        centre = img.pixel_to_stage_xy(((w - 1) / 2, (h - 1) / 2))
        assert centre == pytest.approx(img.stage_um[:2], abs=1e-6)
        step_x = img.pixel_to_stage_xy((1.0, 0.0)) - img.pixel_to_stage_xy((0.0, 0.0))
        assert np.hypot(*step_x) == pytest.approx(objective.pixel_size_um)
        angle = math.degrees(math.atan2(step_x[1], step_x[0]))
        assert angle == pytest.approx(objective.rotation_deg, abs=1e-6)


# -- multi-dimensional acquisition ---------------------------------------------------------


def test_run_events_channels_by_z(light: LightMicroscope) -> None:
    names = list(light.channels)[:2]
    x, y, z0 = _inside(light, 0.1)
    light.move_xy(x, y)
    seq = mda(channels=tuple({"config": name} for name in names),
                           z_plan={"range": 2.0, "step": 1.0},
                           stage_positions=({"x": x, "y": y, "z": z0},),
                           axis_order=tuple("pcz"))
    events = list(seq)
    images = list(light.run_events(events))
    assert len(images) == len(events) == 2 * 3
    for ev, img in zip(events, images, strict=True):
        assert img.index == {str(getattr(k, "value", k)): v for k, v in ev.index.items()}
        assert img.channel == names[ev.index["c"]]
        assert img.z_um == pytest.approx(ev.z_pos, abs=Z_TOL_UM)
        assert img.shape == light.camera_shape()
    assert {(img.index["c"], img.index["z"]) for img in images} == {
        (c, z) for c in range(2) for z in range(3)}


def test_abort_stops_a_run(light: LightMicroscope) -> None:
    seq = mda(time_plan={"interval": 0, "loops": 30})
    received = 0
    with pytest.raises(Aborted):
        for _ in light.run_events(seq):
            received += 1
            light.abort()
    assert received == 1
    # the abort is consumed: the next command runs
    x, y, _ = _inside(light, 0.2)
    light.move_xy(x, y)
    assert light.position_xy() == pytest.approx((x, y), abs=XY_TOL_UM)
