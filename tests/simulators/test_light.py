"""The simulated light microscope against the specimen's ground truth.

Frames are small (64-256 px) so the file runs in seconds; geometry is checked against
``spec.truth`` and the simulator's record of each frame's true pose, never against the
simulator's own nominal metadata alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import useq
from numpy.typing import NDArray
from scipy.optimize import curve_fit

from drivers.clock import VirtualClock
from drivers.errors import ConfigError, LimitViolation
from drivers.imaging import apply_affine, invert_affine
from simulators.light import SimulatedLightMicroscope
from simulators.light_config import LightSimConfig
from simulators.specimen import Specimen, SquareState, VirusMotion

BEAD_HEIGHT_UM = -0.1


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=7)


def mda(**fields: Any) -> useq.MDASequence:
    """A validated useq sequence from plain values, as a config file would give them."""
    return useq.MDASequence.model_validate(fields)


def scope(spec: Specimen, shape: tuple[int, int] = (128, 128), *, seed: int = 0,
          exact: bool = True, **config: Any) -> SimulatedLightMicroscope:
    return SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), shape=shape,
                                                      seed=seed, exact_stage=exact, **config)


@pytest.fixture
def lm(spec: Specimen) -> Iterator[SimulatedLightMicroscope]:
    m = scope(spec)
    yield m
    m.close()


def isolated_bead(spec: Specimen, min_gap_um: float = 4.0, skip: int = 0) -> int:
    """A bead in a whole OK square with no other bead within ``min_gap_um``."""
    xy = spec.beads.xy_um
    found = 0
    for sq in spec.squares:
        if sq.partial or sq.state != SquareState.OK:
            continue
        for b in sq.bead_ids:
            d = np.hypot(*(xy - xy[b]).T)
            if np.sort(d)[1] > min_gap_um:
                if found == skip:
                    return int(b)
                found += 1
    raise AssertionError("no isolated bead")


def spot_centre(img: NDArray[Any], near: tuple[float, float] | None = None,
                search_px: int = 12) -> tuple[float, float]:
    """Sub-pixel (x, y) of the brightest spot by a 2D Gaussian fit (no bias towards ``near``:
    the window is centred on the brightest pixel, not on the guess)."""
    a = img.astype(float)
    if near is not None:
        x0, y0 = int(round(near[0])), int(round(near[1]))
        r0, c0 = max(0, y0 - search_px), max(0, x0 - search_px)
        sub = a[r0:y0 + search_px + 1, c0:x0 + search_px + 1]
        py, px = np.unravel_index(np.argmax(sub), sub.shape)
        py, px = py + r0, px + c0
    else:
        py, px = np.unravel_index(np.argmax(a), a.shape)
    r = 5
    win = a[py - r:py + r + 1, px - r:px + r + 1]
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]

    def g(p: NDArray[Any], amp: float, x: float, y: float, s: float, bg: float) -> NDArray[Any]:
        return np.asarray(amp * np.exp(-((p[0] - x) ** 2 + (p[1] - y) ** 2) / (2 * s * s)) + bg)

    popt, _ = curve_fit(g, np.vstack([xx.ravel(), yy.ravel()]), win.ravel(),
                        p0=[win.max() - np.median(a), 0, 0, 1.5, np.median(a)])
    return float(px + popt[1]), float(py + popt[2])


def truth_pixel(m: SimulatedLightMicroscope, img: Any, grid_xy: NDArray[Any]) -> NDArray[Any]:
    lm_xy = m.specimen.truth.grid_to_lm_stage(grid_xy)
    return np.asarray(apply_affine(invert_affine(m.true_pixel_to_stage(img)), lm_xy))


def go_to(m: SimulatedLightMicroscope, grid_xy: NDArray[Any], objective: str, *,
          height_um: float = 0.0, dz_um: float = 0.0,
          offset_um: tuple[float, float] = (0.0, 0.0)) -> NDArray[Any]:
    m.set_objective(objective)
    lm_xy = m.specimen.truth.grid_to_lm_stage(np.asarray(grid_xy, dtype=float))
    m.move_xy(lm_xy[0] + offset_um[0], lm_xy[1] + offset_um[1])
    m.move_z(m.focus_z_for((float(lm_xy[0]), float(lm_xy[1])), height_um) + dz_um)
    return lm_xy


# -- configuration and limits ----------------------------------------------------------------


@pytest.mark.parametrize("values, field", [
    ({"objectives": {"100x": {"pixel_size_um": -0.065}}}, "lm.objectives.100x.pixel_size_um"),
    ({"channels": {"GFP": {"contrast": "gfp", "exposure_s": 0.1, "emission_nm": 510,
                           "photons_per_s": 1e4}}}, "lm.channels.GFP.contrast"),
    ({"channels": {"405": {"exposure_s": 0}}}, "lm.channels.405.exposure_s"),
    ({"channels": {"488": {"excitation_nm": None}}}, "lm.channels.488.excitation_nm"),
    ({"start_objective": "60x"}, "lm.start_objective"),
    ({"start_channel": "GFP"}, "lm.start_channel"),
    ({"objectives": {"20x": {"numerical_aperture": 1.3}}}, "lm.objectives.20x.numerical_aperture"),
    ({"camera": {"shape": (2, 2)}}, "lm.camera.shape"),
    ({"stage": {"xy_limit_um": -1}}, "lm.stage.xy_limit_um"),
    ({"stage": {"repeatability": 1}}, "lm.stage.repeatability"),
], ids=["negative-pixel", "unknown-contrast", "zero-exposure", "fluor-without-excitation",
        "objective-not-in-table", "channel-not-in-table", "na-above-immersion", "tiny-camera",
        "negative-travel", "misspelt-key"])
def test_config_errors_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        LightSimConfig.build(**values)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_unknown_names_refused_and_nothing_changes(lm: SimulatedLightMicroscope) -> None:
    t0 = lm.clock.now()
    with pytest.raises(LimitViolation, match="channel 'GFP'"):
        lm.snap("GFP")
    with pytest.raises(LimitViolation, match="objective '60x'"):
        lm.set_objective("60x")
    assert lm.clock.now() == t0
    assert lm.objective.name == "20x" and lm.channel.name == "BF"


@pytest.mark.parametrize("target", [(5000.1, 0.0), (0.0, -7000.0), (float("nan"), 0.0)])
def test_stage_limits_refused_before_moving(spec: Specimen, target: tuple[float, float]) -> None:
    m = scope(spec, exact=False)
    m.move_xy(100.0, -50.0)
    before = (m.position_xy(), m.true_xy(), m.clock.now())
    with pytest.raises(LimitViolation, match="lm.stage_limits_um"):
        m.move_xy(*target)
    with pytest.raises(LimitViolation, match="lm.z_limits_um"):
        m.move_z(501.0)
    assert (m.position_xy(), m.true_xy(), m.clock.now()) == before
    assert m.position_z() == 0.0


# -- geometry against the truth ----------------------------------------------------------------


@pytest.mark.parametrize("lm_rotation, camera_rotation", [(0.0, 0.7), (37.0, 0.7), (213.0, -2.5)])
@pytest.mark.parametrize("exact", [True, False], ids=["exact-stage", "stage-error"])
def test_bead_lies_where_truth_says(lm_rotation: float, camera_rotation: float,
                                    exact: bool) -> None:
    spec = Specimen.generate(seed=11, lm_rotation_deg=lm_rotation)
    m = scope(spec, exact=exact, objectives={"100x": {"rotation_deg": camera_rotation}})
    b = isolated_bead(spec)
    go_to(m, spec.beads.xy_um[b], "100x", height_um=BEAD_HEIGHT_UM, offset_um=(2.6, -2.1))
    img = m.snap("405")
    want = truth_pixel(m, img, spec.beads.xy_um[b])
    got = spot_centre(img.data)
    assert np.hypot(*(np.array(got) - want)) < 1.0
    # The nominal affine (reported position) is exact only without stage error.
    nominal = img.stage_to_pixel_xy(spec.truth.grid_to_lm_stage(spec.beads.xy_um[b]))
    miss_px = float(np.hypot(*(nominal - want)))
    if exact:
        assert miss_px < 1e-6
        assert np.allclose(img.pixel_to_stage, m.true_pixel_to_stage(img))
    else:
        assert miss_px > 0.5      # 0.7 um rms per axis = ~11 px rms at 100x


def test_stage_error_repeatability_and_backlash(spec: Specimen) -> None:
    m = scope(spec, exact=False, stage={"repeatability_um": 0.5, "backlash_um": 1.0})
    from_left, from_right = [], []
    for _ in range(40):
        m.move_xy(-100.0, 0.0)
        m.move_xy(0.0, 0.0)
        assert m.position_xy() == (0.0, 0.0)     # the encoder reports the commanded target
        from_left.append(m.true_xy())
        m.move_xy(100.0, 0.0)
        m.move_xy(0.0, 0.0)
        from_right.append(m.true_xy())
    left, right = np.array(from_left), np.array(from_right)
    assert np.std(left[:, 1]) == pytest.approx(0.5, rel=0.35)
    assert np.mean(right[:, 0]) - np.mean(left[:, 0]) == pytest.approx(1.0, abs=0.35)


def test_bars_visible_in_bf_at_20x_where_truth_says(spec: Specimen) -> None:
    m = scope(spec, (192, 192))
    corner = np.array([spec.config.pitch_um / 2, spec.config.pitch_um / 2]) + (9.0, 5.0)
    go_to(m, corner, "20x")
    img = m.snap("BF")
    a = m.true_pixel_to_grid(img)
    yy, xx = np.mgrid[0:192, 0:192].astype(np.float32)
    gx = (a[0, 0] * xx + a[0, 1] * yy + a[0, 2]).astype(np.float32)
    gy = (a[1, 0] * xx + a[1, 1] * yy + a[1, 2]).astype(np.float32)
    metal = spec.metal(gx, gy, 0.325)
    from scipy.ndimage import binary_erosion
    bar = binary_erosion(metal > 0.99, iterations=3)
    open_ = binary_erosion(metal < 0.01, iterations=3)
    assert bar.sum() > 2000 and open_.sum() > 2000
    data = img.data.astype(float) - m.config.camera.offset_adu
    glass = np.median(data[open_])
    assert np.percentile(data[bar], 99) < 0.1 * glass
    assert np.percentile(data[open_], 1) > 0.7 * glass


# -- optics ------------------------------------------------------------------------------------


def _moments(e: NDArray[Any], centre: NDArray[Any], r: int) -> tuple[float, float, float]:
    x0, y0 = int(round(centre[0])), int(round(centre[1]))
    win = e[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1].astype(float)
    win = win - np.median(e)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    xx, yy = xx + x0 - centre[0], yy + y0 - centre[1]
    total = win.sum()
    width = np.sqrt((win * (xx ** 2 + yy ** 2)).sum() / total / 2)
    return float(win.max()), float(width), float(total)


def test_defocus_blur_grows_with_distance_from_focus(spec: Specimen) -> None:
    m = scope(spec, (128, 128), channels={"405": {"background_per_um2_s": 0.0}})
    b = isolated_bead(spec, min_gap_um=5.0)
    lm_xy = go_to(m, spec.beads.xy_um[b], "100x", height_um=BEAD_HEIGHT_UM)
    focus = m.position_z()
    peaks, widths, totals = [], [], []
    for dz in (0.0, 0.5, 1.0, 2.0, -2.0):
        m.move_z(focus + dz)
        view = m.current_view()
        e = m.render_expected("405", 0.1, view)
        centre = apply_affine(invert_affine(view.pixel_to_stage), lm_xy)
        p, w, t = _moments(e, centre, 40)
        peaks.append(p)
        widths.append(w)
        totals.append(t)
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]
    assert widths[0] < widths[1] < widths[2] < widths[3]
    assert widths[3] == pytest.approx(widths[4], rel=0.05)          # symmetric about focus
    assert widths[0] < 1.6                                           # ~1 px at 100x, 450 nm
    assert totals == pytest.approx([totals[0]] * 5, rel=0.1)         # widefield keeps photons


# Start offsets off the 1 um scan grid, so the scan never samples the true focus itself.
@pytest.mark.parametrize("dz_um", [4.37, -3.71])
def test_autofocus_on_bars_at_20x(spec: Specimen, dz_um: float) -> None:
    m = scope(spec, (192, 192), exact=False)
    corner = np.array([spec.config.pitch_um / 2, -spec.config.pitch_um / 2]) + (20.0, -12.0)
    go_to(m, corner, "20x", dz_um=dz_um)
    best = m.autofocus(range_um=12.0, step_um=1.0)
    assert best == pytest.approx(m.focus_z_for(m.true_xy()), abs=0.5)    # DOF ~1.4 um


@pytest.mark.parametrize("dz_um", [4.37, -3.71])
def test_autofocus_on_beads_at_100x(spec: Specimen, dz_um: float) -> None:
    m = scope(spec, (128, 128), exact=False)
    m.set_channel("405")
    b = isolated_bead(spec)
    go_to(m, spec.beads.xy_um[b], "100x", height_um=BEAD_HEIGHT_UM, dz_um=dz_um)
    best = m.autofocus(range_um=12.0, step_um=1.0)
    want = m.focus_z_for(m.true_xy(), BEAD_HEIGHT_UM)
    assert best == pytest.approx(want, abs=0.5)                           # DOF ~0.6 um


def test_photobleaching_follows_the_light(spec: Specimen) -> None:
    m = scope(spec, (96, 96), channels={"405": {"bleach_tau_s": 1.0}})
    b0, b1 = isolated_bead(spec), isolated_bead(spec, skip=5)
    lm0 = go_to(m, spec.beads.xy_um[b0], "100x", height_um=BEAD_HEIGHT_UM)

    def signal() -> float:
        view = m.current_view()
        e = m.render_expected("405", 0.1, view)
        return _moments(e, apply_affine(invert_affine(view.pixel_to_stage), lm0), 6)[2]

    fresh = signal()
    for _ in range(10):                        # 10 x 0.1 s at 100x = one bleaching time
        m.snap("405")
    assert signal() == pytest.approx(fresh * np.exp(-1.0), rel=0.05)
    m.snap("488")                              # other channels do not bleach the beads
    assert signal() == pytest.approx(fresh * np.exp(-1.0), rel=0.05)
    # A bead outside every field of view is untouched.
    lm1 = go_to(m, spec.beads.xy_um[b1], "100x", height_um=BEAD_HEIGHT_UM)
    view = m.current_view()
    e = m.render_expected("405", 0.1, view)
    _, _, t1 = _moments(e, apply_affine(invert_affine(view.pixel_to_stage), lm1), 6)
    expected = fresh * spec.beads.brightness[b1] / spec.beads.brightness[b0]
    assert t1 == pytest.approx(expected, rel=0.05)


# -- camera -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exposure_s, read_noise", [(1e-3, 1.6), (2e-5, 1.6), (3e-6, 0.0)])
def test_noise_is_shot_plus_read(spec: Specimen, exposure_s: float, read_noise: float) -> None:
    m = scope(spec, (128, 128), camera={"read_noise_e": read_noise, "e_per_adu": 1.0})
    m.move_xy(4500.0, 4500.0)                  # clear glass, well outside the grid
    cam = m.config.camera
    a = (m.snap("BF", exposure_s).data.astype(float) - cam.offset_adu) * cam.e_per_adu
    b = (m.snap("BF", exposure_s).data.astype(float) - cam.offset_adu) * cam.e_per_adu
    mean = float((a + b).mean() / 2)
    assert mean == pytest.approx(1.2e6 * exposure_s, rel=0.1)      # BF flux x vignetting
    var = float(np.var(a - b) / 2)
    assert var == pytest.approx(mean + read_noise ** 2, rel=0.08)
    if read_noise == 0:                       # exact Poisson: integer counts, P(0) = e^-mean
        assert np.all(a == np.round(a))
        assert np.mean(a == 0) == pytest.approx(np.exp(-mean), rel=0.15)


def test_same_seed_same_images_other_seed_different(spec: Specimen) -> None:
    def run(seed: int) -> list[NDArray[Any]]:
        m = scope(spec, (64, 64), seed=seed, exact=False)
        m.set_objective("100x")
        out = []
        for x in (10.0, 30.0):
            m.move_xy(x, 5.0)
            out += [m.snap("BF").data, m.snap("405").data]
        return out

    first, again, other = run(3), run(3), run(4)
    assert all(np.array_equal(p, q) for p, q in zip(first, again, strict=True))
    assert not any(np.array_equal(p, q) for p, q in zip(first, other, strict=True))


# -- moving specimen ---------------------------------------------------------------------------


def _virus_pair(spec: Specimen, motion: VirusMotion, t1: float,
                moved: tuple[float, float]) -> int:
    p0, p1 = spec.viruses.at(0.0), spec.viruses.at(t1)
    for v in np.nonzero(spec.viruses.motion == motion)[0]:
        step = float(np.hypot(*(p1[v] - p0[v])))
        gap0 = np.sort(np.hypot(*(p0 - p0[v]).T))[1]
        gap1 = np.sort(np.hypot(*(p1 - p1[v]).T))[1]
        if moved[0] <= step <= moved[1] and min(gap0, gap1) > 3.0:
            return int(v)
    raise AssertionError(f"no isolated {motion.name} virus")


@pytest.mark.parametrize("motion", [VirusMotion.DIRECTED, VirusMotion.DIFFUSING,
                                    VirusMotion.STATIC])
def test_viruses_move_as_truth_says(spec: Specimen, motion: VirusMotion) -> None:
    t1 = 1200.0
    limits = (0.0, 0.0) if motion == VirusMotion.STATIC else (1.0, 5.0)
    v = _virus_pair(spec, motion, t1, limits)
    m = scope(spec, (160, 160))
    mid = (spec.viruses.at(0.0)[v] + spec.viruses.at(t1)[v]) / 2
    go_to(m, mid, "100x", height_um=float(spec.viruses.height_um[v]))
    seq = mda(time_plan={"interval": t1, "loops": 2}, channels=["488"])
    first, second = list(m.run_events(seq))
    for img, t in ((first, 0.0), (second, t1)):
        want = truth_pixel(m, img, spec.viruses.at(t)[v])
        got = spot_centre(img.data, near=(float(want[0]), float(want[1])), search_px=4)
        assert np.hypot(*(np.asarray(got) - want)) < 1.0
    def found(img: Any, t: float) -> NDArray[Any]:
        want = truth_pixel(m, img, spec.viruses.at(t)[v])
        return np.asarray(spot_centre(img.data, (float(want[0]), float(want[1])), 4))

    shift = float(np.hypot(*(found(second, t1) - found(first, 0.0))))
    if motion == VirusMotion.STATIC:
        assert shift < 0.3
    else:
        assert shift > 1.0 / 0.065 * 0.8


def test_lost_beads_gone_after_freezing(spec: Specimen) -> None:
    xy = spec.beads.xy_um
    b = next(int(b) for b in np.nonzero(spec.beads.lost)[0]
             if np.sort(np.hypot(*(xy - xy[b]).T))[1] > 5.0)
    m = scope(spec, (64, 64), channels={"405": {"background_per_um2_s": 0.0}})
    go_to(m, xy[b], "100x", height_um=BEAD_HEIGHT_UM)
    live = m.render_expected("405", 0.1)
    m.clock.sleep_until(spec.config.freeze_time_s + 600.0)   # plunged, now cryo-fLM
    frozen = m.render_expected("405", 0.1)
    assert live.max() > 1000.0 and frozen.max() < 1.0
