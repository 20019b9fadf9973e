"""Bead detection in fLM and EM images, and bead correlation from images end to end."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.correlation.bead_images import correlate_bead_images
from protocols.correlation.beads_em import (
    SPHERE_SIGMA_PER_RADIUS,
    EmBeadConfig,
    _score,
    _valid_mask,
    black_is_clip,
    black_level,
    density_of,
    detect_em_beads,
)
from protocols.correlation.beads_lm import LmBeadConfig, detect_lm_beads
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.spot_fit import SpotFit
from tests.protocols.bead_render import render_em, render_lm, spread_points


def _nearest(found: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(truth[:, None] - found[None], axis=2)
    return d.min(axis=1), d.argmin(axis=1)


def test_lm_beads_subpixel_and_scored_against_impostors() -> None:
    beads = spread_points(1, 12, 20, 360, 25) + 0.37
    extras = [(100.3, 50.6, 250.0, 1.1),     # dim virus-like spot
              (300.2, 200.4, 3000.0, 3.5)]  # out-of-focus blob / debris, far too wide
    clump = [(200.0, 330.0), (202.8, 330.9)]  # two beads 0.3 um apart at 0.1 um pixels
    r = render_lm(np.concatenate([beads, clump]), extras=extras, seed=3)
    det = detect_lm_beads(r.image, 0.1, LmBeadConfig(numerical_aperture=1.4))
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 0.15), dist                    # sub-pixel, not rounded
    good = det.score[idx]
    assert good.min() > 0.5, good
    for x, y, *_ in extras + [(201.4, 330.4)]:
        d = np.hypot(det.xy_px[:, 0] - x, det.xy_px[:, 1] - y)
        if d.min() < 3:                                   # found: must score far lower
            assert det.score[d.argmin()] < 0.5 * good.min(), (x, y, det.score[d.argmin()])


def test_lm_beads_outscore_a_crowd_of_faint_specks() -> None:
    """Bleed-through of virus particles into the bead channel: 30 point-like specks at
    5-25% of a bead's brightness outnumber the 10 beads three to one, and one
    out-of-focus blob carries 20 beads' worth of light. The beads are still the typical
    spot: every bead must score at least twice every speck (the plain median brightness
    was a speck's, so the beads scored as clumps, 0.1-0.5, and the specks 0.9)."""
    beads = spread_points(11, 10, 20, 360, 30)
    rng = np.random.default_rng(12)
    specks = [(float(x), float(y), float(rng.uniform(150, 750)), 0.9)
              for x, y in rng.uniform(15, 370, (30, 2))]
    blob = [(60.0, 320.0, 2500.0, 5.0)]
    r = render_lm(beads, extras=specks + blob, seed=13)
    det = detect_lm_beads(r.image, 0.1)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 0.3), dist
    speck_xy = np.array([s[:2] for s in specks])
    near_speck = np.linalg.norm(det.xy_px[:, None] - speck_xy[None], axis=2).min(axis=1) < 1.5
    near_speck[idx] = False  # a speck on top of a bead is the bead
    assert near_speck.sum() >= 15                      # the specks are found, and scored
    assert det.score[idx].min() > 2 * det.score[near_speck].max(), (
        det.score[idx], det.score[near_speck])


def test_lm_saturated_bead_is_down_weighted() -> None:
    beads = spread_points(2, 8, 20, 360, 30)
    r = render_lm(beads, extras=[(190.0, 190.0, 60000.0, 1.1)], seed=4, saturate_at=4095)
    det = detect_lm_beads(r.image, 0.1)
    d = np.hypot(det.xy_px[:, 0] - 190.0, det.xy_px[:, 1] - 190.0)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 0.15)
    if d.min() < 1.0:  # dropped or kept with a low score, never ranked with real beads
        assert det.score[d.argmin()] < 0.2 * det.score[idx].min()


def test_em_beads_found_hole_edges_and_bars_ignored_contamination_down_weighted() -> None:
    beads = spread_points(5, 14, 60, 740, 40)
    extras = [(300.5, 120.5, 9.0, 0.8),     # big ice crystal
              (500.5, 640.5, 3.0, 0.12)]    # faint debris of bead size
    r = render_em(beads, hole_pitch_px=66.0, hole_radius_px=16.5, bar_rows=40,
                  extras=extras, seed=6)
    # min_score 0: the blob test alone must keep the hole fringes and the bar edge out.
    det = detect_em_beads(r.image, 0.0333, EmBeadConfig(min_score=0.0))  # bead radius 3 px
    dist, idx = _nearest(det.xy_px, beads)
    clean = (dist < 0.3) & (det.score[idx] > 0.3)
    # A bead on a strong hole fringe may lose score; most must stay clean.
    assert clean.sum() >= 10, (dist, det.score[idx])
    beads_or_extras = np.concatenate([beads, r.extras_px])
    d_all = np.linalg.norm(det.xy_px[:, None] - beads_or_extras[None], axis=2).min(axis=1)
    assert np.all(d_all < 3.0), det.xy_px[d_all >= 3.0]  # nothing on hole edges or bars
    for x, y in r.extras_px:
        d = np.hypot(det.xy_px[:, 0] - x, det.xy_px[:, 1] - y)
        if d.min() < 3:
            assert det.score[d.argmin()] < 0.3 * np.median(det.score[idx][clean])


