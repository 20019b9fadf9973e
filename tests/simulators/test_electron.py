"""The simulated TEM: images agree with the specimen's ground truth, the stage misses like a
real one, tilt projects as it should, bad requests are refused before anything moves, and
dose and time are accounted."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from drivers.base import (
    Aborted,
    AutofocusFailed,
    HardwareFault,
    Image,
    InvalidState,
    LimitViolation,
    LowDoseArea,
)
from drivers.clock import VirtualClock
from drivers.errors import ConfigError
from simulators.electron import SimulatedElectronMicroscope
from simulators.electron_config import ElectronSimConfig, mag_index_of
from simulators.specimen import Specimen, SquareState

VIEW, RECORD, SEARCH, FOCUS = (LowDoseArea.VIEW, LowDoseArea.RECORD, LowDoseArea.SEARCH,
                               LowDoseArea.FOCUS)
EXACT: dict[str, Any] = {
    "stage": {"repeatability_rms_um": 0.0, "backlash_um": 0.0, "z_repeatability_rms_um": 0.0,
              "tilt_repeatability_rms_deg": 0.0, "tilt_runout_um": 0.0},
    "optics": {"pixel_size_error_rms": 0.0, "rotation_error_rms_deg": 0.0},
}
NO_CALIBRATION_ERROR: dict[str, Any] = {"optics": EXACT["optics"]}


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=4)


# --------------------------------------------------------------------------- helpers


def _object_points(spec: Specimen) -> NDArray[np.float64]:
    return np.vstack([spec.beads.xy_um, spec.contamination.xy_um, spec.viruses.frozen_um])


def isolated(spec: Specimen, candidates: NDArray[np.int_], xy: NDArray[np.float64], *,
             gap_um: float = 4.0, edge_um: float = 10.0, skip: int = 0) -> int:
    """Index (into ``xy``) of a candidate far from every other object, bar and cell."""
    others = _object_points(spec)
    pitch = spec.config.pitch_um
    half_open = (pitch - spec.config.bar_width_um) / 2
    cell_centres = np.array([c.centre_um for c in spec.cells])
    found = 0
    for k in candidates:
        p = xy[k]
        i, j = spec.square_at(p[None])
        sq = spec._index.get((int(i[0]), int(j[0])))
        if sq is None or sq.state != SquareState.OK or sq.partial or (sq.i, sq.j) == (0, 0):
            continue
        if np.abs(p - np.array(sq.centre_um)).max() > half_open - edge_um:
            continue
        d = np.hypot(*(others - p).T)
        if np.sort(d)[1] < gap_um or np.hypot(*(cell_centres - p).T).min() < 60:
            continue
        if found == skip:
            return int(k)
        found += 1
    raise AssertionError("no isolated object in this specimen")


def dark_centre(data: NDArray[Any], radius_px: float) -> NDArray[np.float64]:
    """Sub-pixel centre of the darkest disk-like spot: matched smoothing, then an
    iterated darkness-weighted centroid (symmetric, so fringes do not bias it)."""
    img = data.astype(np.float32)
    flat = img - cv2.GaussianBlur(img, (0, 0), 4 * radius_px)
    smooth = cv2.GaussianBlur(flat, (0, 0), radius_px / 1.5)
    b = int(2 * radius_px)
    smooth[:b], smooth[-b:], smooth[:, :b], smooth[:, -b:] = np.inf, np.inf, np.inf, np.inf
    iy, ix = np.unravel_index(int(np.argmin(smooth)), smooth.shape)
    c = np.array([float(ix), float(iy)])
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(float)
    for _ in range(8):
        r = np.hypot(xx - c[0], yy - c[1])
        bg = float(np.median(img[(r > 1.8 * radius_px) & (r < 2.6 * radius_px)]))
        w = np.clip(bg - img, 0, None) * (r < 1.3 * radius_px)
        c = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
    return c


def contrast_at(img: Image, pixel: NDArray[np.float64], radius_px: float) -> float:
    """(background - disk) / background around ``pixel``."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    r = np.hypot(xx - pixel[0], yy - pixel[1])
    disk = img.data[r < radius_px].mean()
    bg = img.data[(r > 1.8 * radius_px) & (r < 3 * radius_px)].mean()
    return float((bg - disk) / bg)


def em_for(spec: Specimen, camera: tuple[int, int] = (2048, 2048), seed: int = 0,
           **overrides: Any) -> SimulatedElectronMicroscope:
    return SimulatedElectronMicroscope.for_tests(spec, VirtualClock(), camera=camera, seed=seed,
                                                 **overrides)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(("rotation_deg", "flipped"), [(0.0, False), (37.0, False), (210.0, True)],
                         ids=["upright", "rotated", "rotated-flipped"])
