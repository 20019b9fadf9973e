"""Atlas registration: fLM transmitted-light overview of the grid <-> EM low-mag atlas.

Why this way (docs/clem-workflow.md, "Atlas registration"):

- Intensities differ completely between the two (glass is bright in LM and outside the
  grid dark in EM, cells and thick ice show in one and not the other), but both see the
  metal as dark. The representation compared is therefore the *edges of the dark mask*
  (bars, mesh boundary, finder marks) at a common working pixel size from the pixel sizes.
- The bar lattice fixes rotation modulo 90 degrees and the scale (strongest Fourier peak of
  each image); what the lattice cannot tell - 4 rotations x 2 mirror states and the shift
  by whole pitches - is decided by everything non-periodic: the mesh boundary, the
  asymmetric centre mark, finder codes, broken squares, cells. Each of the 8 candidates is
  cross-correlated over all shifts and the best peak wins only with a clear margin over
  the best *different* answer (another candidate, or the same one a pitch away).
- Square openings are then found in both images as bright blobs of about one opening's
  area, paired through the coarse answer, and fitted robustly (the transforms module:
  leave-one-out errors, residuals per square, predicted error at every point).

Pixel (x, y) = (column, row) of each image; no flips.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import structlog
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from protocols.correlation.beads_lm import check_image, check_pixel_size
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.transforms import Transform2D, as_points, fit_transform

FloatArray = NDArray[np.float64]
_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AtlasConfig:
    """Working resolution and acceptance numbers; lengths in micrometres."""

    work_pixel_um: float = 2.5
    min_pitch_um: float = 40.0
    max_pitch_um: float = 400.0
    scale_tolerance: float = 0.15
    min_margin: float = 0.025
    min_squares: int = 12
    max_square_residual_fraction: float = 0.15


@dataclass(frozen=True)
class AtlasResult:
    """Outcome of :func:`register_atlas`.

    ``transform`` maps LM pixel-um (``(col, row) * lm_pixel``) to EM pixel-um; the square
    arrays are matched opening centres in each image's pixels with their residuals (um).
    ``score``/``runner_up`` are the correlation of the winning candidate and of the best
    different one; ``confidence`` is their relative margin.
    """

    status: str
    reason: str
    transform: Transform2D | None
    mirrored: bool
    rotation_deg: float
    lm_squares_px: FloatArray
    em_squares_px: FloatArray
    square_residuals_um: FloatArray
    score: float
    runner_up: float
    confidence: float
    pitch_um: float
    points_em_px: FloatArray | None
    points_error_um: FloatArray | None


def _resample(img: FloatArray, pixel_um: float, work_um: float) -> FloatArray:
    f = pixel_um / work_um
    h, w = img.shape
    size = (max(8, int(round(w * f))), max(8, int(round(h * f))))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(img.astype(np.float32), size, interpolation=interp), np.float64)


def _dark_mask(img: FloatArray) -> NDArray[np.bool_]:
    """Metal (and whatever is as dark): Otsu on the percentile-normalised image."""
    lo, hi = np.percentile(img, [1, 99])
    u8 = np.clip((img - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    u8 = cv2.GaussianBlur(u8, (0, 0), 1.0)
    _, mask = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.asarray(mask == 0)


def _edges(dark: NDArray[np.bool_]) -> FloatArray:
    """Edges of the dark mask, zero-mean: the modality-neutral picture of the grid."""
    g = ndimage.gaussian_gradient_magnitude(dark.astype(np.float64), 1.0)
    return g - g.mean()


def _lattice(rep: FloatArray, work_um: float, cfg: AtlasConfig) -> tuple[float, float]:
    """(angle_deg mod 90, pitch_um) of the strongest periodicity in the pitch range."""
    h, w = rep.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    spec = np.abs(np.fft.fftshift(np.fft.fft2(rep * win)))
    fy = (np.arange(h) - h // 2) / (h * work_um)
    fx = (np.arange(w) - w // 2) / (w * work_um)
    fr = np.hypot(fx[None, :], fy[:, None])
    band = (fr >= 1 / cfg.max_pitch_um) & (fr <= 1 / cfg.min_pitch_um)
    spec = np.where(band, spec, 0.0)
    r, c = np.unravel_index(int(np.argmax(spec)), spec.shape)
    # Sub-bin peak position from a 3x3 weighted centroid.
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, h), max(c - 1, 0), min(c + 2, w)
    wgt = spec[r0:r1, c0:c1]
    yy, xx = np.mgrid[r0:r1, c0:c1]
    pr, pc = float((wgt * yy).sum() / wgt.sum()), float((wgt * xx).sum() / wgt.sum())
    fyp, fxp = (pr - h // 2) / (h * work_um), (pc - w // 2) / (w * work_um)
    # Edges make harmonics strong (two edges per pitch): the fundamental is the lowest
    # sub-multiple of the peak that still carries a clear peak.
    top = spec[r, c]
    n_best = 1
    for n in range(2, 6):
        fr_n = np.hypot(fxp, fyp) / n
        if fr_n < 1 / cfg.max_pitch_um:
            break
        rn, cn = int(round(h // 2 + (pr - h // 2) / n)), int(round(w // 2 + (pc - w // 2) / n))
        local = spec[max(rn - 1, 0):rn + 2, max(cn - 1, 0):cn + 2]
        if local.size and float(local.max()) > 0.2 * top:
            n_best = n
    fxp, fyp = fxp / n_best, fyp / n_best
    return float(np.degrees(np.arctan2(fyp, fxp)) % 90.0), float(1.0 / np.hypot(fxp, fyp))


def _remove_lattice(rep: FloatArray, angle_deg: float, pitch_um: float, work_um: float
                    ) -> FloatArray:
    """``rep`` without its periodic part: the lattice's Fourier peaks notched out.

    Every candidate (4 rotations x 2 mirror states, any whole-pitch shift) aligns the bars
    equally well, so the bars only add a common floor that hides the margin; what decides
    between candidates is what the notch leaves: mesh boundary, marks, codes, cells.
    """
    h, w = rep.shape
    spec = np.fft.fft2(rep)
    fy = np.fft.fftfreq(h, d=work_um)[:, None]
    fx = np.fft.fftfreq(w, d=work_um)[None, :]
    t = np.radians(angle_deg)
    u = np.array([np.cos(t), np.sin(t)]) / pitch_um
    v = np.array([-np.sin(t), np.cos(t)]) / pitch_um
    # Lattice coordinates of every frequency bin; notch within a radius of ~2 bins.
    det = u[0] * v[1] - u[1] * v[0]
    a = (fx * v[1] - fy * v[0]) / det
    b = (fy * u[0] - fx * u[1]) / det
    da, db = a - np.rint(a), b - np.rint(b)
    dist = np.hypot(da * u[0] + db * v[0], da * u[1] + db * v[1])
    radius = 2.5 / (min(h, w) * work_um)
    keep = (dist > radius) | ((np.rint(a) == 0) & (np.rint(b) == 0))
    return np.real(np.fft.ifft2(spec * keep))


def _mesh_interior(shape: tuple[int, ...], openings: FloatArray, pitch_px: float
                   ) -> FloatArray:
    """Soft mask of the mesh one pitch inside its boundary.

    The round mesh boundary (and the glass or cartridge beyond it) looks the same under
    every rotation and mirror state, so it would only add a common score; the deciding
    content (centre mark, finder codes, broken squares, cells) lies inside.
    """
    if len(openings) < 10:
        return np.ones(shape)
    c = np.median(openings, axis=0)
    r = float(np.percentile(np.linalg.norm(openings - c, axis=1), 99)) - 1.0 * pitch_px
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    inside = (np.hypot(xx - c[0], yy - c[1]) < max(r, pitch_px)).astype(np.float64)
    return np.asarray(ndimage.gaussian_filter(inside, 0.3 * pitch_px), np.float64)


def _similarity(angle_deg: float, scale: float, mirrored: bool, src_c: FloatArray,
                dst_c: FloatArray) -> FloatArray:
    t = np.radians(angle_deg)
    lin = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if mirrored:
        lin = lin @ np.diag([-1.0, 1.0])
    return np.concatenate([lin, (dst_c - lin @ src_c)[:, None]], axis=1)


def _xcorr_peaks(a: FloatArray, b: FloatArray, pitch_px: float
                 ) -> tuple[float, FloatArray, float]:
    """Best normalised cross-correlation of b against a over shifts, its shift (x, y), and
    the best value at least half a pitch away from it."""
    fa = np.fft.rfft2(a)
    fb = np.fft.rfft2(b)
    cc = np.fft.irfft2(fa * np.conj(fb), s=a.shape)
    cc /= (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
    r, c = np.unravel_index(int(np.argmax(cc)), cc.shape)
    h, w = cc.shape
    dy, dx = (r + h // 2) % h - h // 2, (c + w // 2) % w - w // 2
    rr, cc_idx = np.ogrid[:h, :w]
    ddy = (rr - r + h // 2) % h - h // 2
    ddx = (cc_idx - c + w // 2) % w - w // 2
    far = np.hypot(ddy, ddx) > 0.5 * pitch_px
    return float(cc[r, c]), np.array([dx, dy], float), float(cc[far].max())


def _openings(img: FloatArray, dark: NDArray[np.bool_], pitch_px: float) -> FloatArray:
    """Centres (x, y) of square openings: bright blobs of about one opening's area."""
    lab, n = ndimage.label(~dark)
    if n == 0:
        return np.zeros((0, 2))
    idx = np.arange(1, n + 1)
    area = ndimage.sum(np.ones_like(img), lab, idx)
    com = np.array(ndimage.center_of_mass(np.ones_like(img), lab, idx)).reshape(-1, 2)
    nominal = (0.72 * pitch_px) ** 2
    ok = (area > 0.35 * nominal) & (area < 1.6 * nominal)
    return com[ok][:, ::-1]