@pytest.mark.parametrize(("angle", "mirrored"), [(35.0, False), (-120.0, True)],
                         ids=["rotated", "rotated-mirrored"])
def test_bead_images_correlate_end_to_end(angle: float, mirrored: bool) -> None:
    """LM at 0.1 um/px, EM at 0.04 um/px of the same beads, rotated (and mirrored), some
    beads lost in EM and contamination added: targets land within 100 nm."""
    rng = np.random.default_rng(8)
    grid = spread_points(9, 16, 3.0, 33.0, 3.0)          # um, on the specimen
    t = np.deg2rad(angle)
    lin = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * 1.02
    if mirrored:
        lin = lin @ np.diag([-1.0, 1.0])
    em_um = (grid - 18.0) @ lin.T + 18.0
    keep = rng.random(len(grid)) > 0.25
    lm = render_lm(grid / 0.1, shape=(384, 384), seed=10)
    em = render_em(em_um[keep] / 0.04, shape=(900, 900), radius_px=2.5, seed=11,
                   extras=[(x, y, 2.5, 0.5) for x, y in rng.uniform(50, 850, (3, 2))])
    targets_um = np.array([[15.0, 12.0], [20.0, 22.0]])
    res = correlate_bead_images(lm.image, 0.1, em.image, 0.04, targets_um / 0.1)
    assert res.points.status == "ok", res.points.reason
    assert res.targets_em_px is not None
    truth_px = ((targets_um - 18.0) @ lin.T + 18.0) / 0.04
    err_nm = np.linalg.norm(res.targets_em_px - truth_px, axis=1) * 40.0
    assert np.all(err_nm < 100.0), err_nm
    assert res.points.transform is not None and res.points.transform.mirrored == mirrored


@pytest.mark.parametrize(("image", "pixel", "match"), [
    (np.zeros((4, 64, 64)), 0.1, "2D"),
    (np.zeros((8, 8)), 0.1, "too small"),
    (np.full((64, 64), np.nan), 0.1, "NaN"),
    (np.zeros((64, 64)), 0.0, "pixel size"),
    (np.zeros((64, 64)), float("nan"), "pixel size"),
], ids=["3d", "tiny", "nan-pixels", "zero-pixel-size", "nan-pixel-size"])
def test_bad_images_raise(image: np.ndarray, pixel: float, match: str) -> None:
    for detect in (detect_lm_beads, detect_em_beads):
        with pytest.raises(CorrelationInputError, match=match):
            detect(image, pixel)


def test_blank_images_give_too_few_beads() -> None:
    blank = render_lm(np.zeros((0, 2)), seed=1).image
    em = render_em(spread_points(3, 6, 50, 700, 50), seed=2).image
    with pytest.raises(CorrelationInputError, match="LM image: 0 bead"):
        correlate_bead_images(blank, 0.1, em, 0.04)


def test_em_beads_on_signed_map_with_a_bar() -> None:
    """A map saved mean-subtracted (int16, negative pixels) with dark beads and a bar: the
    no-beam mask must not be taken from 0 (half the square would be masked) and a dark
    bead must not mask itself."""
    beads = spread_points(21, 12, 80, 700, 50)
    r = render_em(beads, bead_od=1.2, bar_rows=40, seed=22)
    signed = np.rint(r.image - np.median(r.image)).astype(np.int16)
    det = detect_em_beads(signed, 0.0333)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.sum((dist < 0.5) & (det.score[idx] > 0.3)) >= 11, (dist, det.score[idx])


def test_lm_all_beads_clipped_still_score_high() -> None:
    """An 8-bit export with auto-contrast clips every bead: clipping is then the rule and
    says nothing about which spot is a bead."""
    beads = spread_points(28, 12, 20, 360, 25)
    r = render_lm(beads, seed=29, saturate_at=1500)
    img8 = np.clip(r.image.astype(np.float64) / 1500 * 255, 0, 255).astype(np.uint8)
    det = detect_lm_beads(img8, 0.1)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 0.5), dist
    assert det.score[idx].min() > 0.3, det.score[idx]