def test_bead_in_view_frame_lies_where_truth_says(rotation_deg: float, flipped: bool) -> None:
    spec = Specimen.generate(seed=4, em_rotation_deg=rotation_deg, flipped=flipped)
    em = em_for(spec, **NO_CALIBRATION_ERROR)           # stage error on, calibration exact
    b = isolated(spec, np.nonzero(~spec.beads.lost)[0], spec.beads.xy_um)
    q = spec.truth.grid_to_em_stage(spec.beads.xy_um[b])
    em.move_stage(*q)
    img = em.acquire(VIEW)
    radius_px = spec.beads.diameter_um / 2 / img.pixel_size_um
    found = dark_centre(img.data, radius_px)
    # independent of the simulator's geometry: nominal affine moved by the true stage error
    sx, sy, _ = em.true_stage_position()
    rx, ry, _ = em.stage_position()
    expected = img.stage_to_pixel_xy(q - np.array([sx - rx, sy - ry]))
    assert np.hypot(*(found - expected)) < 1.0
    assert np.hypot(*(found - em.true_stage_to_pixel(img, q, -0.1)[0])) < 1.0
    assert np.hypot(*(found - img.stage_to_pixel_xy(q))) > 3.0   # the stage really missed


def test_lost_beads_are_absent_and_contamination_present(spec: Specimen) -> None:
    em = em_for(spec, **EXACT)

    def contrast(xy_grid: NDArray[np.float64], height_um: float, radius_um: float) -> float:
        q = spec.truth.grid_to_em_stage(xy_grid)
        em.move_stage(*q)
        img = em.acquire(VIEW)
        return contrast_at(img, em.true_stage_to_pixel(img, q, height_um)[0],
                           0.6 * radius_um / img.pixel_size_um)

    beads = spec.beads
    kept = isolated(spec, np.nonzero(~beads.lost)[0], beads.xy_um)
    lost = isolated(spec, np.nonzero(beads.lost)[0], beads.xy_um)
    cont = spec.contamination
    big = np.nonzero((cont.diameter_um > 0.3) & (cont.contrast > 0.6))[0]
    dirt = isolated(spec, big, cont.xy_um)
    seen = (contrast(beads.xy_um[kept], -0.1, 0.1), contrast(beads.xy_um[lost], -0.1, 0.1),
            contrast(cont.xy_um[dirt], 0.05, cont.diameter_um[dirt] / 2))
    print(f"contrast: bead {seen[0]:.3f}, lost bead {seen[1]:.3f}, contamination {seen[2]:.3f}")
    assert seen[0] > 0.15
    assert abs(seen[1]) < 0.03
    assert seen[2] > 0.15


def test_atlas_frame_shows_bars_dark_broken_squares_bright_thick_ice_dark(spec: Specimen) -> None:
    em = em_for(spec, camera=(1024, 1024), **EXACT)   # SEARCH 200x bin 4: 256 px of 218 nm
    em.move_stage(0.0, 0.0)

    def value_at(grid_xy: tuple[float, float]) -> float:
        q = spec.truth.grid_to_em_stage(np.array(grid_xy))
        em.move_stage(*q)
        img = em.acquire(SEARCH)
        x, y = np.rint(em.true_stage_to_pixel(img, q)[0]).astype(int)
        return float(img.data[y - 2:y + 3, x - 2:x + 3].mean())

    def square(state: SquareState) -> tuple[float, float]:
        s = next(s for s in spec.squares if s.state == state and not s.partial
                 and not s.cell_ids and s != spec.square(0, 0))
        return s.centre_um

    ok = value_at(square(SquareState.OK))
    cx, cy = square(SquareState.OK)
    bar = value_at((cx + spec.config.pitch_um / 2, cy))
    broken = value_at(square(SquareState.BROKEN))
    thick = value_at(square(SquareState.THICK_ICE))
    print(f"atlas: ok {ok:.0f}, bar {bar:.0f}, broken {broken:.0f}, thick {thick:.0f}")
    assert bar < 0.02 * ok
    assert broken > 1.05 * ok
    assert thick < 0.8 * ok


