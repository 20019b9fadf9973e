"""One bead, both instruments: each image shows it where the specimen's truth says.

This is what every correlation number rests on: if the simulated LM and EM disagree with
the ground truth, accuracy benchmarks measure the simulator, not the algorithm.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from drivers.base import Image, LowDoseArea, VirtualClock
from drivers.imaging import apply_affine, invert_affine
from simulators.electron import SimulatedElectronMicroscope
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen, SquareState


def _isolated_surviving_bead(spec: Specimen) -> int:
    """A bead kept at freezing, on a good square, with no bead or debris within 4 um."""
    xy = spec.beads.xy_um
    others = np.vstack([xy, spec.contamination.xy_um])
    good = {s.key for s in spec.squares if s.state == SquareState.OK and not s.partial}
    for k in np.nonzero(~spec.beads.lost)[0]:
        i, j = spec.square_at(xy[k])
        if f"{int(i):+d}{int(j):+d}" not in good or (int(i), int(j)) == (0, 0):
            continue
        d = np.linalg.norm(others - xy[k], axis=1)
        if np.sum(d < 4.0) == 1:
            return int(k)
    raise AssertionError("no isolated bead in this specimen")


def _extremum_near(data: NDArray[np.float64], guess: NDArray[np.float64], sigma_px: float,
                   dark: bool, window: int) -> NDArray[np.float64]:
    """Sub-pixel position of the blob nearest ``guess`` (smoothed extremum + parabola)."""
    img = cv2.GaussianBlur(np.asarray(data, np.float64), (0, 0), sigma_px)
    if dark:
        img = -img
    cx, cy = int(round(guess[0])), int(round(guess[1]))
    y0, x0 = max(cy - window, 1), max(cx - window, 1)
    patch = img[y0:cy + window + 1, x0:cx + window + 1]
    r, c = np.unravel_index(int(np.argmax(patch)), patch.shape)
    r, c = r + y0, c + x0

    def vertex(a: float, b: float, d: float) -> float:
        den = a - 2 * b + d
        return 0.0 if den == 0 else 0.5 * (a - d) / den

    dx = vertex(img[r, c - 1], img[r, c], img[r, c + 1])
    dy = vertex(img[r - 1, c], img[r, c], img[r + 1, c])
    return np.array([c + dx, r + dy])


def _predicted_pixel(true_affine: NDArray[np.float64], stage_xy: NDArray[np.float64]
                     ) -> NDArray[np.float64]:
    return apply_affine(invert_affine(true_affine), stage_xy)


@pytest.mark.parametrize("em_rotation,flipped,lm_rotation", [
    (0.0, False, 0.0), (37.0, False, 121.0), (200.0, True, 15.0), (305.0, True, 280.0),
])
def test_bead_lies_where_truth_says_in_lm_100x_and_em_4700x(
        em_rotation: float, flipped: bool, lm_rotation: float) -> None:
    spec = Specimen.generate(seed=21, em_rotation_deg=em_rotation, flipped=flipped,
                             lm_rotation_deg=lm_rotation)
    k = _isolated_surviving_bead(spec)
    bead = spec.beads.xy_um[k]
    clock = VirtualClock()

    # Light microscope: 100x, 405 nm (beads), stage error on.
    lm = SimulatedLightMicroscope.with_small_camera(spec, clock, shape=(160, 160), seed=3)
    lm.set_objective("100x")
    lm_xy = spec.truth.grid_to_lm_stage(bead)
    lm.move_xy(*lm_xy)
    bead_height = float(spec.bead_heights_um()[k])
    lm.move_z(lm.focus_z_for(tuple(lm_xy), bead_height))
    img: Image = lm.snap("405")
    expected = _predicted_pixel(lm.true_pixel_to_stage(img), lm_xy)
    found = _extremum_near(img.data, expected, sigma_px=1.5, dark=False, window=8)
    assert np.linalg.norm(found - expected) < 1.0, (found, expected)
    # and the nominal affine is off only by the stage error (< 3 um), as on a real stage
    nominal = _predicted_pixel(img.pixel_to_stage, lm_xy)
    assert np.linalg.norm(nominal - expected) * img.pixel_size_um < 3.0

    # Electron microscope: 4,700x map conditions (VIEW preset: binned, large defocus).
    em = SimulatedElectronMicroscope.for_tests(spec, clock, camera=(2048, 2048), seed=4)
    em_xy = spec.truth.grid_to_em_stage(bead)
    em.move_stage(*em_xy)
    view = em.acquire(LowDoseArea.VIEW)
    assert view.magnification == pytest.approx(4700, rel=0.05)
    expected = _predicted_pixel(em.true_pixel_to_stage(view), em_xy)
    radius_px = spec.beads.diameter_um / 2 / view.pixel_size_um
    found = _extremum_near(view.data, expected, sigma_px=radius_px / 2, dark=True,
                           window=int(2 * radius_px))
    assert np.linalg.norm(found - expected) < 1.0, (found, expected)


def test_lost_bead_is_seen_in_lm_but_not_in_em() -> None:
    spec = Specimen.generate(seed=22, contamination=0.0)
    xy = spec.beads.xy_um
    lost = [k for k in np.nonzero(spec.beads.lost)[0]
            if np.sum(np.linalg.norm(xy - xy[k], axis=1) < 4.0) == 1]
    k = int(lost[0])
    clock = VirtualClock()
    em = SimulatedElectronMicroscope.for_tests(spec, clock, camera=(1024, 1024), seed=1,
                                               stage={"repeatability_rms_um": 0.0,
                                                      "backlash_um": 0.0})
    em.move_stage(*spec.truth.grid_to_em_stage(xy[k]))
    view = em.acquire(LowDoseArea.VIEW)
    p = _predicted_pixel(em.true_pixel_to_stage(view), spec.truth.grid_to_em_stage(xy[k]))
    r = int(spec.beads.diameter_um / view.pixel_size_um)
    c, rr = int(round(p[0])), int(round(p[1]))
    patch = view.data[rr - r:rr + r + 1, c - r:c + r + 1].astype(float)
    ring = view.data[rr - 4 * r:rr + 4 * r + 1, c - 4 * r:c + 4 * r + 1].astype(float)
    # no dark disk: the patch is as bright as its surroundings (within noise)
    assert patch.mean() > ring.mean() - 2 * ring.std() / np.sqrt(patch.size) - 0.05 * ring.mean()
