"""The simulated camera delivers a frame at the end of the exposure and readout it models:
rendering happens inside that wait, so it is neither the caller's time nor extra time."""

from __future__ import annotations

import pytest

from drivers.clock import CriticalPathClock, VirtualClock
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=7, grid_diameter_um=700.0, rim_width_um=100.0)


def test_a_snap_takes_its_exposure_and_readout_on_the_virtual_clock(spec: Specimen) -> None:
    lm = SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), shape=(256, 256))
    t0 = lm.clock.now()
    lm.snap("BF", 0.03)
    readout = 256 * lm.config.camera.line_time_s
    assert lm.clock.now() - t0 == pytest.approx(0.03 + readout, abs=1e-12)


def test_rendering_is_inside_the_exposure_not_the_callers_compute(spec: Specimen) -> None:
    """On an accounting clock the frame costs exactly its modelled exposure and readout,
    however long this machine took to render it (a 512 x 512 frame takes longer to render
    than its 2 ms exposure)."""
    clock = CriticalPathClock()
    lm = SimulatedLightMicroscope.with_small_camera(spec, clock, shape=(512, 512))
    before = clock.timeline()
    for _ in range(3):
        lm.snap("BF", 0.002)
    after = clock.timeline()
    readout = 512 * lm.config.camera.line_time_s
    assert after.waited_s - before.waited_s == pytest.approx(3 * (0.002 + readout))
    assert after.compute_s - before.compute_s < 0.02