def test_same_seed_same_image_different_seed_different(spec: Specimen) -> None:
    sq = next(s for s in spec.squares if s.state == SquareState.OK and s.i == 3)
    q = spec.truth.grid_to_em_stage(np.array(sq.centre_um) + 10.0)

    def frame(seed: int) -> NDArray[Any]:
        em = em_for(spec, camera=(1024, 1024), seed=seed)
        em.move_stage(*q)
        return em.acquire(VIEW).data

    a, b, c = frame(1), frame(1), frame(2)
    assert a.dtype == np.uint16 and a.mean() > 100
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_viruses_visible_at_39000x_but_not_in_4700x_maps(spec: Specimen) -> None:
    em = em_for(spec, **EXACT)
    v = next(k for k in range(len(spec.viruses.height_um))
             if np.sort(np.hypot(*(_object_points(spec) - spec.viruses.frozen_um[k]).T))[1] > 0.5)
    xy, h = spec.viruses.frozen_um[v], float(spec.viruses.height_um[v])
    q = spec.truth.grid_to_em_stage(xy)
    z = float(spec.truth.em_height.height(q)) + h        # eucentric on the virus
    em.move_stage(q[0], q[1], z)
    radius_um = em.config.optics.virus_diameter_um / 2

    def ring_scores(img: Image) -> tuple[float, NDArray[np.float64]]:
        """Matched ring statistic at the virus and at 40 places without one."""
        px = img.pixel_size_um
        data = img.data.astype(float)
        # the membrane band, at least a pixel wide; background just outside, >= 3 px wide
        ring_lo, ring_hi = radius_um - max(0.006, px), radius_um + max(0.0015, px / 2)
        out_lo, out_hi = radius_um + max(0.006, 1.5 * px), radius_um + max(0.03, 4.5 * px)
        half = math.ceil(out_hi / px) + 1
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]

        def score(c: NDArray[np.float64]) -> float:
            ix, iy = round(c[0]), round(c[1])
            win = data[iy - half:iy + half + 1, ix - half:ix + half + 1]
            r = np.hypot(xx + ix - c[0], yy + iy - c[1]) * px
            ring = win[(r > ring_lo) & (r <= ring_hi)]
            out = win[(r > out_lo) & (r < out_hi)]
            return float((out.mean() - ring.mean()) / (out.std() * math.sqrt(
                1 / len(ring) + 1 / len(out))))

        centre = em.true_stage_to_pixel(img, q, h)[0]
        rng = np.random.default_rng(0)
        far: list[float] = []
        while len(far) < 40:
            c = rng.uniform(half + 1, img.shape[0] - half - 2, size=2)
            if np.hypot(*(c - centre)) > 1.5 * out_hi / px:
                far.append(score(c))
        return score(centre), np.array(far)

    em.set_defocus(-6.0)
    record, record_bg = ring_scores(em.acquire(RECORD))   # 2048 px of 0.28 nm
    view, view_bg = ring_scores(em.acquire(VIEW))         # 256 px of 18.6 nm
    print(f"virus ring z-score: record {record:.1f} (background max "
          f"{np.abs(record_bg).max():.1f}), view {view:.1f} (background max "
          f"{np.abs(view_bg).max():.1f})")
    assert record > 6 and record > 2 * np.abs(record_bg).max()
    assert abs(view) < max(3.0, np.abs(view_bg).max())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("values", "field"), [
    ({"magnifications": [{"index": 1, "magnification": 200, "pixel_size_um": -0.05}]},
     "em.magnifications.0.pixel_size_um"),
    ({"low_dose": {"veiw": {"mag_index": 16, "exposure_s": 1.0}}}, "em.low_dose.veiw"),
    ({"low_dose": {"view": {"mag_index": 99, "exposure_s": 1.0}}}, "em.low_dose.view.mag_index"),
    ({"camera_shape": (0, 512)}, "em.camera_shape.0"),
    ({"stage": {"repeatability_rms_um": -1.0}}, "em.stage.repeatability_rms_um"),
    ({"stage": {"limits_xy_um": -5.0}}, "em.stage.limits_xy_um"),
    ({"exposure": 1.0}, "em.exposure"),
], ids=["negative-pixel-size", "unknown-area", "mag-not-in-table", "camera", "repeatability",
        "travel", "unknown-key"])
def test_invalid_configuration_names_the_field(spec: Specimen, values: dict[str, Any],
                                               field: str) -> None:
    with pytest.raises(ConfigError) as err:
        SimulatedElectronMicroscope(spec, VirtualClock(), values)
    assert err.value.field == field


