"""Fiducial beads in an EM map of one grid square: dark ~200 nm disks, each with a score.

Why this way (docs/clem-workflow.md, "Bead detection"):

- The map is turned into optical density, ``-log(I)`` where the image has a physical zero
  (counts), so a bead adds the same density on thin ice, on the film or on a cell's thin
  periphery; the dark bars and uncovered areas are masked (no transmitted beam there).
  An export whose black clips pixels where the beam is has no known zero: the map is
  inverted linearly then (see :func:`black_is_clip`).
- The scale-normalised Laplacian of Gaussian at the bead's size from the pixel size is
  the matched filter of a small disk and a band-pass in one: smooth ice gradients and the
  2 um holes hardly respond at that scale.
- Edges (holes of the R2/2 lattice, bars, finder marks, cells) still respond strongly, but
  as ridges: a Hessian eigenvalue-ratio test keeps round blobs only, without having to
  know where the lattice is.
- Contamination (ice crystals, debris) is told apart by size and density: every bead has
  the same diameter and material, so they cluster in (radius, density) while
  contamination scatters. The score down-weights what is off that cluster rather than
  dropping it: the matcher tolerates false detections better than misses.

Positions are sub-pixel Gaussian fits in the full-resolution density image; (x, y) =
(column, row).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import structlog
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.beads_lm import BeadDetections, check_image, check_pixel_size
from protocols.correlation.spot_fit import SpotFit, fit_spots
from protocols.correlation.spots import (
    blob_level,
    blob_response,
    distinct_spots,
    edge_ratio,
    level_noise,
    local_noise,
    local_peaks,
)

FloatArray = NDArray[np.float64]
_log = structlog.get_logger(__name__)
# Projected sphere of radius R: per-axis second moment R^2 / 5.
SPHERE_SIGMA_PER_RADIUS = 1.0 / np.sqrt(5.0)
# Peaks above threshold that get the (cheap, vectorised) edge test; only blob-like ones
# count towards EmBeadConfig.max_candidates.
EDGE_TEST_MAX_PEAKS = 200_000
# A map's minimum is a clip when this many pixels sit on it (see black_level).
CLIP_MIN_PIXELS, CLIP_MIN_FRACTION = 5, 2e-5
# A detection this many times the threshold, fitting this many times above its residual,
# counts as clear when learning what this map's beads look like (see _score).
CLEAR_LEVEL, CLEAR_FIT = 2.0, 3.5
# A candidate whose surroundings (a ring of 1-2 nominal radii) sit at an export's white clip
# this much shows only its core: see _score.
CLIPPED_RING_FRACTION = 0.5
# ...and is scored as a bead's core when its fitted radius and density are at least this
# fraction of the map's beads' (the cores of clipped beads fitted at 0.48-0.85 of both).
CLIPPED_MIN_CORE = 0.3


@dataclass(frozen=True)
class EmBeadConfig:
    """What a bead looks like in the EM map and how strict the scoring is.

    Blobs above ``threshold_sigmas`` are detections; those between ``faint_sigmas`` and
    it are kept, weakly scored, only when they look like this map's beads (score at least
    ``faint_min_score``; the ``max_faint`` strongest are fitted): the beads of a low-dose
    map sit there.
    """

    bead_diameter_um: float = 0.2
    threshold_sigmas: float = 6.0
    faint_sigmas: float = 4.5
    faint_min_score: float = 0.05
    max_faint: int = 100
    max_candidates: int = 600
    min_edge_ratio: float = 0.25
    min_score: float = 0.02
    max_elongation: float = 1.6
    detect_radius_px: float = 1.8
    dark_fraction: float = 0.15


@dataclass(frozen=True)
class _Density:
    """How to turn pixels into optical density for one map (see :func:`density_of`)."""

    film: float
    logarithmic: bool

    def __call__(self, image: FloatArray) -> FloatArray:
        if not self.logarithmic:
            return self.film - image
        return -np.log(np.maximum(image, 1e-3 * self.film) / self.film)


def density_of(image: FloatArray, zero_is_black_clip: bool = False) -> _Density:
    """The density conversion of a map: ``-log(I / film)`` with ``film`` its bright level
    when pixels have a physical zero (counts), else the inverted image (signed maps, and
    exports whose black is a clip: see :func:`black_is_clip`)."""
    sample = image[::4, ::4]
    lo, film = (float(v) for v in np.percentile(sample, [0.5, 90]))
    if lo < 0 or film <= 0 or zero_is_black_clip:
        return _Density(film, False)
    return _Density(film, True)


def _is_clip(image: FloatArray, value: float) -> bool:
    """Whether many pixels sit exactly on ``value`` (ties at an extreme are otherwise rare)."""
    n = max(CLIP_MIN_PIXELS, int(CLIP_MIN_FRACTION * image.size))
    return bool(np.count_nonzero(image == value) >= n)


def black_level(image: FloatArray) -> float:
    """The map's minimum when many pixels sit exactly on it (a clip: an export's black, a
    camera's zero), else -inf."""
    lo = float(image.min())
    return lo if _is_clip(image, lo) else -np.inf


