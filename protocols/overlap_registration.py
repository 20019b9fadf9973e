"""Register the overlap of two neighbouring tiles: a sub-pixel shift, a score, an ambiguity flag.

Why this is more than ``cv2.phaseCorrelate``: grid images are periodic (bars every 127 um,
holes every 4 um), so the strongest correlation peak is not always the true shift, and the
overlap left after a stage error of a few um can be a small part of a narrow strip. So:

- both crops are compared as gradient magnitude after Gaussian smoothing (``structure``):
  smoothing removes the pixel noise of EM tiles, the gradient the uneven illumination of
  transmitted-light tiles, and the filter is local, so it treats a narrow overlap strip the
  same in both tiles (a wide band-pass does not: it sees different neighbours in each);
- tile i's crop is the nominal overlap widened by the search radius, so the true overlap is
  inside it whatever the stage error within that radius;
- the score of every shift is the normalised cross-correlation (NCC) over the area where both
  crops exist (Padfield's masked NCC, computed with FFTs), so a shift with a small overlap is
  not favoured or penalised for its size;
- the search is limited to ``max_shift_px`` (per axis) around the nominal shift, and when two
  distinct peaks score alike (a lattice, or an aperture problem along one bar) the one nearest the
  nominal shift wins and the match is flagged ``ambiguous`` so that the caller can refuse it.

Conventions: pixel (x, y) = (column, row). Crop ``b`` sits at integer ``offset`` in the frame
of crop ``a`` according to the stage; ``shift_px`` is the residual ``r`` such that
``b(p - offset) = a(p + r)``: the true offset of tile j relative to tile i is the nominal
(integer) one plus ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import fft as sfft
from scipy.ndimage import maximum_filter

FloatArray = NDArray[np.float64]

__all__ = ["OverlapMatch", "RegistrationSettings", "context_px", "register_overlap", "structure"]


@dataclass(frozen=True)
class RegistrationSettings:
    """How one overlap is registered; lengths in tile pixels.

    ``peak_sigma_px`` is the smoothing of the crops (``structure``): peaks closer than twice
    that are one peak. ``max_shift_px`` bounds the search around the nominal shift: set it from the stage error
    (about three standard deviations) and keep it below half the shortest lattice period
    in the tiles, else a neighbouring period is as good a match and the overlap is flagged.
    """

    max_shift_px: float
    peak_sigma_px: float = 1.0
    ambiguity_margin: float = 0.9
    n_candidates: int = 6
    min_pixels: int = 256
    min_overlap_fraction: float = 0.25


@dataclass(frozen=True)
class OverlapMatch:
    """Result of one registration.

    ``ncc`` is the normalised cross-correlation of the filtered overlap at the chosen shift
    (1 = identical structure, ~0 = unrelated). ``z_score`` is ``ncc`` times the square root of
    the number of independent pixels compared (smoothing correlates neighbours): unrelated
    images reach ~3 by chance over a search window, so small overlaps need a higher NCC.
    ``peak_ratio`` is the NCC of the best *other* candidate over ``ncc`` (near 1 = another
    shift explains the overlap as well).
    """

    shift_px: tuple[float, float]
    ncc: float
    peak_ratio: float
    ambiguous: bool
    n_pixels: int
    z_score: float = 0.0


def structure(image: NDArray[np.floating] | NDArray[np.integer], sigma_px: float,
              log_scale: bool = False) -> NDArray[np.float32]:
    """Gradient magnitude after Gaussian smoothing: what registration compares.

    Smoothing by ``sigma_px`` removes the pixel noise of low-dose EM tiles; the gradient removes
    the illumination level and its slow variation in transmitted light, so the same filter
    serves both. Its support is only ~3 sigma, so a crop taken with that much context from
    its tile is filtered exactly as the whole tile would be (a wide high-pass is not: on a
    narrow overlap strip it sees different neighbours in the two tiles).

    ``log_scale``: compare ``log(1 + g / median(g))`` instead of ``g``. On an EM square map
    the edge of a grid bar or of a thick cell body is ten times stronger than the holes and
    bead edges around it, so NCC sees one straight edge and slides along it (every shift
    along the edge scores alike: the overlap is refused as ambiguous). Compressed, the holes
    and beads weigh as much as the edge and pin the shift along it too (square maps on the
    session's simulated grid: 20-21 of 25 tiles placed instead of 15-16, placed tiles still
    within 0.13 um of each other). The median makes the scale independent of the dose.
    """
    img: NDArray[np.float32] = np.asarray(image, dtype=np.float32)
    if sigma_px > 0:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigma_px), dtype=np.float32)
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    # not cv2.magnitude: its SIMD path rounds differently depending on where the output
    # buffer happens to be aligned (3.8e-6 on a third of the pixels), so the same tiles gave
    # placements differing by 1e-10 um from call to call, which moved the stage commands
    # derived from them and, through the rendered frames, flipped later decisions (a bead
    # match) between two runs of one seed. numpy's multiply, add and sqrt round the same
    # way whatever the alignment.
    out: NDArray[np.float32] = np.sqrt(gx * gx + gy * gy, dtype=np.float32)
    if log_scale:
        scale = float(np.median(out))
        if not scale > 0:
            scale = float(out.max()) or 1.0
        out = np.log1p(out / np.float32(scale), dtype=np.float32)
    return out


def context_px(sigma_px: float) -> int:
    """Pixels of context a crop needs for ``structure`` to be exact in its interior."""
    return int(np.ceil(4.0 * sigma_px)) + 2


def _masked_ncc_surface(a: NDArray[np.float32], b: NDArray[np.float32], offset: tuple[int, int],
                        max_shift_px: float, mask_a: NDArray[np.bool_], mask_b: NDArray[np.bool_]
                        ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """NCC of ``a(p + s)`` with ``b`` placed at ``offset`` in a's frame, for every shift s.

    Padfield's masked normalised cross-correlation (IEEE TIP 2012) with FFTs: each shift is
    normalised over the area where both crops exist, so small and large overlaps compare
    fairly; pixels outside the masks take no part. Returns (ncc, n_pixels); index (sy, sx)
    modulo the surface shape.
    """
    ha, wa = a.shape
    hb, wb = b.shape
    ox, oy = offset
    pad = int(np.ceil(max_shift_px)) + 1
    size = (cv2.getOptimalDFTSize(ha + pad), cv2.getOptimalDFTSize(wa + pad))
    ma = mask_a.astype(np.float64)
    a64 = a.astype(np.float64) * ma
    mb = np.zeros((ha, wa))
    mb[oy:oy + hb, ox:ox + wb] = mask_b
    b_full = np.zeros((ha, wa))
    b_full[oy:oy + hb, ox:ox + wb] = b
    b_full *= mb

    def spectrum(x: NDArray[np.float64]) -> NDArray[np.complex128]:
        out: NDArray[np.complex128] = sfft.rfft2(x, s=size)
        return out

    def corr(fx: NDArray[np.complex128], fy: NDArray[np.complex128]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = sfft.irfft2(fx * np.conj(fy), s=size)
        return out

    f_ma, f_mb = spectrum(ma), spectrum(mb)
    f_a, f_b = spectrum(a64), spectrum(b_full)
    n = np.round(corr(f_ma, f_mb))
    sa, sb = corr(f_a, f_mb), corr(f_ma, f_b)
    saa, sbb = corr(spectrum(a64 * a64), f_mb), corr(f_ma, spectrum(b_full * b_full))
    sab = corr(f_a, f_b)
    safe_n = np.maximum(n, 1.0)
    var_a = np.maximum(saa - sa * sa / safe_n, 0.0)
    var_b = np.maximum(sbb - sb * sb / safe_n, 0.0)
    denom = np.sqrt(var_a * var_b)
    tol = 1e-9 * float(denom.max() + 1e-30)
    ncc = np.where((denom > tol) & (n > 0), (sab - sa * sb / safe_n) / np.maximum(denom, tol), 0.0)
    return ncc, n


def _subpixel(surface: NDArray[np.float64], qy: int, qx: int) -> tuple[float, float]:
    """Parabolic refinement of a peak at (qy, qx) on a periodic surface; (dx, dy)."""
    h, w = surface.shape

    def vertex(m: float, c: float, p: float) -> float:
        den = m - 2.0 * c + p
        return 0.0 if den >= 0 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))

    c = surface[qy % h, qx % w]
    dx = vertex(surface[qy % h, (qx - 1) % w], c, surface[qy % h, (qx + 1) % w])
    dy = vertex(surface[(qy - 1) % h, qx % w], c, surface[(qy + 1) % h, qx % w])
    return dx, dy


def register_overlap(a: NDArray[np.floating] | NDArray[np.integer],
                     b: NDArray[np.floating] | NDArray[np.integer],
                     offset: tuple[int, int], settings: RegistrationSettings,
                     mask_a: NDArray[np.bool_] | None = None,
                     mask_b: NDArray[np.bool_] | None = None) -> OverlapMatch:
    """Find ``r`` (|r_x|, |r_y| <= max_shift_px) with ``b(p - offset) = a(p + r)``, scored and checked.

    ``a`` is the overlap of tile i widened by the search radius, ``b`` the part of tile j that
    the stage says lies in it, at ``offset`` (x, y) in a's frame, both already filtered (see
    ``structure``); NCC removes their level and gain. Optional boolean masks mark the pixels
    that may be compared (e.g. not next to a tile edge, where filtering had no context). Raises
    ValueError for non-2D crops or ``b`` not inside ``a``; never fails on featureless input,
    which comes back with ``ncc`` near 0 for the caller to refuse.
    """
    ox, oy = offset
    if a.ndim != 2 or b.ndim != 2 or ox < 0 or oy < 0 or oy + b.shape[0] > a.shape[0] \
            or ox + b.shape[1] > a.shape[1]:
        raise ValueError(f"crop {b.shape} at {offset} does not lie inside crop {a.shape}")
    ma = np.ones(a.shape, bool) if mask_a is None else mask_a
    mb = np.ones(b.shape, bool) if mask_b is None else mask_b
    if ma.shape != a.shape or mb.shape != b.shape:
        raise ValueError("masks must have the shapes of their crops")
    surface, counts = _masked_ncc_surface(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                          offset, settings.max_shift_px, ma, mb)
    hs, ws = surface.shape
    sy = np.fft.fftfreq(hs, 1.0 / hs)[:, None]
    sx = np.fft.fftfreq(ws, 1.0 / ws)[None, :]
    # a shift that overlaps only a sliver of b can correlate well by chance
    min_count = max(settings.min_pixels, settings.min_overlap_fraction * int(mb.sum()))
    inside = ((np.abs(sx) <= settings.max_shift_px) & (np.abs(sy) <= settings.max_shift_px)
              & (counts >= min_count))
    masked = np.where(inside, surface, -np.inf)
    exclusion = max(2, int(np.ceil(2.0 * settings.peak_sigma_px)))
    peaks = (masked == maximum_filter(masked, size=2 * exclusion + 1, mode="wrap")) & inside
    rows, cols = np.nonzero(peaks)
    order = np.argsort(masked[rows, cols])[::-1][: settings.n_candidates]
    # (rx, ry, ncc, n)
    candidates = [(int(sx[0, cols[k]]), int(sy[rows[k], 0]), float(masked[rows[k], cols[k]]),
                   int(counts[rows[k], cols[k]])) for k in order]
    if not candidates or candidates[0][2] <= 0:
        return OverlapMatch((0.0, 0.0), 0.0, 1.0, True, 0)
    best_score = candidates[0][2]
    # Of the candidates that explain the overlap about as well as the best, the one nearest the
    # nominal shift wins: stage errors are small, lattice periods are not.
    good = [c for c in candidates if c[2] >= settings.ambiguity_margin * best_score]
    chosen = min(good, key=lambda c: (c[0] ** 2 + c[1] ** 2, -c[2]))

    def distinct(c: tuple[int, int, float, int]) -> bool:
        return max(abs(c[0] - chosen[0]), abs(c[1] - chosen[1])) > exclusion

    others = [c[2] for c in candidates if distinct(c)]
    ratio = max(max(others, default=0.0), 0.0) / chosen[2]
    ambiguous = any(distinct(c) for c in good)
    dx, dy = _subpixel(surface, chosen[1], chosen[0])
    n_independent = chosen[3] / max(1.0, 4.0 * np.pi * settings.peak_sigma_px ** 2)
    return OverlapMatch((chosen[0] + dx, chosen[1] + dy), chosen[2], float(ratio), ambiguous,
                        chosen[3], float(chosen[2] * np.sqrt(n_independent)))