@pytest.mark.parametrize(("action", "setting"), [
    (lambda em: em.set_mag_index(999), "em.magnifications"),
    (lambda em: em.move_stage(1800.0, 0.0), "em.stage.limits_xy_um"),
    (lambda em: em.move_stage(0.0, -1601.0), "em.stage.limits_xy_um"),
    (lambda em: em.move_stage(0.0, 0.0, 150.0), "em.stage.limits_z_um"),
    (lambda em: em.tilt_to(72.0), "em.stage.tilt_limit_deg"),
], ids=["magnification", "x-travel", "y-travel", "z-travel", "tilt"])
def test_refused_requests_name_the_setting_and_move_nothing(spec: Specimen, action: Any,
                                                            setting: str) -> None:
    em = em_for(spec, camera=(256, 256))
    em.move_stage(10.0, 20.0)
    before = (em.stage_position(), em.true_stage_position(), em.tilt(), em.mag_index(),
              em.clock.now())
    with pytest.raises(LimitViolation, match=setting.replace(".", r"\.")):
        action(em)
    after = (em.stage_position(), em.true_stage_position(), em.tilt(), em.mag_index(),
             em.clock.now())
    assert after == before


def test_abort_stops_the_next_move(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256))
    em.abort()
    with pytest.raises(Aborted):
        em.move_stage(100.0, 0.0)
    assert em.stage_position() == (0.0, 0.0, 0.0)
    em.move_stage(100.0, 0.0)
    assert em.stage_position()[0] == 100.0


# --------------------------------------------------------------------------- stage


def test_stage_repeatability_is_about_one_micrometre_rms(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256), stage={"backlash_um": 0.0})
    rng = np.random.default_rng(3)
    errors = []
    for x, y in rng.uniform(-1000, 1000, size=(400, 2)):
        em.move_stage(float(x), float(y))
        reported = np.array(em.stage_position()[:2])
        assert np.allclose(reported, [x, y], atol=1e-3)           # encoder = command
        errors.append(np.array(em.true_stage_position()[:2]) - reported)
    e = np.array(errors)
    rms = math.sqrt(float((e ** 2).sum(axis=1).mean()))
    assert 0.9 < rms < 1.1
    assert np.abs(e.mean(axis=0)).max() < 0.15


def test_backlash_depends_on_the_approach_direction(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256), stage={**EXACT["stage"], "backlash_um": 0.6})
    em.move_stage(0.0, 0.0)
    em.move_stage(100.0, 50.0)                       # from below in x and y
    from_below = np.array(em.true_stage_position()[:2])
    em.move_stage(200.0, 150.0)
    em.move_stage(100.0, 50.0)                       # from above
    from_above = np.array(em.true_stage_position()[:2])
    assert from_below == pytest.approx([99.7, 49.7])
    assert from_above == pytest.approx([100.3, 50.3])
    em.move_stage(0.0, 0.0)
    em.move_stage(100.0, 50.0)
    assert np.array(em.true_stage_position()[:2]) == pytest.approx(from_below)


def test_tilt_shifts_by_eucentric_error_times_sine(spec: Specimen) -> None:
    em = em_for(spec, **EXACT)
    b = isolated(spec, np.nonzero(~spec.beads.lost)[0], spec.beads.xy_um)
    q = spec.truth.grid_to_em_stage(spec.beads.xy_um[b])
    bead_z = float(spec.truth.em_height.height(q)) - 0.1
    dz = 1.5
    em.move_stage(q[0], q[1], bead_z - dz)           # bead 1.5 um above the tilt axis
    radius_px = 0.1 / em.magnification(mag_index_of(4700)).pixel_size_um / 8
    positions = {}
    for tilt in (0.0, 30.0, -30.0):
        em.tilt_to(tilt)
        img = em.acquire(VIEW)
        positions[tilt] = img.pixel_to_stage_xy(dark_centre(img.data, radius_px))
    px = img.pixel_size_um
    # tilt axis along stage x: the shift is dz * sin(tilt) along stage y
    for tilt in (30.0, -30.0):
        shift = positions[tilt] - positions[0.0]
        expected = np.array([0.0, dz * math.sin(math.radians(tilt))])
        assert np.hypot(*(shift - expected)) < 1.0 * px