def _to_original(xy: FloatArray, shape: tuple[int, ...], work_shape: tuple[int, ...]
                 ) -> FloatArray:
    fx, fy = shape[1] / work_shape[1], shape[0] / work_shape[0]
    return np.stack([(xy[:, 0] + 0.5) * fx - 0.5, (xy[:, 1] + 0.5) * fy - 0.5], axis=1)


def register_atlas(lm_image: ArrayLike, lm_pixel_um: float, em_image: ArrayLike,
                   em_pixel_um: float, points_lm_px: ArrayLike | None = None,
                   config: AtlasConfig | None = None) -> AtlasResult:
    """Register the LM grid overview to the EM atlas; map LM pixel points to EM pixels.

    Raises CorrelationInputError for unusable images or pixel sizes, or when no grid
    lattice is visible; an ambiguous registration is a result ("no_confident_match").
    """
    cfg = config or AtlasConfig()
    lm_px = check_pixel_size(lm_pixel_um, "LM atlas")
    em_px = check_pixel_size(em_pixel_um, "EM atlas")
    lm = check_image(lm_image, "LM atlas")
    em = check_image(em_image, "EM atlas")
    pts = np.zeros((0, 2)) if points_lm_px is None else as_points(points_lm_px, "points", 0)
    work = cfg.work_pixel_um
    lm_w, em_w = _resample(lm, lm_px, work), _resample(em, em_px, work)
    lm_dark, em_dark = _dark_mask(lm_w), _dark_mask(em_w)
    lm_rep, em_rep = _edges(lm_dark), _edges(em_dark)
    a_lm, p_lm = _lattice(lm_rep, work, cfg)
    a_em, p_em = _lattice(em_rep, work, cfg)
    scale = p_em / p_lm
    if abs(scale - 1.0) > cfg.scale_tolerance:
        raise CorrelationInputError(
            f"grid pitch {p_lm:.1f} um in LM vs {p_em:.1f} um in EM: pixel sizes off by more "
            f"than {cfg.scale_tolerance:.0%} or no grid lattice visible")
    pitch_px = p_em / work
    lm_sq = _openings(lm_w, lm_dark, p_lm / work)
    em_sq = _openings(em_w, em_dark, pitch_px)
    lm_rep = _remove_lattice(lm_rep, a_lm, p_lm, work) * _mesh_interior(lm_rep.shape, lm_sq,
                                                                           p_lm / work)
    em_rep = _remove_lattice(em_rep, a_em, p_em, work) * _mesh_interior(em_rep.shape, em_sq,
                                                                           pitch_px)
    h, w = em_rep.shape
    canvas = (max(h, lm_rep.shape[0]) * 2, max(w, lm_rep.shape[1]) * 2)
    em_pad = np.zeros(canvas)
    em_pad[:h, :w] = em_rep
    src_c = np.array([lm_rep.shape[1] / 2, lm_rep.shape[0] / 2])
    dst_c = np.array([w / 2, h / 2])
    cands = []
    for mirrored in (False, True):
        base = (a_em + a_lm) if mirrored else (a_em - a_lm)
        for k in range(4):
            ang = base + 90.0 * k
            m = _similarity(ang, scale, mirrored, src_c, dst_c)
            warped = cv2.warpAffine(lm_rep.astype(np.float32), m, (canvas[1], canvas[0]),
                                    flags=cv2.INTER_LINEAR)
            best, shift, far = _xcorr_peaks(em_pad, np.asarray(warped, np.float64), pitch_px)
            m[:, 2] += shift  # a(x) ~ b(x - shift): move the warped LM by +shift
            cands.append((best, far, ang, mirrored, m))
    cands.sort(key=lambda c: -c[0])
    best, far, ang, mirrored, m = cands[0]
    runner = max(cands[1][0], far)
    confidence = (best - runner) / max(best, 1e-12)
    # Square openings in both images (work pixels), paired through the coarse answer.
    pairs_lm, pairs_em = np.zeros((0, 2)), np.zeros((0, 2))
    if len(lm_sq) and len(em_sq):
        mapped = lm_sq @ m[:, :2].T + m[:, 2]
        d, j = cKDTree(em_sq).query(mapped)
        ok = d < 0.3 * pitch_px
        pairs_lm, pairs_em = lm_sq[ok], em_sq[j[ok]]
    status, reason = "ok", (f"{len(pairs_lm)} squares matched; correlation {best:.3f} vs "
                            f"{runner:.3f} for the next different answer")
    transform = None
    resid = np.zeros(0)
    if len(pairs_lm) < cfg.min_squares:
        status, reason = "no_confident_match", (f"{len(pairs_lm)} squares matched, need "
                                                f"{cfg.min_squares}")
    elif confidence < cfg.min_margin:
        status, reason = "no_confident_match", (
            f"ambiguous: correlation {best:.3f} vs {runner:.3f} for a different answer "
            f"(margin {confidence:.2f} < {cfg.min_margin})")
    # Work pixels -> each image's own pixels (cv2.resize maps pixel centres linearly).
    lm_sq_px = _to_original(pairs_lm, lm.shape, lm_w.shape)
    em_sq_px = _to_original(pairs_em, em.shape, em_w.shape)
    a_um, b_um = lm_sq_px * lm_px, em_sq_px * em_px
    if len(pairs_lm) >= 4:
        keep = np.ones(len(pairs_lm), bool)
        for _ in range(3):  # squares dented by cells or dark ice: drop the far-out ones
            transform = fit_transform(a_um[keep], b_um[keep], "affine",
                                      from_frame="lm_px_um", to_frame="em_px_um")
            r = np.linalg.norm(transform.apply(a_um) - b_um, axis=1)
            lim = max(3.0 * 1.4826 * float(np.median(r[keep])), 0.02 * p_em)
            if np.array_equal(keep, r <= lim):
                break
            keep = r <= lim
        lm_sq_px, em_sq_px = lm_sq_px[keep], em_sq_px[keep]
        assert transform is not None
        resid = np.linalg.norm(transform.apply(lm_sq_px * lm_px) - em_sq_px * em_px, axis=1)
        if status == "ok" and float(np.median(resid)) > cfg.max_square_residual_fraction * p_em:
            status, reason = "no_confident_match", (
                f"square centres do not agree: median residual {np.median(resid):.1f} um")
    pts_em = pts_err = None
    if transform is not None:
        pts_em = transform.apply(pts * lm_px) / em_px if len(pts) else np.zeros((0, 2))
        pts_err = transform.predicted_error(pts * lm_px) if len(pts) else np.zeros(0)
    _log.info("atlas.registered", status=status, squares=len(lm_sq_px), score=round(best, 4),
              runner_up=round(runner, 4), mirrored=mirrored, rotation_deg=round(ang % 360, 2))
    return AtlasResult(status=status, reason=reason, transform=transform, mirrored=mirrored,
                       rotation_deg=float(ang % 360), lm_squares_px=lm_sq_px,
                       em_squares_px=em_sq_px, square_residuals_um=resid, score=best,
                       runner_up=runner, confidence=confidence, pitch_um=p_em,
                       points_em_px=pts_em, points_error_um=pts_err)
