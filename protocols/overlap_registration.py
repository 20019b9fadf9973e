"""Register the overlap of two neighbouring tiles: a sub-pixel shift, a score, an ambiguity flag.

Why this is more than ``cv2.phaseCorrelate``: grid images are periodic (bars every 127 um,
holes every 4 um), so the strongest correlation peak is not always the true shift. The search
is therefore limited to the expected stage error around the nominal shift, every candidate
peak is re-scored by normalised cross-correlation (NCC) on its real overlap area (which removes
the bias of phase correlation towards small shifts with large overlap), and when two distinct
candidates score alike the one nearest the nominal shift wins and the match is flagged
``ambiguous`` so that the caller can refuse it.

The correlation is whitened (phase correlation) and then band-passed by a Gaussian low-pass
(noise in EM tiles lives at high frequencies) and a Gaussian high-pass (uneven illumination in
transmitted-light tiles lives at low ones). NCC is measured on the same band (difference of
Gaussians) so that it means "structure agrees", not "both tiles are bright".

Conventions: ``a`` and ``b`` are the nominal overlap cut from tile i and tile j with the same
shape; ``shift_px`` is the (x, y) = (column, row) residual ``r`` with ``b(p) = a(p + r)``, i.e.
the true offset of tile j relative to tile i is the integer nominal offset plus ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import fft as sfft
from scipy.ndimage import maximum_filter
from scipy.signal.windows import tukey

FloatArray = NDArray[np.float64]

__all__ = ["OverlapMatch", "RegistrationSettings", "band_pass", "ncc_at", "register_overlap"]


@dataclass(frozen=True)
class RegistrationSettings:
    """How one overlap is registered; lengths in tile pixels.

    ``max_shift_px`` bounds the search around the nominal shift: set it from the stage error
    (about three standard deviations) and keep it below half the shortest lattice period
    in the tiles, else a neighbouring period is as good a match and the overlap is flagged.
    """

    max_shift_px: float
    lowpass_sigma_px: float = 1.0
    highpass_sigma_px: float = 20.0
    ambiguity_margin: float = 0.9
    n_candidates: int = 6
    min_pixels: int = 256


@dataclass(frozen=True)
class OverlapMatch:
    """Result of one registration.

    ``ncc`` is the normalised cross-correlation of the band-passed overlap at the chosen shift
    (1 = identical structure, ~0 = unrelated). ``peak_ratio`` is the NCC of the best *other*
    candidate over ``ncc`` (near 1 = another shift explains the overlap as well).
    """

    shift_px: tuple[float, float]
    ncc: float
    peak_ratio: float
    ambiguous: bool
    n_pixels: int


def band_pass(image: NDArray[np.floating] | NDArray[np.integer], lowpass_sigma_px: float,
              highpass_sigma_px: float) -> NDArray[np.float32]:
    """Difference of Gaussians: keeps structure between the two scales, drops noise and shading."""
    img = np.asarray(image, dtype=np.float32)
    low = cv2.GaussianBlur(img, (0, 0), lowpass_sigma_px) if lowpass_sigma_px > 0 else img
    background = cv2.GaussianBlur(img, (0, 0), highpass_sigma_px)
    out: NDArray[np.float32] = low - background
    return out


def ncc_at(a: NDArray[np.float32], b: NDArray[np.float32], shift: tuple[int, int],
           min_pixels: int = 1) -> tuple[float, int]:
    """NCC of ``a(p + shift)`` against ``b(p)`` over their common area; (0, n) if undefined."""
    h, w = a.shape
    sx, sy = shift
    bx0, bx1 = max(0, -sx), min(w, w - sx)
    by0, by1 = max(0, -sy), min(h, h - sy)
    if bx1 <= bx0 or by1 <= by0:
        return 0.0, 0
    pb = b[by0:by1, bx0:bx1].astype(np.float64)
    pa = a[by0 + sy:by1 + sy, bx0 + sx:bx1 + sx].astype(np.float64)
    n = pa.size
    if n < min_pixels:
        return 0.0, n
    pa = pa - pa.mean()
    pb = pb - pb.mean()
    denom = float(np.sqrt((pa * pa).sum() * (pb * pb).sum()))
    if denom <= 1e-12:
        return 0.0, n
    return float((pa * pb).sum() / denom), n


def _window(shape: tuple[int, int]) -> NDArray[np.float32]:
    h, w = shape
    return np.outer(tukey(h, 0.5), tukey(w, 0.5)).astype(np.float32)


def _correlation_surface(a: NDArray[np.float32], b: NDArray[np.float32],
                         settings: RegistrationSettings) -> NDArray[np.float64]:
    """Band-passed phase correlation; index (qy, qx) (mod size) peaks at q = r."""
    h, w = a.shape
    pad = int(np.ceil(settings.max_shift_px)) + 1
    size = (cv2.getOptimalDFTSize(h + pad), cv2.getOptimalDFTSize(w + pad))
    win = _window((h, w))
    fa = sfft.rfft2((a - a.mean()) * win, s=size)
    fb = sfft.rfft2((b - b.mean()) * win, s=size)
    cross = fa * np.conj(fb)
    cross /= np.abs(cross) + 1e-12 * float(np.abs(cross).max() + 1e-30)
    ky = sfft.fftfreq(size[0])[:, None]
    kx = sfft.rfftfreq(size[1])[None, :]
    k2 = kx * kx + ky * ky
    two_pi2 = 2.0 * np.pi ** 2
    weight = np.exp(-two_pi2 * settings.lowpass_sigma_px ** 2 * k2)
    weight *= 1.0 - np.exp(-two_pi2 * settings.highpass_sigma_px ** 2 * k2)
    surface: NDArray[np.float64] = sfft.irfft2(cross * weight, s=size)
    return surface


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
                     settings: RegistrationSettings) -> OverlapMatch:
    """Find ``r`` with ``b(p) = a(p + r)``, ``|r| <= max_shift_px``, scored and checked.

    Runs on the nominal overlap only (a few hundred kB per pair). Raises ValueError if the
    two crops differ in shape; never fails on featureless input, which comes back with
    ``ncc`` near 0 for the caller to refuse.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"overlap crops must be equal 2D shapes, got {a.shape} and {b.shape}")
    fa = band_pass(a, settings.lowpass_sigma_px, settings.highpass_sigma_px)
    fb = band_pass(b, settings.lowpass_sigma_px, settings.highpass_sigma_px)
    surface = _correlation_surface(np.asarray(a, np.float32), np.asarray(b, np.float32), settings)
    hs, ws = surface.shape
    qy = np.fft.fftfreq(hs, 1.0 / hs)[:, None]
    qx = np.fft.fftfreq(ws, 1.0 / ws)[None, :]
    inside = qx * qx + qy * qy <= settings.max_shift_px ** 2
    masked = np.where(inside, surface, -np.inf)
    exclusion = max(2, int(np.ceil(3.0 * settings.lowpass_sigma_px)))
    peaks = (masked == maximum_filter(masked, size=2 * exclusion + 1, mode="wrap")) & inside
    rows, cols = np.nonzero(peaks)
    order = np.argsort(masked[rows, cols])[::-1][: settings.n_candidates]
    candidates: list[tuple[int, int, float, int]] = []  # (rx, ry, ncc, n)
    for k in order:
        qyi, qxi = int(qy[rows[k], 0]), int(qx[0, cols[k]])
        score, n = ncc_at(fa, fb, (qxi, qyi), settings.min_pixels)
        candidates.append((qxi, qyi, score, n))
    if not candidates:
        return OverlapMatch((0.0, 0.0), 0.0, 1.0, True, 0)
    best_score = max(c[2] for c in candidates)
    if best_score <= 0:
        rx, ry, score, n = candidates[0]
        return OverlapMatch((float(rx), float(ry)), max(score, 0.0), 1.0, True, n)
    # Of the candidates that explain the overlap about as well as the best, the one nearest the
    # nominal shift wins: stage errors are small, lattice periods are not.
    good = [c for c in candidates if c[2] >= settings.ambiguity_margin * best_score]
    chosen = min(good, key=lambda c: (c[0] ** 2 + c[1] ** 2, -c[2]))
    others = [c[2] for c in candidates
              if max(abs(c[0] - chosen[0]), abs(c[1] - chosen[1])) > exclusion]
    ratio = max(others, default=0.0) / chosen[2] if chosen[2] > 0 else 1.0
    ambiguous = any(max(abs(c[0] - chosen[0]), abs(c[1] - chosen[1])) > exclusion for c in good)
    dx, dy = _subpixel(surface, chosen[1], chosen[0])
    return OverlapMatch((chosen[0] + dx, chosen[1] + dy), chosen[2], float(max(ratio, 0.0)),
                        ambiguous, chosen[3])