def test_tilt_foreshortens_across_the_axis_by_cosine(spec: Specimen) -> None:
    em = em_for(spec, **EXACT)
    b = isolated(spec, np.nonzero(~spec.beads.lost)[0], spec.beads.xy_um)
    q = spec.truth.grid_to_em_stage(spec.beads.xy_um[b])
    bead_z = float(spec.truth.em_height.height(q)) - 0.1
    offset = np.array([0.8, 1.6])                     # bead off-centre, eucentric height
    em.move_stage(q[0] - offset[0], q[1] - offset[1], bead_z)
    radius_px = 0.1 / em.magnification(mag_index_of(4700)).pixel_size_um / 8
    seen = {}
    for tilt in (0.0, 60.0):
        em.tilt_to(tilt)
        img = em.acquire(VIEW)
        seen[tilt] = img.pixel_to_stage_xy(dark_centre(img.data, radius_px)) - \
            np.array(em.stage_position()[:2])
    assert seen[0.0] == pytest.approx(offset, abs=0.02)
    assert seen[60.0][0] == pytest.approx(offset[0], abs=0.02)       # along the axis
    assert seen[60.0][1] == pytest.approx(offset[1] * 0.5, abs=0.02)  # across: cos 60


# --------------------------------------------------------------------------- dose, time


def test_dose_accumulates_per_place_and_in_total(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256), **EXACT)
    target = em.add_nav_point(300.0, -150.0)
    z = float(spec.truth.em_height.height(np.array([300.0, -150.0])))
    em.move_stage(300.0, -150.0, z)                   # eucentric: the beam stays on target
    record = em.low_dose[RECORD]
    per_image = record.dose_rate_e_per_a2_s * record.exposure_s
    for tilt in np.arange(-60.0, 60.1, 3.0):
        em.tilt_to(float(tilt))
        assert em.acquire(RECORD).dose_e_per_a2 == pytest.approx(per_image)
    assert em.dose_at_item(target.item_id) == pytest.approx(41 * per_image)
    assert 95 < em.dose_at_item(target.item_id) < 105              # the AutoCLEM budget
    em.tilt_to(0.0)
    focus = em.acquire(FOCUS)                                     # 2 um along the axis
    assert em.dose_at_item(target.item_id) == pytest.approx(41 * per_image)
    assert em.dose.at_stage(np.array([302.0, -150.0])) == pytest.approx(focus.dose_e_per_a2)
    assert em.dose.total_e_per_a2 == pytest.approx(41 * per_image + focus.dose_e_per_a2)
    grid = spec.truth.em_stage_to_grid(np.array([300.0, -150.0]))
    assert em.dose.at_grid(grid) == pytest.approx(41 * per_image)


def test_timing_advances_the_clock_as_modelled(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256), **EXACT)
    t, clock = em.config.timing, em.clock
    assert isinstance(clock, VirtualClock)

    def took(action: Any) -> float:
        t0 = clock.now()
        action()
        return clock.now() - t0

    assert took(lambda: em.move_stage(300.0, -120.0)) == pytest.approx(
        t.stage_settle_s + 300.0 / t.stage_speed_um_s)
    assert took(lambda: em.move_stage(300.0, -120.0)) == 0.0
    assert took(lambda: em.tilt_to(30.0)) == pytest.approx(t.tilt_settle_s + 30 / t.tilt_speed_deg_s)
    assert took(lambda: em.set_mag_index(mag_index_of(200))) == pytest.approx(
        t.mag_change_s + t.lm_sa_switch_s)
    readout = t.readout_base_s + t.readout_s_per_mpix * 256 * 256 / 1e6
    rec = em.low_dose[RECORD]
    assert took(lambda: em.acquire(RECORD)) == pytest.approx(
        t.mag_change_s + t.lm_sa_switch_s + rec.exposure_s + readout)
    assert took(lambda: em.acquire(RECORD)) == pytest.approx(rec.exposure_s + readout)


# --------------------------------------------------------------------------- navigator


