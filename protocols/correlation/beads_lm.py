"""Fiducial beads in the fLM bead channel: sub-pixel positions, each with a score.

Why this way (docs/clem-workflow.md, "Bead detection"): a 200 nm bead is a blurred point,
so the Laplacian of Gaussian at the PSF-plus-bead size (from the pixel size, and from the
numerical aperture and wavelength when known) is its matched filter; positions come from a
Gaussian fit, never rounded pixels. Every candidate gets a score instead of a hard yes/no,
because the matcher tolerates false detections far better than misses: the score only
down-weights saturated spots, clumps (too wide, too bright or elongated), out-of-focus
blobs, and dim virus-like spots (much fainter than the typical bead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import structlog
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.spot_fit import SpotFit, fit_spots
from protocols.correlation.spots import (
    blob_response,
    distinct_spots,
    local_noise,
    local_peaks,
    robust_sd,
)

FloatArray = NDArray[np.float64]
_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LmBeadConfig:
    """What a bead looks like in the fLM, and how strict the scoring is.

    ``numerical_aperture`` None assumes a high-NA oil objective (1.4), which gives the
    smallest plausible spot; defocus only widens it and the size score allows for that.
    """

    bead_diameter_um: float = 0.2
    wavelength_um: float = 0.45
    numerical_aperture: float | None = None
    threshold_sigmas: float = 6.0
    max_candidates: int = 400
    min_score: float = 0.02
    max_elongation: float = 1.6
    dim_fraction: float = 0.5


@dataclass(frozen=True)
class BeadDetections:
    """Detected beads: ``xy_px`` (N, 2) as (column, row), ``score`` in (0, 1], strongest
    first; ``size_px`` the fitted Gaussian sigma (LM) or disk radius (EM) in pixels;
    ``contrast`` the fitted amplitude (LM: counts above background; EM: optical density)."""

    xy_px: FloatArray
    score: FloatArray
    size_px: FloatArray
    contrast: FloatArray

    def __len__(self) -> int:
        return int(self.xy_px.shape[0])

    def xy_um(self, pixel_um: float) -> FloatArray:
        """Positions in micrometres of the image's own frame: (col, row) * pixel size."""
        return self.xy_px * pixel_um


def expected_sigma_um(cfg: LmBeadConfig) -> float:
    """Gaussian sigma of an in-focus bead image: PSF (0.21 lambda / NA) and bead (d / 4)."""
    na = cfg.numerical_aperture or 1.4
    psf = 0.21 * cfg.wavelength_um / na
    return float(np.hypot(psf, cfg.bead_diameter_um / 4.0))


def check_image(image: ArrayLike, name: str) -> NDArray[np.float64]:
    """A finite 2D float image (singleton axes dropped); CorrelationInputError otherwise."""
    arr = np.asarray(image)
    if arr.ndim > 2:
        arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise CorrelationInputError(f"{name}: expected a 2D image, got shape "
                                    f"{np.asarray(image).shape}")
    if min(arr.shape) < 16:
        raise CorrelationInputError(f"{name}: image {arr.shape} is too small (need >= 16 px)")
    if arr.dtype.kind not in "uif" and arr.dtype != np.bool_:
        raise CorrelationInputError(f"{name}: unsupported pixel type {arr.dtype}")
    out = arr.astype(np.float64)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(out)):  # integers always are
        raise CorrelationInputError(f"{name}: image contains NaN or infinite pixels")
    return out


def check_pixel_size(pixel_um: float, name: str) -> float:
    """A finite positive pixel size in micrometres."""
    if pixel_um is None or not np.isfinite(pixel_um) or pixel_um <= 0:
        raise CorrelationInputError(f"{name}: pixel size must be a positive number of um, "
                                    f"got {pixel_um!r}")
    return float(pixel_um)


def _saturation_level(image: FloatArray) -> float:
    """The image's top value: a camera clips there (a 12-bit camera in uint16 at 4095)."""
    return float(image.max())


def _pixel_noise(img: FloatArray, row: int, col: int, half: int) -> float:
    """Pixel noise around a spot from neighbour differences (robust to the spot itself)."""
    win = img[max(0, row - half):row + half + 1, max(0, col - half):col + half + 1]
    return max(robust_sd(np.diff(win, axis=1)) / float(np.sqrt(2)), 1e-9)