def white_level(image: FloatArray) -> float | None:
    """The map's maximum when many pixels sit exactly on it (an export's white clip),
    else None."""
    hi = float(image.max())
    return hi if _is_clip(image, hi) else None


def clipped_around(image: FloatArray, xy: FloatArray, radius_px: float, white: float | None
                   ) -> NDArray[np.bool_]:
    """Whether most of the ring of 1-2 ``radius_px`` around each (x, y) sits at ``white``."""
    if white is None or len(xy) == 0:
        return np.zeros(len(xy), dtype=bool)
    h = int(np.ceil(2 * radius_px)) + 1
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    rr = np.hypot(xx, yy)
    ring = (rr >= radius_px) & (rr <= 2 * radius_px)
    centre = np.rint(np.asarray(xy, np.float64)).astype(int)
    r = np.clip(centre[:, 1:2] + yy[ring][None], 0, image.shape[0] - 1)
    c = np.clip(centre[:, 0:1] + xx[ring][None], 0, image.shape[1] - 1)
    return np.asarray(np.mean(image[r, c] >= white, axis=1) >= CLIPPED_RING_FRACTION)


def black_is_clip(image: FloatArray, black: float, valid: NDArray[np.bool_], f: int) -> bool:
    """Whether a map's black is an export's clip rather than no transmission.

    Black pixels in the bar or thick ice (masked) are the zero of transmission, and
    ``-log(I)`` measures from them. Black pixels mostly where the beam is (noisy pixels
    of bead cores and film clipped by an 8-bit contrast stretch set at the darkest
    pixels) say the zero lies somewhere below, unknown: the log from 0 then turned each
    clipped core pixel into a spike of density 7 that the fit locked on (a tiny, far too
    dense spot, scored out) and blew up the noise of every dark area, so the map is
    inverted linearly instead. A bead-size disk of black costs a little precision that
    way (the log made it a high plateau, centred well) but is still found.
    """
    if not np.isfinite(black) or black < 0:
        return False
    rows, cols = np.nonzero(image == black)
    rows = np.minimum(rows // f, valid.shape[0] - 1)
    cols = np.minimum(cols // f, valid.shape[1] - 1)
    return bool(np.mean(valid[rows, cols]) > 0.5)


def _noise(resp: FloatArray, od: FloatArray, sigma_det: float, valid: NDArray[np.bool_]
           ) -> FloatArray:
    """Noise of the blob response, per pixel: per density, not below half the per-block one.

    Shot noise is higher where the map is darker (inside the holes of a dark-hole map,
    under cells) at a scale finer than any block, and the per-density estimate (a low
    percentile, see level_noise) ignores structure; the per-block MAD does not: hole edges
    and fringes fill every 64 px block of a lattice at 30 nm pixels, and there it put
    clear beads at 5 sigma and below the threshold. Half the block estimate stays as a
    floor for levels that are flat rather than quiet (an export's white clip).
    """
    by_block = local_noise(np.where(valid, resp, 0.0))
    level = blob_level(od, 2.0 * sigma_det)
    by_level = level_noise(resp, level, valid)(level)
    return np.where(by_level > 0, np.maximum(by_level, 0.5 * by_block), by_block)


def _valid_mask(image: FloatArray, radius_px: float, dark_fraction: float) -> NDArray[np.bool_]:
    """Where beads can be seen: away (by a few bead radii) from dark metal and beyond.

    Computed on blocks of about one bead radius (the mask needs no finer detail).
    """
    b = max(1, int(radius_px))
    coarse = _bin(image, b)
    film = float(np.percentile(coarse, 90))
    dark = coarse < _dark_level(coarse, film, dark_fraction)
    # Bars and thick ice are wide; a dark bead (one block or two across) is not, and
    # must not mask itself: only dark areas wider than two bead diameters count.
    # (OpenCV morphology on uint8: SciPy's took a quarter of a 4k map's detection time.)
    dark8 = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    grow = 4  # blocks, as a diamond (|dx| + |dy| <= grow)
    yy, xx = np.mgrid[-grow:grow + 1, -grow:grow + 1]
    ok = cv2.dilate(dark8, (np.abs(yy) + np.abs(xx) <= grow).astype(np.uint8)) == 0
    full = np.repeat(np.repeat(ok, b, axis=0), b, axis=1)
    out = np.zeros(image.shape, dtype=bool)
    out[:full.shape[0], :full.shape[1]] = full[:image.shape[0], :image.shape[1]]
    return out


def _dark_level(coarse: FloatArray, film: float, dark_fraction: float) -> float:
    """Below this a block sees no beam (bar, thick ice): ``dark_fraction`` of the way
    from the zero of transmission to the film.

    Counts have their zero at 0; a map saved with an offset, mean-subtracted or
    normalised has it somewhere else (possibly negative), and measuring from 0 there
    masks half the square. The darkest blocks stand in for the zero then, but only when
    they stand apart from the map (:func:`_stands_apart`): with a bar in view they are the
    bar. Without one they are just the darker of the map's own levels (the carbon between
    bright holes, in an 8-bit export whose black is set near the darkest pixels), and
    measuring from them masked the whole carbon film and every bead on it; the zero is
    then 0 for non-negative pixels, and a signed map has nothing to mask.
    """
    lo = float(np.percentile(coarse, 0.1))
    if lo >= 0 and lo < dark_fraction * film:
        zero = 0.0
    elif _stands_apart(coarse, lo, film):
        zero = min(lo, film)
    elif lo >= 0:
        zero = 0.0
    else:
        return -np.inf
    return zero + dark_fraction * (film - zero)


def _stands_apart(coarse: FloatArray, lo: float, film: float) -> bool:
    """Whether the darkest blocks form their own population, far below the map's levels.

    A bar or thick ice is much darker than anything carrying beam; the lower quartile
    (carbon, dark holes, a cell) lies far nearer the film than the bar. The darkest
    blocks of a map without one sit just below that quartile.
    """
    q25 = float(np.percentile(coarse, 25))
    return (q25 - lo) > (film - q25)


def _bin(image: FloatArray, f: int) -> FloatArray:
    """Mean of f x f blocks (whole blocks only), via OpenCV's area resampling."""
    if f <= 1:
        return image
    h, w = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    small = cv2.resize(np.ascontiguousarray(image[:h, :w], dtype=np.float32), (w // f, h // f),
                       interpolation=cv2.INTER_AREA)
    return np.asarray(small, np.float64)


def detect_em_beads(image: ArrayLike, pixel_um: float,
                    config: EmBeadConfig | None = None) -> BeadDetections:
    """Find dark bead disks in a 2D EM map; positions in pixels (col, row).

    Raises CorrelationInputError for a non-2D, non-finite or tiny image or a bad pixel size.
    """
    cfg = config or EmBeadConfig()
    px = check_pixel_size(pixel_um, "EM image")
    img = check_image(image, "EM image")
    radius_px = cfg.bead_diameter_um / 2 / px
    # Detect on a binned copy when beads are large in pixels (speed); fit at full size.
    f = max(1, int(radius_px / cfg.detect_radius_px))
    small = _bin(img, f)
    r_small = radius_px / f
    valid = _valid_mask(small, r_small, cfg.dark_fraction)
    to_od = density_of(img, black_is_clip(img, black_level(img), valid, f))
    od_small = to_od(small)
    sigma_det = max(r_small / np.sqrt(2.0), 0.7)
    resp = blob_response(od_small, sigma_det)
    noise = _noise(resp, od_small, sigma_det, valid)
    # The edge test comes before the cap on candidates: a hole lattice's fringes give
    # thousands of ridge peaks above threshold (400 holes in a square), and a cap taken
    # first would keep only those and drop every bead.
    peaks = local_peaks(resp, cfg.faint_sigmas * noise, max(2, round(r_small)),
                        valid=valid, max_peaks=EDGE_TEST_MAX_PEAKS)
    ratio = edge_ratio(od_small, sigma_det, peaks) if len(peaks) else np.zeros(0)
    blob = ratio >= cfg.min_edge_ratio
    peaks, ratio = peaks[blob][:cfg.max_candidates], ratio[blob][:cfg.max_candidates]
    sigmas = resp[peaks[:, 0], peaks[:, 1]] / noise[peaks[:, 0], peaks[:, 1]]
    # Fitting is the cost: the strongest max_faint candidates below the threshold only
    # (noise peaks of a large map are thousands; a square holds tens of beads).
    first = (sigmas >= cfg.threshold_sigmas) | (
        np.cumsum(sigmas < cfg.threshold_sigmas) <= cfg.max_faint)
    peaks, ratio, sigmas = peaks[first], ratio[first], sigmas[first]
    sigma_fit = max(radius_px * SPHERE_SIGMA_PER_RADIUS, 0.7)
    half = max(3, int(np.ceil(2.5 * max(radius_px, 1.5))))
    centres = (peaks * f + (f - 1) // 2).astype(np.intp)
    fits: list[SpotFit] = []
    ratios: list[float] = []
    levels: list[float] = []
    for fit, er, sg in zip(fit_spots(img, centres, sigma_fit, half, convert=to_od), ratio,
                           sigmas):
        if fit is not None:
            fits.append(fit)
            ratios.append(float(er))
            levels.append(float(sg))
    empty = BeadDetections(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0))
    if not fits:
        _log.info("beads_em.none", candidates=len(peaks))
        return empty
    level = np.array(levels)
    xy = np.array([[x.x, x.y] for x in fits])
    clipped = clipped_around(img, xy, radius_px, white_level(img))
    score = _score(fits, np.array(ratios), level, radius_px, cfg, clipped)
    radius = np.array([x.sigma for x in fits]) / SPHERE_SIGMA_PER_RADIUS
    amp = np.array([x.amplitude for x in fits])
    # A faint candidate stays only when it looks like this map's beads (size, density,
    # shape): noise peaks at 4.5-6 sigma outnumber faint beads and would fill the output.
    keep = (score >= cfg.min_score) & ((level >= cfg.threshold_sigmas)
                                       | (score >= cfg.faint_min_score))
    xy, score, radius, amp = xy[keep], score[keep], radius[keep], amp[keep]
    # Two peaks of one disk converge to one position: keep the better-scored one.
    k = distinct_spots(xy, score, radius_px)
    xy, score, radius, amp = xy[k], score[k], radius[k], amp[k]
    order = np.argsort(-score, kind="stable")
    _log.info("beads_em.detected", candidates=len(peaks), fitted=len(fits), kept=len(order),
              radius_px=round(radius_px, 2), binning=f)
    return BeadDetections(xy[order], score[order], radius[order], amp[order])


def _score(fits: list[SpotFit], edge: FloatArray, level: FloatArray, radius_px: float,
           cfg: EmBeadConfig, clipped: NDArray[np.bool_] | None = None) -> FloatArray:
    """Score in (0, 1]: radius, density against the bead cluster, roundness, blobness,
    and how far above the noise the blob response stands (``level``, in sigmas).

    ``clipped`` candidates sit on an export's white clip (:func:`clipped_around`): only
    the core of a bead shows there, so it fits smaller and fainter than the map's beads
    and only being larger or denser than them counts against it. Why: 8-bit exports
    whose white is set below the film (an independent generator's square 400026) fitted
    such beads at 0.4-0.5 of their radius, and the size prior scored them out
    (0.000-0.002) though they stood at 20-31 sigma. Only strong cores of at least
    ``CLIPPED_MIN_CORE`` of the beads' radius and density are treated so: a clipped film
    still shows its noise as single dark pixels (far above a noise estimate of 0) or, just
    above the clip, as faint specks.
    """
    radius = np.array([f.sigma for f in fits]) / SPHERE_SIGMA_PER_RADIUS
    amp = np.array([f.amplitude for f in fits])
    clip = np.zeros(len(fits), bool) if clipped is None else np.asarray(clipped, bool)
    elong = np.array([f.elongation for f in fits])
    rms = np.array([f.rms for f in fits])
    # The nominal diameter is only a prior: beads are sold as 150-250 nm, and the fitted
    # radius includes blur (camera MTF, defocus), so a map's beads can look up to twice
    # the nominal size. Within that range the beads themselves set the size and the
    # density: they share both, while contamination scatters (see _typical_bead).
    size_ratio = radius / max(radius_px, 0.5)
    prior = np.exp(-0.5 * (np.log(np.clip(size_ratio, 1e-3, None) / 1.2) / 0.45) ** 2)
    # What a bead looks like is learnt from clear detections: bead-sized and round,
    # above the detection threshold and with a fit well above its residual. A low-dose
    # map's beads (9 electrons per pixel) fit at 4-6x their residual only; then the
    # detections above threshold stand in, never every candidate (with the faint ones
    # counted, the median candidate is noise, and every bead looked 4x too dense).
    # Fewer than 3 such fits: a blob response of twice the threshold is clear too. In 8-bit
    # exports with coarse gain, beads of 12-30 sigma fit at only 4-6x their (quantisation)
    # residual, while detections of 6-8 sigma outnumber them 20 to 1 under a cell or in
    # dark holes; taking all of those as the typical bead scored every bead out
    # (independent image generator, squares 400057 and 400069: 10 beads each, none kept).
    # Those beads fit at 4.0-6.1x, the strong non-beads there at 0.7-3.0x (square 300023:
    # three ragged 13-15 sigma responses outvoted 2 beads).
    # Not first: a hole lattice's fringes can stand at 13-17 sigma, a dozen alike, and
    # outvote 3 beads that fit cleanly (square 100049).
    shaped = (prior > 0.3) & (elong < cfg.max_elongation) & (level >= cfg.threshold_sigmas)
    like = shaped & (amp > 6.0 * rms)
    if np.sum(like) < 3:
        like = like | (shaped & (level >= CLEAR_LEVEL * cfg.threshold_sigmas)
                       & (amp > CLEAR_FIT * rms))
    if np.sum(like) < 2:
        like = shaped
    if np.sum(like & ~clip) >= 2:
        like = like & ~clip          # a clipped bead shows only its core
    typical, typical_r = _typical_bead(amp, radius, like, 1.2 * radius_px)
    # Only strong cores of some size: where the film sits just above the clip, its noise
    # dips below it in faint specks (6-8 sigma), and where it sits far above, in single
    # pixels (infinitely many sigma above a noise of 0, a fiftieth of a bead's density).
    clip = (clip & (level >= CLEAR_LEVEL * cfg.threshold_sigmas)
            & (radius >= CLIPPED_MIN_CORE * typical_r) & (amp >= CLIPPED_MIN_CORE * typical))
    radius = np.where(clip, np.maximum(radius, typical_r), radius)
    prior = np.where(clip & (size_ratio < 1.2), 1.0, prior)
    size = (np.exp(-0.5 * (np.log(np.clip(radius / typical_r, 1e-3, None)) / 0.25) ** 2)
            * np.clip(prior / 0.3, 0.0, 1.0))
    rel = amp / max(typical, 1e-12)
    rel = np.where(clip, np.maximum(rel, 1.0), rel)
    density = np.exp(-0.5 * (np.log(np.clip(rel, 1e-3, None)) / 0.35) ** 2)
    shape = np.clip((cfg.max_elongation - elong) / (cfg.max_elongation - 1.0), 0.05, 1.0)
    blob = np.clip(edge / 0.6, 0.05, 1.0)
    snr = np.clip(amp / np.maximum(3.0 * rms, 1e-12), 0.05, 1.0)
    # Between the faint and the detection threshold a candidate counts, weakly: the
    # matcher tolerates false detections, and a low-dose map's beads sit there.
    faint = np.clip((level - cfg.faint_sigmas) / (cfg.threshold_sigmas - cfg.faint_sigmas),
                    0.25, 1.0)
    return np.asarray(size * density * shape * blob * snr * faint, dtype=np.float64)


def _typical_bead(amp: FloatArray, radius: FloatArray, like: NDArray[np.bool_],
                  fallback_radius: float) -> tuple[float, float]:
    """(density, radius) of this map's beads: the most populated density among clear,
    roughly bead-sized, round detections, and the median radius of those near it.

    Without any such detection the median density stands in (never the maximum: that is
    the darkest contamination, against which every bead would look faint).
    """
    if not np.any(like):
        return float(np.median(amp)), fallback_radius
    typical = _mode_log(amp[like])
    near = like & (np.abs(np.log(amp / typical)) <= 0.35)
    return typical, float(np.median(radius[near])) if np.any(near) else fallback_radius


def _mode_log(values: FloatArray, width: float = 0.25) -> float:
    """The value with most others within a factor exp(width); ties go to the larger."""
    logs = np.log(values)
    counts = np.sum(np.abs(logs[:, None] - logs[None, :]) <= width, axis=1)
    best = np.flatnonzero(counts == counts.max())
    centre = logs[best[np.argmax(values[best])]]
    return float(np.exp(np.median(logs[np.abs(logs - centre) <= width])))