@pytest.mark.parametrize("view_changed", [False, True], ids=["map-in-view", "view-rebinned"])
def test_realign_to_item_removes_the_stage_error(spec: Specimen, view_changed: bool) -> None:
    em = em_for(spec)                                 # 1 um rms stage error, backlash

    def miss_um(img: Image, truth: NDArray[np.float64]) -> float:
        """How far the target really is from the centre of the field (stage at target)."""
        centre = (np.array(img.shape[::-1]) - 1) / 2
        return float(np.hypot(*(em.true_stage_to_pixel(img, truth)[0] - centre))
                     * img.pixel_size_um)

    errors_before, errors_after = [], []
    for k in range(3):
        b = isolated(spec, np.nonzero(~spec.beads.lost)[0], spec.beads.xy_um, skip=k)
        q = spec.truth.grid_to_em_stage(spec.beads.xy_um[b])
        em.move_stage(*q)
        the_map = em.acquire(VIEW)
        item = em.add_nav_map(the_map)
        # a target drawn on the map 0.75 um from its centre, and where it really is
        target = the_map.pixel_to_stage_xy([the_map.shape[1] / 2 + 40, the_map.shape[0] / 2])
        truth = em.true_pixel_to_stage(the_map) @ np.append(
            the_map.stage_to_pixel_xy(target), 1.0)
        point = em.add_nav_point_on_map(item.item_id, *target)
        if view_changed:         # the map's conditions are no longer View's: realign repeats them
            em.low_dose[VIEW] = replace(em.low_dose[VIEW], binning=4)
        em.move_stage(q[0] + 60, q[1] - 40)
        em.move_stage(*target)
        errors_before.append(miss_um(em.acquire(VIEW), truth))
        em.move_stage(q[0] - 50, q[1] + 30)
        shift = em.realign_to_item(point.item_id)
        assert em.image_shift() == pytest.approx(shift)
        assert em.stage_position()[:2] == pytest.approx(tuple(target), abs=1e-3)
        errors_after.append(miss_um(em.acquire(VIEW), truth))
        if view_changed:
            em.low_dose[VIEW] = replace(em.low_dose[VIEW], binning=8)
    print(f"realign: before {np.round(errors_before, 3)} um, after {np.round(errors_after, 3)} um")
    assert max(errors_after) < 0.06                   # ~3 pixels of 18.6 nm
    assert max(errors_after) < 0.2 * float(np.mean(errors_before))
    assert [i.item_id for i in em.nav_items()] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- status, metadata


def test_vacuum_fault_closes_the_valves_and_frames_go_dark(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256), faults={"vacuum_fault_after_s": 100.0})
    assert em.status().ready and em.status().high_voltage_kv == 300.0
    assert em.acquire(VIEW).data.mean() > 100
    assert isinstance(em.clock, VirtualClock)
    em.clock.advance(100.0)
    status = em.status()
    assert not status.vacuum_ok and not status.column_valve_open and not status.ready
    dark = em.acquire(VIEW)
    assert dark.data.max() == 0 and dark.dose_e_per_a2 == 0 and not dark.extra["beam_on"]


def test_stage_fault_after_n_moves_and_dewar_fill(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256),
                faults={"stage_fault_after_moves": 2, "dewar_fill_period_s": 3600.0,
                        "dewar_fill_duration_s": 600.0})
    em.move_stage(10.0, 0.0)
    em.move_stage(20.0, 0.0)
    with pytest.raises(HardwareFault, match="stage_fault_after_moves"):
        em.move_stage(30.0, 0.0)
    assert not em.status().dewar_filling
    assert isinstance(em.clock, VirtualClock)
    em.clock.advance(3100.0)
    assert em.status().dewar_filling and not em.status().ready


def test_metadata_and_magnification_table(spec: Specimen) -> None:
    em = em_for(spec, camera=(1024, 1024))
    assert em.magnification(mag_index_of(39000)).pixel_size_um == pytest.approx(0.00028)
    assert em.magnification(mag_index_of(4700)).pixel_size_um == pytest.approx(0.00232, rel=0.01)
    assert em.magnification(mag_index_of(200)).pixel_size_um == pytest.approx(0.055, rel=0.02)
    lm, sa = em.magnification(mag_index_of(200)), em.magnification(mag_index_of(4700))
    assert abs(lm.rotation_deg - sa.rotation_deg) > 45
    em.move_stage(50.0, 60.0)
    em.set_image_shift(0.5, -0.25)
    img = em.acquire(VIEW)
    assert img.shape == (128, 128) and img.binning == 8 and img.mag_index == mag_index_of(4700)
    assert img.pixel_size_um == pytest.approx(sa.pixel_size_um * 8)
    assert img.defocus_um == pytest.approx(em.defocus() + em.low_dose[VIEW].defocus_offset_um)
    assert LowDoseArea(img.low_dose_area) == VIEW and img.instrument == "em"
    assert img.pixel_to_stage_xy([63.5, 63.5]) == pytest.approx([50.5, 59.75])
    assert img.extra["frame_id"] == 1
    tiles = em.montage((50.0, 60.0), (2, 2), overlap=0.2, area=VIEW)
    assert [t.index["tile"] for t in tiles] == [0, 1, 2, 3]


def test_config_replace_revalidates() -> None:
    cfg = ElectronSimConfig()
    small = cfg.replace(camera_shape=(256, 256), stage={"backlash_um": 0.0})
    assert small.camera_shape == (256, 256) and small.stage.backlash_um == 0.0
    assert small.stage.repeatability_rms_um == cfg.stage.repeatability_rms_um
    with pytest.raises(ConfigError, match="em.stage.tilt_limit_deg"):
        cfg.replace(stage={"tilt_limit_deg": 95.0})