def _score(fits: list[SpotFit], sigma_px: float, noise: FloatArray, saturated: NDArray[np.bool_],
           cfg: LmBeadConfig) -> FloatArray:
    """Score in (0, 1]: product of size, shape, brightness and saturation factors."""
    amp = np.array([f.amplitude for f in fits])
    sig = np.array([f.sigma for f in fits])
    elong = np.array([f.elongation for f in fits])
    # Brightness as flux (amplitude x area): defocus widens a bead and lowers its peak
    # but keeps its light.
    flux = amp * sig ** 2
    strong = (amp > 20 * noise) & (elong < cfg.max_elongation)
    ratio = sig / sigma_px
    # What a bead looks like here is learnt from the bright bead-sized spots: generous in
    # size (up to 3x the optical estimate), because an unknown NA or a clipped 8-bit
    # export widens every bead alike, while out-of-focus blobs are wider still and carry
    # far more light than a bead.
    pool = strong & (ratio >= 0.6) & (ratio <= 3.0)
    if not np.any(pool):
        pool = np.ones(len(fits), dtype=bool)
    typical = _flux_weighted_median(flux[pool], flux[pool])
    width = float(np.clip(_flux_weighted_median(sig[pool], flux[pool]), 1.15 * sigma_px,
                          3.0 * sigma_px))
    # Defocus widens a bead (up to ~2x within the depth of a film's tilt); narrower than
    # the PSF is a hot pixel.
    size = np.exp(-0.5 * (np.log(np.clip(sig / width, 1e-3, None)) / 0.4) ** 2)
    size = np.where(ratio < 0.6, size * 0.1, size)
    shape = np.clip((cfg.max_elongation - elong) / (cfg.max_elongation - 1.0), 0.05, 1.0)
    rel = flux / max(typical, 1e-12)
    dim = np.clip((rel / cfg.dim_fraction) ** 2, 0.02, 1.0)    # virus-like faint spots
    clump = np.clip(1.0 / np.maximum(rel / 2.2, 1.0) ** 2, 0.1, 1.0)  # two or more beads
    snr = np.clip((amp / np.maximum(noise, 1e-12)) / 10.0, 0.05, 1.0)
    sat = np.where(saturated, _saturation_weight(saturated, strong | saturated), 1.0)
    return np.asarray(size * shape * dim * clump * snr * sat, dtype=np.float64)


def _flux_weighted_median(values: FloatArray, flux: FloatArray) -> float:
    """The typical bead's brightness or width: a median weighted by each spot's flux.

    Beads are the brightest population of the bead channel, but not always the most
    numerous: bleed-through of virus particles or autofluorescent specks can outnumber
    them three to one at a tenth of their brightness. The plain median then lands on the
    specks, and every real bead looked like a clump (2-10x "typical") while the specks
    scored as beads; on independent renders the beads' scores fell to 0.1-0.5 against
    0.9 for the specks and pair voting lost the true rotation. Weighting by flux lets
    each population count by the light it carries, so 5 beads outweigh 30 specks at a
    fifth of their brightness, and a few clumps of two do not move the answer much.
    """
    order = np.argsort(values)
    cum = np.cumsum(flux[order])
    return float(values[order][int(np.searchsorted(cum, 0.5 * cum[-1]))])


def _saturation_weight(saturated: NDArray[np.bool_], strong: NDArray[np.bool_]) -> float:
    """Weight of a clipped spot: 0.1 when clipping is the exception, 1 when it is the rule.

    A lone clipped spot among normal beads is likely a clump or debris (its brightness is
    unknown); when most strong spots are clipped (an 8-bit export with auto-contrast, a
    long exposure) clipping says nothing about which spot is a bead, and the centre of a
    clipped plateau is still the centre of a symmetric spot.
    """
    n_strong = int(np.sum(strong))
    frac = float(np.sum(saturated & strong)) / n_strong if n_strong else 0.0
    return float(np.clip(0.1 + 0.9 * (frac - 0.2) / 0.3, 0.1, 1.0))