@pytest.mark.parametrize("seed", [61, 62, 63])
def test_lm_wide_clipped_beads_are_fitted_not_dropped(seed: int) -> None:
    """Beads twice as wide as the optics predict (1.5 px at 0.106 um pixels) in an 8-bit
    export whose white is a quarter of their peak: each is a plateau whose blob response
    peaks ~2 px off its centre, so the fit's centre left the small window and half the
    beads were dropped (independent generator, square 500020: 7 of 14 found); fitted
    again only where the first fit failed, two fits of one plateau stopped 0.7-0.9 px
    either side of its centre."""
    beads = spread_points(seed, 12, 20, 360, 25) + 0.3
    r = render_lm(beads, sigma_px=1.5, peak=8000.0, seed=seed + 10)
    img8 = np.clip(r.image.astype(np.float64) / 2000.0 * 255, 0, 255).astype(np.uint8)
    det = detect_lm_beads(img8, 0.106)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 0.3), dist
    assert len(det) == len(beads), len(det)        # one detection per plateau
    assert det.score[idx].min() > 0.3, det.score[idx]


def _export_8bit(image: np.ndarray, black: float, white: float) -> np.ndarray:
    return np.clip(np.rint((image - black) / (white - black) * 255), 0, 255).astype(np.uint8)


def test_em_beads_in_low_dose_8bit_export_with_black_clipped_pixels() -> None:
    """A low-dose map exported to 8 bits with black at the darkest pixels: noise clips
    single pixels of the bead cores (and of the film) to 0.

    Taking 0 as no transmission turned each such pixel into a density spike of 7 that
    the fit locked on (a tiny, far too dense spot, scored out) and made every dark area
    noisy: 2 of these 12 beads were found."""
    beads = spread_points(31, 12, 40, 720, 50) + 0.3
    image = render_em(beads, bead_od=0.8, counts=25.0, seed=32).image.astype(np.float64)
    img8 = _export_8bit(image, float(np.percentile(image, 0.1)),
                        float(np.percentile(image, 99.5)))
    det = detect_em_beads(img8, 0.0333)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 1.0), dist
    assert det.score[idx].min() > 0.3, det.score[idx]


def test_em_black_is_a_clip_only_where_the_beam_is() -> None:
    """Zeros in a bar are no transmission (density from them); zeros in bead cores on
    the film are an export's clip (no known zero: linear density)."""
    beads = spread_points(33, 10, 80, 700, 50)
    bar = render_em(beads, bar_rows=60, seed=34).image.astype(np.float64)
    cores = _export_8bit(render_em(beads, bead_od=1.2, seed=34).image, 250.0, 700.0)
    beam = np.ones(bar.shape, dtype=bool)
    beam[:80] = False                                 # the bar and a margin: masked
    for image, clipped in ((bar, False), (cores.astype(np.float64), True)):
        assert black_is_clip(image, black_level(image), beam, 1) is clipped
        assert density_of(image, clipped).logarithmic is not clipped



@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["8bit-dark-carbon", "offset-with-bar"])
def test_em_no_beam_mask_takes_its_zero_from_a_bar_not_from_dark_carbon(offset: float) -> None:
    """Bright holes and darker carbon, as an export stretches them (carbon at 60 of 255,
    nothing below): the darkest blocks are carbon, and taken as the zero of transmission
    they put the no-beam level above the carbon, which masked the film and every bead on
    it (7 of 10 beads of an independent square). Saved with an offset of 100 and a bar
    in view, the bar (at the offset) is the zero: the bar is masked, the carbon is not."""
    rng = np.random.default_rng(37)
    yy, xx = np.mgrid[0:600, 0:600].astype(np.float64)
    d = np.hypot(xx / 66.0 - np.rint(xx / 66.0), yy / 66.0 - np.rint(yy / 66.0)) * 66.0
    image = np.where(d < 16.5, 200.0, 60.0) + rng.normal(0, 5.0, xx.shape)
    if offset:
        image = image * 3.0 + offset
        image[:60] = offset + rng.normal(0, 2.0, (60, 600))     # the bar: no beam
    valid = _valid_mask(image, 3.0, EmBeadConfig().dark_fraction)
    carbon = (d > 22.0) & (yy > 100)
    assert valid[carbon].mean() > 0.95, valid[carbon].mean()
    if offset:
        assert not valid[:50].any()


