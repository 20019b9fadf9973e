"""Sub-pixel Gaussian fits of many small spots at once.

Why batched: a square's map has tens to hundreds of candidates (beads, contamination, noise
peaks), and fitting each with a general least-squares solver and numerical derivatives cost
most of the time per square. Every candidate has the same small model (position, width,
amplitude, sloped background: 7 parameters), so all are fitted together by
Levenberg-Marquardt with the analytic Jacobian, vectorised over spots. A first stage is
plain least squares; a second reweights residuals as SciPy's ``soft_l1`` loss does (IRLS),
so that a hole edge, a fringe or a neighbour in the window does not pull the centre.
Pixel (x, y) = (column, row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
N_PARAMS = 7
# Convergence: position and width steps below STEP_TOL (px; sub-pixel fits are good to
# ~0.05 px at best), amplitude steps below AMPLITUDE_TOL of the amplitude (its noise is
# a few % for the brightest spot).
STEP_TOL = 1e-4
AMPLITUDE_TOL = 1e-3


@dataclass(frozen=True)
class SpotFit:
    """A symmetric 2D Gaussian fitted to one spot; lengths in pixels, (x, y) = (col, row).

    ``elongation`` is the ratio of the principal second moments of the background-free
    patch (1 for a round spot; a clump of two beads or a rod is longer), ``rms`` the fit's
    residual RMS in image units.
    """

    x: float
    y: float
    sigma: float
    amplitude: float
    background: float
    rms: float
    elongation: float


def _model(p: FloatArray, xx: FloatArray, yy: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Model values (n, P) and Jacobian (n, 7, P) for parameters p (n, 7).

    The Jacobian is filled in place, parameter-major: stacking seven (n, P) arrays along a
    last axis of 7 cost as much as the rest of the fit on 40 x 40 px windows.
    """
    x0, y0, s, a = p[:, 0:1], p[:, 1:2], p[:, 2:3], p[:, 3:4]
    dx, dy = xx[None] - x0, yy[None] - y0
    r2 = dx * dx + dy * dy
    inv_s2 = 1.0 / (s * s)
    g = np.exp(-0.5 * r2 * inv_s2)
    ag = a * g
    val = ag + p[:, 4:5] + p[:, 5:6] * xx[None] + p[:, 6:7] * yy[None]
    jac = np.empty((len(p), N_PARAMS, xx.size))
    agi = ag * inv_s2
    jac[:, 0] = agi * dx
    jac[:, 1] = agi * dy
    jac[:, 2] = agi * r2 / s
    jac[:, 3] = g
    jac[:, 4] = 1.0
    jac[:, 5] = xx
    jac[:, 6] = yy
    return val, jac


def _levenberg_marquardt(p: FloatArray, data: FloatArray, xx: FloatArray, yy: FloatArray,
                         lo: FloatArray, hi: FloatArray, iterations: int,
                         f_scale: FloatArray | None) -> FloatArray:
    """Batched LM with box bounds (clipping); IRLS soft-L1 weights when ``f_scale`` given.

    A spot leaves the batch once its step moves its position and width by less than
    ``STEP_TOL`` px and its amplitude by less than ``AMPLITUDE_TOL`` of itself: 1e-6 absolute
    in every parameter - the former rule - is far below the noise for a background of
    thousands of counts (and its slopes), and kept 240 of 334 windows of a 6000 px map
    iterating to the limit. What is reported depends on position, width and amplitude.
    """
    out = np.array(p, dtype=np.float64)
    idx = np.arange(len(out))
    lam = np.full(len(out), 1e-3)
    scale = None if f_scale is None else np.asarray(f_scale, np.float64)

    def cost(q: FloatArray, d: FloatArray, fs: FloatArray | None
             ) -> tuple[FloatArray, FloatArray, FloatArray]:
        val, jac = _model(q, xx, yy)
        res = val - d
        if fs is None:
            return 0.5 * np.sum(res ** 2, axis=1), res, jac
        z = (res / fs[:, None]) ** 2
        rho = 2.0 * (np.sqrt(1.0 + z) - 1.0) * fs[:, None] ** 2
        return 0.5 * np.sum(rho, axis=1), res, jac

    def tol(q: FloatArray) -> FloatArray:
        amp = AMPLITUDE_TOL * np.maximum(np.abs(q[:, 3:4]), 1e-12)
        return np.concatenate([np.full((len(q), 3), STEP_TOL), amp], axis=1)

    p, d = out.copy(), data
    c, res, jac = cost(p, d, scale)
    for _ in range(iterations):
        jw = jac if scale is None else \
            jac * (1.0 / np.sqrt(1.0 + (res / scale[:, None]) ** 2))[:, None, :]
        a = jw @ jac.transpose(0, 2, 1)
        grad = np.einsum("nkp,np->nk", jw, res)
        diag = np.einsum("nkk->nk", a)
        damped = a + (lam[:, None] * np.maximum(diag, 1e-12))[:, :, None] * np.eye(N_PARAMS)
        try:
            step = -np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = -grad / np.maximum(np.einsum("nkk->nk", damped), 1e-12)
        trial = np.clip(p + step, lo, hi)
        c_new, res_new, jac_new = cost(trial, d, scale)
        better = c_new < c
        p[better], c[better] = trial[better], c_new[better]
        res[better], jac[better] = res_new[better], jac_new[better]
        lam = np.where(better, lam * 0.3, lam * 10.0)
        done = np.all(np.abs(step[:, :4]) < tol(p), axis=1)
        if done.any():
            out[idx[done]] = p[done]
            keep = ~done
            idx, p, c, res, jac, lam, d = (idx[keep], p[keep], c[keep], res[keep], jac[keep],
                                          lam[keep], d[keep])
            scale = None if scale is None else scale[keep]
            if idx.size == 0:
                break
    out[idx] = p
    return out