# Spots fitted this many times wider than the optics predict are refitted in wider windows.
WIDE_SPOT_FACTOR = 1.5


def _bright_centroid(img: FloatArray, row: int, col: int, half: int) -> tuple[int, int]:
    """(row, col), rounded, of the centroid of the pixels above mid-range in the window."""
    r0, c0 = max(0, row - half), max(0, col - half)
    win = img[r0:row + half + 1, c0:col + half + 1]
    lo, hi = float(win.min()), float(win.max())
    if hi <= lo:
        return int(row), int(col)
    rr, cc = np.nonzero(win > 0.5 * (lo + hi))
    return round(float(rr.mean())) + r0, round(float(cc.mean())) + c0


def detect_lm_beads(image: ArrayLike, pixel_um: float,
                    config: LmBeadConfig | None = None) -> BeadDetections:
    """Find fluorescent beads in a 2D fLM image; positions in pixels (col, row).

    Raises CorrelationInputError for a non-2D, non-finite or tiny image or a bad pixel size.
    """
    cfg = config or LmBeadConfig()
    px = check_pixel_size(pixel_um, "LM image")
    img = check_image(image, "LM image")
    sigma_px = max(expected_sigma_um(cfg) / px, 0.6)
    resp = blob_response(img, max(sigma_px, 0.8))
    noise_map = local_noise(resp)
    peaks = local_peaks(resp, cfg.threshold_sigmas * noise_map,
                        max(2, round(2 * sigma_px)), max_peaks=cfg.max_candidates)
    sat_level = _saturation_level(img)
    fits: list[SpotFit] = []
    noise: list[float] = []
    saturated: list[bool] = []
    half = max(3, int(np.ceil(3.0 * sigma_px)))
    first = fit_spots(img, peaks, sigma_px, half)
    # Spots much wider than the optics predict (clipped plateaus of an 8-bit export, an
    # unknown NA) peak in the blob response near their edge, and a window of 3 predicted
    # sigmas holds only part of them: fits left it (half the beads of an independent
    # square, 500020, were dropped) or stopped on the flat top ~0.8 px from the centre.
    # When the fitted spots say so, all are fitted again in a window of 3 of their sigmas,
    # started from the centroid of each spot's upper half (within 2 sigmas, so that a
    # brighter neighbour does not draw the start to itself).
    widths = [f.sigma for f in first if f is not None]
    wide = float(np.median(widths)) if widths else 0.0
    if wide > WIDE_SPOT_FACTOR * sigma_px:
        half = max(half, int(np.ceil(3.0 * wide)))
        near = int(np.ceil(2.0 * wide))
        peaks = np.array([_bright_centroid(img, r, c, near) for r, c in peaks], dtype=np.intp)
        first = fit_spots(img, peaks, wide, half)
    for (r, c), fit in zip(peaks, first):
        if fit is None:
            continue
        fits.append(fit)
        noise.append(_pixel_noise(img, int(r), int(c), 4 * half))
        # Clipped: two or more pixels of the spot's centre at the image's top value.
        win = img[r - 1:r + 2, c - 1:c + 2]
        saturated.append(int(np.sum(win >= sat_level)) >= 2)
    if not fits:
        _log.info("beads_lm.none", candidates=len(peaks))
        return BeadDetections(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0))
    score = _score(fits, sigma_px, np.array(noise), np.array(saturated), cfg)
    xy = np.array([[f.x, f.y] for f in fits])
    keep = score >= cfg.min_score
    xy, score = xy[keep], score[keep]
    size = np.array([f.sigma for f in fits])[keep]
    amp = np.array([f.amplitude for f in fits])[keep]
    # Two peaks of one spot converge to one position: keep the better-scored one.
    k = distinct_spots(xy, score, sigma_px)
    xy, score, size, amp = xy[k], score[k], size[k], amp[k]
    order = np.argsort(-score, kind="stable")
    _log.info("beads_lm.detected", candidates=len(peaks), fitted=len(fits), kept=len(order),
              sigma_px=round(sigma_px, 2))
    return BeadDetections(xy[order], score[order], size[order], amp[order])


