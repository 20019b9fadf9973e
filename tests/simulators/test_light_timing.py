"""The simulated light microscope on the clock: what moves, changes and exposures cost, a
40-minute time-lapse in seconds, abort; and the camera delivers a frame at the end of the
exposure and readout it models: rendering happens inside that wait, so it is neither the
caller's time nor extra time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import useq

from drivers.clock import CriticalPathClock, VirtualClock
from drivers.errors import Aborted
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=7)


def mda(**fields: Any) -> useq.MDASequence:
    """A validated useq sequence from plain values, as a config file would give them."""
    return useq.MDASequence.model_validate(fields)


def scope(spec: Specimen, shape: tuple[int, int] = (128, 128)) -> SimulatedLightMicroscope:
    return SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), shape=shape,
                                                      exact_stage=True)


@pytest.fixture
def lm(spec: Specimen) -> Iterator[SimulatedLightMicroscope]:
    m = scope(spec)
    yield m
    m.close()


def test_timing_model(lm: SimulatedLightMicroscope) -> None:
    t = lm.config.timing
    clock = lm.clock
    t0 = clock.now()
    lm.move_xy(1000.0, -400.0)
    assert clock.now() - t0 == pytest.approx(t.xy_settle_s + 1000.0 / t.xy_speed_um_s)
    t0 = clock.now()
    lm.move_z(3.0)
    assert clock.now() - t0 == pytest.approx(t.z_settle_s + 3.0 / t.z_speed_um_s)
    t0 = clock.now()
    lm.set_channel("DIC")
    lm.set_objective("100x")
    assert clock.now() - t0 == pytest.approx(t.channel_change_s + t.objective_change_s)
    t0 = clock.now()
    img = lm.snap(exposure_s=0.25)
    readout = lm.config.camera.shape[0] * lm.config.camera.line_time_s
    assert clock.now() - t0 == pytest.approx(0.25 + readout)
    assert img.time_s == clock.now()


def test_forty_minute_time_lapse_runs_in_seconds(spec: Specimen) -> None:
    m = scope(spec, (96, 96))
    cell = spec.cells[0]
    lm_xy = spec.truth.grid_to_lm_stage(np.array(cell.centre_um))
    m.set_objective("100x")
    z0 = m.focus_z_for((float(lm_xy[0]), float(lm_xy[1])))
    seq = mda(stage_positions=[(float(lm_xy[0]), float(lm_xy[1]), z0)],
              time_plan={"interval": 300, "loops": 9}, channels=["488", "640"],
              z_plan={"range": 8, "step": 1}, axis_order="tpzc")
    t_clock = m.clock.now()
    t_wall = time.perf_counter()
    images = list(m.run_events(seq))
    wall_s = time.perf_counter() - t_wall
    assert len(images) == 9 * 9 * 2
    assert wall_s < 10.0
    virtual_s = m.clock.now() - t_clock
    assert 2400.0 < virtual_s < 2400.0 + 30.0
    assert {img.channel for img in images} == {"488", "640"}
    zs = sorted({round(img.z_um or 0.0, 6) for img in images})
    assert zs == pytest.approx(list(z0 + np.arange(-4.0, 4.5, 1.0)))
    firsts = [img for img in images if img.index.get("z") == 0 and img.index.get("c") == 0]
    assert np.diff([img.time_s for img in firsts]) == pytest.approx([300.0] * 8, abs=1.0)
    assert all(img.extra["late_s"] == 0.0 for img in firsts)   # the stack fits the interval


def test_abort_stops_run_events(lm: SimulatedLightMicroscope) -> None:
    seq = mda(time_plan={"interval": 1, "loops": 10}, channels=["BF"])
    got = []
    with pytest.raises(Aborted):
        for img in lm.run_events(seq):
            got.append(img)
            if len(got) == 3:
                lm.abort()
    assert len(got) == 3
    lm.snap()                                   # usable again afterwards


def test_a_snap_takes_its_exposure_and_readout_on_the_virtual_clock(spec: Specimen) -> None:
    lm = SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), shape=(256, 256))
    t0 = lm.clock.now()
    lm.snap("BF", 0.03)
    readout = 256 * lm.config.camera.line_time_s
    assert lm.clock.now() - t0 == pytest.approx(0.03 + readout, abs=1e-12)


def test_rendering_is_inside_the_exposure_not_the_callers_compute(spec: Specimen) -> None:
    """On an accounting clock the frame costs exactly its modelled exposure and readout,
    however long this machine took to render it (a 512 x 512 frame takes longer to render
    than its 2 ms exposure): the caller is charged a fraction of the wall time."""
    clock = CriticalPathClock()
    lm = SimulatedLightMicroscope.with_small_camera(spec, clock, shape=(512, 512))
    before = clock.timeline()
    t0 = time.perf_counter()
    for _ in range(5):
        lm.snap("BF", 0.002)
    wall = time.perf_counter() - t0
    after = clock.timeline()
    readout = 512 * lm.config.camera.line_time_s
    assert after.waited_s - before.waited_s == pytest.approx(5 * (0.002 + readout))
    assert after.compute_s - before.compute_s < min(0.05, wall / 2)