def fit_spots(image: NDArray[np.floating], rc: NDArray[np.intp], sigma_px: float, half_px: int,
              convert: Callable[[FloatArray], FloatArray] | None = None
              ) -> list[SpotFit | None]:
    """Least-squares Gaussians (x, y, sigma, amplitude, sloped background) at each (row, col).

    ``convert`` maps the gathered windows to the fitted quantity (e.g. optical density)
    so that a large image need not be converted whole. One entry per candidate, None when
    the window is cut by the image border, the fit leaves the window or the spot has no
    positive amplitude (the position would be extrapolated, not measured).
    """
    img = np.asarray(image, dtype=np.float64)
    half = int(half_px)
    h, w = img.shape
    out: list[SpotFit | None] = [None] * len(rc)
    rc = np.asarray(rc, dtype=np.intp).reshape(-1, 2)
    inside = ((rc[:, 0] - half >= 0) & (rc[:, 1] - half >= 0) & (rc[:, 0] + half < h)
              & (rc[:, 1] + half < w))
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return out
    off = np.arange(-half, half + 1)
    rows = rc[idx, 0][:, None, None] + off[None, :, None]
    cols = rc[idx, 1][:, None, None] + off[None, None, :]
    patch = img[rows, cols]                                  # (n, 2h+1, 2h+1)
    if convert is not None:
        patch = np.asarray(convert(patch), np.float64)
    yy, xx = (v.ravel() for v in np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64))
    data = patch.reshape(len(idx), -1)
    edge = np.concatenate([patch[:, 0], patch[:, -1], patch[:, :, 0], patch[:, :, -1]], axis=1)
    bg0 = np.median(edge, axis=1)
    amp0 = patch[:, half, half] - bg0
    scale = np.maximum(1.4826 * np.median(np.abs(edge - bg0[:, None]), axis=1),
                       1e-3 * np.maximum(np.abs(amp0), 1e-12))
    p0 = np.stack([np.zeros_like(bg0), np.zeros_like(bg0), np.full_like(bg0, sigma_px),
                   np.maximum(amp0, 1e-12), bg0, np.zeros_like(bg0), np.zeros_like(bg0)], 1)
    lo = np.array([-half, -half, 0.3, 0.0, -np.inf, -np.inf, -np.inf])
    hi = np.array([half, half, 3.0 * half, np.inf, np.inf, np.inf, np.inf])
    # A bead's window converges in well under these many iterations; windows that do not
    # are noise peaks drifting in a flat cost (their centres were the only ones to move,
    # by up to 0.15 px, when the caps came down from 60 and 30).
    p = _levenberg_marquardt(p0, data, xx, yy, lo, hi, 30, None)
    p = _levenberg_marquardt(p, data, xx, yy, lo, hi, 15, 3.0 * scale)
    val, _ = _model(p, xx, yy)
    rms = np.sqrt(np.mean((val - data) ** 2, axis=1))
    for n, k in enumerate(idx):
        if amp0[n] <= 0:
            continue
        x0, y0, s, a, b, bx, by = (float(v) for v in p[n])
        if abs(x0) > half - 1 or abs(y0) > half - 1 or a <= 0:
            continue
        elong = _elongation(data[n] - b - bx * xx - by * yy, xx, yy, x0, y0, s)
        if elong is None:
            continue
        out[k] = SpotFit(x=float(rc[k, 1]) + x0, y=float(rc[k, 0]) + y0, sigma=s, amplitude=a,
                         background=b, rms=float(rms[n]), elongation=elong)
    return out


def _elongation(signal: FloatArray, xx: FloatArray, yy: FloatArray, x0: float, y0: float,
                s: float) -> float | None:
    """Ratio of the principal second moments of the positive signal near the spot."""
    wgt = np.where(np.hypot(xx - x0, yy - y0) <= 2.5 * s, np.clip(signal, 0.0, None), 0.0)
    total = float(wgt.sum())
    if total <= 0:
        return None
    mx, my = float((wgt * xx).sum() / total), float((wgt * yy).sum() / total)
    cxx = float((wgt * (xx - mx) ** 2).sum() / total)
    cyy = float((wgt * (yy - my) ** 2).sum() / total)
    cxy = float((wgt * (xx - mx) * (yy - my)).sum() / total)
    ev = np.linalg.eigvalsh(np.array([[cxx, cxy], [cxy, cyy]]))
    return float(np.sqrt(max(ev[1], 1e-12) / max(ev[0], 1e-12)))