@pytest.mark.parametrize("tilt_deg", [0.0, 35.0, -60.0])
def test_film_and_objects_project_consistently_at_tilt(spec: Specimen, tilt_deg: float) -> None:
    """The film is rendered through the inverse projection, objects through the forward one;
    both must agree, or beads would drift off their holes as the stage tilts."""
    em = em_for(spec, camera=(256, 256), stage={"tilt_axis_deg": 12.0})
    em.move_stage(200.0, -300.0, 3.0)
    flat = em.true_pixel_to_stage(em.acquire(VIEW))
    em.tilt_to(tilt_deg)
    img = em.acquire(VIEW)
    geom = em.frame_record(img).geometry
    pixels = np.array([[0.0, 0.0], [255.0, 0.0], [100.0, 200.0], [17.5, 250.25]])
    tilted = em.true_pixel_to_stage(img)
    stage = tilted @ np.vstack([pixels.T, np.ones(4)])
    assert geom.stage_to_pixel(stage.T) == pytest.approx(pixels, abs=1e-6)
    # a pixel covers 1 / cos(tilt) more film: the film is stretched across the axis
    stretch = np.linalg.det(tilted[:, :2]) / np.linalg.det(flat[:, :2])
    assert stretch == pytest.approx(1 / math.cos(math.radians(tilt_deg)), rel=2e-3)


def test_closed_microscope_refuses_to_move_or_acquire(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256))
    with em:
        em.move_stage(5.0, 5.0)
    with pytest.raises(InvalidState):
        em.move_stage(10.0, 10.0)
    with pytest.raises(InvalidState):
        em.acquire(VIEW)


# --------------------------------------------------------------------------- autofocus

#: Focus at 11,500x binned 4 on a 1024 camera: a 3.9 um field beside the target on the axis.
AF_LOW_DOSE: dict[str, Any] = {
    "record": {"mag_index": mag_index_of(39000), "exposure_s": 1.0, "binning": 4},
    "focus": {"mag_index": mag_index_of(11500), "exposure_s": 0.5, "binning": 4,
              "dose_rate_e_per_a2_s": 2.0, "axis_offset_um": 2.0},
}


def _film_place(spec: Specimen, em: SimulatedElectronMicroscope) -> tuple[float, float]:
    """A stage position on good film whose focus area sees a hole edge (found by trying)."""
    sq = next(s for s in spec.squares if s.state == SquareState.OK and not s.partial
              and not s.cell_ids and abs(s.i) + abs(s.j) > 0)
    x0, y0 = spec.truth.grid_to_em_stage(np.asarray(sq.centre_um, float))
    for k in range(12):
        x, y = float(x0) + 0.7 * k, float(y0) + 0.3 * k
        em.move_stage(x, y)
        try:
            em.autofocus(apply=False)
            return x, y
        except AutofocusFailed:
            continue
    raise AssertionError("no film with a hole edge found")


def test_autofocus_measures_the_height_error_at_the_focus_area(spec: Specimen) -> None:
    em = em_for(spec, camera=(1024, 1024), low_dose=AF_LOW_DOSE, **EXACT)
    x, y = _film_place(spec, em)
    em.move_stage(x, y, 0.0)
    em.set_defocus(-5.0)
    tx, ty, tz = em.true_stage_position()
    # the focus area is 2 um along the tilt axis (stage x here): the film there
    dz = float(spec.truth.em_height.height(np.array([tx + 2.0, ty]))) - tz
    errors = [em.autofocus(apply=False) for _ in range(8)]
    assert np.mean(errors) == pytest.approx(-dz, abs=0.08)      # -height: more underfocus
    assert 0.02 < float(np.std(errors)) < 0.15                    # SerialEM's 50-100 nm
    em.move_stage(x, y, 2.0)                                      # tilt axis 2 um higher
    assert em.autofocus(apply=False) == pytest.approx(-dz + 2.0, abs=0.3)
    assert em.defocus() == -5.0