@pytest.mark.parametrize("seed", range(3))
def test_em_beads_of_a_low_dose_map_are_found(seed: int) -> None:
    """Nine electrons per pixel: dense beads stand 5-8 sigma above the noise, and their
    fits only 4-6x above their residual. Candidates down to 4.5 sigma are kept (weakly
    scored below 6), and what a bead looks like is learnt from the detections above 6
    sigma rather than from every candidate: 3-5 of these 12 beads were found before."""
    beads = spread_points(40 + seed, 12, 40, 720, 50) + 0.3
    image = render_em(beads, bead_od=0.9, counts=9.0, seed=41 + seed).image
    det = detect_em_beads(image, 0.0333)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.sum(dist < 1.0) >= 10, dist
    beads_found = np.unique(idx[dist < 1.0])
    assert len(det) - len(beads_found) <= 2, (len(det), len(beads_found))


def _fits(n: int, radius_px: float, amp: float, fit_over_residual: float, rng: np.random.Generator
          ) -> list[SpotFit]:
    sigma = radius_px * SPHERE_SIGMA_PER_RADIUS
    return [SpotFit(x=float(x), y=float(y), sigma=sigma * rng.uniform(0.95, 1.05),
                    amplitude=amp * rng.uniform(0.9, 1.1),
                    background=0.0, rms=amp / fit_over_residual, elongation=1.05)
            for x, y in rng.uniform(0, 2000, (n, 2))]


@pytest.mark.parametrize("case", ["coarse-8bit-beads-among-noise", "clean-beads-among-fringes"])
def test_em_typical_bead_is_learnt_from_clear_detections(case: str) -> None:
    """What a bead looks like (size, density) is learnt from detections noise cannot make.

    Coarse 8-bit export: 4 beads at 14-20 sigma fit only 4-6x above their quantisation
    residual, and 60 noise blobs of 6-8 sigma (under a cell, twice a bead's size, a third
    of its density) outnumber them; learnt from all, the beads scored 0.000-0.007 and
    none was kept (independent generator, squares 400057 and 400069). Strong but ragged
    responses (fits at 1x their residual) do not count (square 300023). Clean fits win
    over response: 3 beads fitting 10x above their residual at 9-10 sigma stay the model
    against 12 hole-lattice fringes at 13-17 sigma (square 100049)."""
    rng = np.random.default_rng(5)
    cfg = EmBeadConfig()
    r = cfg.bead_diameter_um / 2 / 0.025                     # 4 px beads at 25 nm pixels
    if case == "coarse-8bit-beads-among-noise":
        beads = _fits(4, r * 0.9, 0.6, 5.0, rng)
        others = _fits(60, r * 1.9, 0.2, 2.0, rng) + _fits(5, r * 1.5, 0.07, 0.9, rng)
        levels = np.r_[rng.uniform(14, 20, 4), rng.uniform(6, 8, 60), rng.uniform(13, 15, 5)]
    else:
        beads = _fits(3, r * 0.9, 0.6, 10.0, rng)
        others = _fits(12, r * 1.9, 0.25, 3.0, rng)
        levels = np.r_[rng.uniform(9, 10, 3), rng.uniform(13, 17, 12)]
    edge = np.full(len(levels), 0.9)
    score = _score(beads + others, edge, levels, r, cfg)
    n = len(beads)
    assert score[:n].min() > 0.3, score[:n]
    assert score[:n].min() > 3 * score[n:].max(), (score[:n], score[n:].max())


@pytest.mark.parametrize("seed", [51, 53, 55])
def test_em_beads_on_film_clipped_white_keep_their_score(seed: int) -> None:
    """An 8-bit export whose white is set at the film's median, under illumination
    falling off by 0.6-1.4 across the map: on the bright side the film is clipped white
    and only each bead's core shows, fitted smaller and fainter than the beads of the
    other side, from which the map's beads are learnt. Scored by the size and density
    of those, they fell to 0.04-0.33 (one lost); a clipped core may be smaller and
    fainter, not larger or denser (independent generator, square 400026)."""
    beads = spread_points(seed, 12, 40, 720, 50) + 0.3
    image = render_em(beads, bead_od=0.5, counts=200.0, seed=seed + 1).image.astype(np.float64)
    image *= 0.6 + 0.8 * np.arange(image.shape[1])[None, :] / (image.shape[1] - 1)
    img8 = _export_8bit(image, 0.0, float(np.median(image)))
    det = detect_em_beads(img8, 0.0333)
    dist, idx = _nearest(det.xy_px, beads)
    assert np.all(dist < 1.0), dist
    assert det.score[idx].min() > 0.3, det.score[idx]
    assert len(det) == len(beads), len(det)