def test_autofocus_spends_time_and_dose_at_the_focus_area_only(spec: Specimen) -> None:
    em = em_for(spec, camera=(1024, 1024), low_dose=AF_LOW_DOSE, **EXACT)
    x, y = _film_place(spec, em)
    em.set_mag_index(AF_LOW_DOSE["focus"]["mag_index"])
    clock = em.clock
    t0, d0 = clock.now(), len(em.dose.exposures)
    target0 = float(em.dose.at_stage(np.array([x, y])))
    beside0 = float(em.dose.at_stage(np.array([x + 2.0, y])))
    em.autofocus(apply=False)
    t, m = em.config.timing, em.config.autofocus
    readout = t.readout_base_s + t.readout_s_per_mpix * 1024 * 1024 / 1e6
    assert clock.now() - t0 == pytest.approx(m.shots * (m.beam_tilt_settle_s + 0.5 + readout))
    new = em.dose.exposures[d0:]
    assert len(new) == m.shots and all(e.area == "F" for e in new)
    assert sum(e.dose_e_per_a2 for e in new) == pytest.approx(m.shots * 1.0)
    assert float(em.dose.at_stage(np.array([x, y]))) == target0   # the target got nothing
    assert float(em.dose.at_stage(np.array([x + 2.0, y]))) - beside0 == pytest.approx(
        m.shots * 1.0)


def _hole_centre(spec: Specimen, near: tuple[float, float]) -> NDArray[np.float64]:
    """Grid-frame centre of the film hole (R2/2 lattice) nearest to ``near``."""
    t = math.radians(spec.hole_lattice_deg)
    u_dir, v_dir = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    d = np.asarray(near, float) - np.asarray(spec.hole_origin_um, float)
    p = spec.config.hole_pitch_um
    centre: NDArray[np.float64] = np.asarray(spec.hole_origin_um, float) + p * (
        round(float(d @ u_dir) / p) * u_dir + round(float(d @ v_dir) / p) * v_dir)
    return centre


@pytest.mark.parametrize("where", ["grid-bar", "torn-film", "flat-ice-in-a-hole"])
def test_autofocus_fails_where_there_is_nothing_to_correlate(spec: Specimen,
                                                             where: str) -> None:
    low_dose = {**AF_LOW_DOSE, "focus": {**AF_LOW_DOSE["focus"], "axis_offset_um": 0.0}}
    if where == "flat-ice-in-a-hole":     # a 60 nm field inside a 2 um hole
        low_dose["focus"] = {**low_dose["focus"], "mag_index": mag_index_of(105000),
                             "binning": 1}
    em = em_for(spec, camera=(256, 256), low_dose=low_dose, **EXACT)
    pitch = spec.config.pitch_um
    if where == "grid-bar":
        xy = spec.truth.grid_to_em_stage(np.array([pitch / 2, 0.0]))
    elif where == "torn-film":
        sq = next(s for s in spec.squares if s.state == SquareState.BROKEN and not s.partial)
        xy = spec.truth.grid_to_em_stage(np.asarray(sq.centre_um, float))
    else:
        sq = next(s for s in spec.squares if s.state == SquareState.OK and not s.partial
                  and not s.cell_ids and abs(s.i) + abs(s.j) > 0)
        xy = spec.truth.grid_to_em_stage(_hole_centre(spec, sq.centre_um))
    em.move_stage(float(xy[0]), float(xy[1]))
    em.set_defocus(-3.0)
    with pytest.raises(AutofocusFailed, match="autofocus failed"):
        em.autofocus()
    assert em.defocus() == -3.0


def test_defocus_at_tilt_follows_the_height_of_the_point_under_the_beam(spec: Specimen) -> None:
    em = em_for(spec, camera=(256, 256), **EXACT)
    x, y = _square_centre_em(spec)
    em.move_stage(x, y, 0.0)
    em.set_defocus(-4.0)
    em.set_image_shift(0.0, 2.0)            # 2 um across the tilt axis (stage x)
    tx, ty, z = em.true_stage_position()
    dz = float(spec.truth.em_height.height(np.array([tx, ty]))) - z
    for tilt in (0.0, 30.0, -45.0):
        em.tilt_to(tilt)
        t = math.radians(tilt)
        record = em.frame_record(em.acquire(RECORD))
        # the beam 2 um beside the axis meets the film, tilted about a line dz below it,
        # dz / cos t - 2 tan t above the axis (a flat film: its 1e-3 slope is in the tolerance)
        assert record.defocus_um == pytest.approx(-4.0 - (dz / math.cos(t) - 2.0 * math.tan(t)),
                                                  abs=0.03)


def _square_centre_em(spec: Specimen) -> tuple[float, float]:
    sq = next(s for s in spec.squares if s.state == SquareState.OK and not s.partial
              and not s.cell_ids and abs(s.i) + abs(s.j) > 0)
    x, y = spec.truth.grid_to_em_stage(np.asarray(sq.centre_um, float))
    return float(x), float(y)
