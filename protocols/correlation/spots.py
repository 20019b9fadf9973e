"""Small round spots in an image: scale-space candidates and sub-pixel Gaussian fits.

Shared by the fLM bead detector (bright spots) and the EM bead detector (dark disks, fed
in as an inverted optical-density image). Both need the same three things: candidates from
a scale-normalised Laplacian of Gaussian at the expected spot size (the matched filter of
a blurred disk), a blob-versus-edge test on the Hessian (edges of holes, bars and cells
give strong responses that are long, not round), and a sub-pixel position from a Gaussian
fit, never a rounded pixel. Pixel (x, y) = (column, row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.optimize import least_squares

FloatArray = NDArray[np.float64]


def robust_sd(values: NDArray[np.floating]) -> float:
    """Standard deviation from the median absolute deviation (outliers do not count)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def blob_response(image: NDArray[np.floating], sigma_px: float) -> FloatArray:
    """Scale-normalised negative LoG: positive and largest at bright blobs of ``sigma_px``."""
    img = np.asarray(image, dtype=np.float64)
    return -(sigma_px ** 2) * ndimage.gaussian_laplace(img, sigma_px, mode="nearest")


def local_noise(response: FloatArray, block_px: int = 64) -> FloatArray:
    """Robust noise of ``response`` per block (MAD), as a full-size map.

    Photon noise makes the film noisier than the bars and a cell brighter than the film,
    so one global threshold is either blind on bright areas or flooded on them. Spots are
    sparse, so each block's median absolute value ignores them.
    """
    h, w = response.shape
    b = max(8, int(block_px))
    ny, nx = -(-h // b), -(-w // b)
    pad = np.pad(response, ((0, ny * b - h), (0, nx * b - w)), mode="reflect")
    blocks = np.abs(pad.reshape(ny, b, nx, b)).transpose(0, 2, 1, 3).reshape(ny, nx, -1)
    med = 1.4826 * np.median(blocks, axis=2)
    floor = max(float(np.median(med)) * 1e-3, 1e-12)
    med = np.maximum(ndimage.maximum_filter(med, size=3, mode="nearest"), floor)
    return np.repeat(np.repeat(med, b, axis=0), b, axis=1)[:h, :w]


def local_peaks(response: FloatArray, threshold: float | FloatArray, min_distance_px: int,
                valid: NDArray[np.bool_] | None = None, max_peaks: int = 2000
                ) -> NDArray[np.intp]:
    """(row, col) of local maxima above ``threshold``, strongest first."""
    size = 2 * max(1, int(min_distance_px)) + 1
    is_max = (response == ndimage.maximum_filter(response, size=size, mode="nearest"))
    is_max &= response > threshold
    if valid is not None:
        is_max &= valid
    rc = np.argwhere(is_max)
    order = np.argsort(-response[rc[:, 0], rc[:, 1]], kind="stable")
    return rc[order[:max_peaks]].astype(np.intp)


def edge_ratio(image: NDArray[np.floating], sigma_px: float, rc: NDArray[np.intp]
               ) -> FloatArray:
    """Ratio of the Hessian's eigenvalues (small / large magnitude) at each (row, col).

    About 1 for a round blob, near 0 along an edge or a ridge (SIFT's edge test): lets
    the detectors drop the ring-like responses of hole and bar edges without knowing where
    holes and bars are. Computed on a window around each point only.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    half = int(np.ceil(4 * sigma_px)) + 2
    out = np.zeros(len(rc))
    for k, (r, c) in enumerate(rc):
        r0, r1 = max(0, r - half), min(h, r + half + 1)
        c0, c1 = max(0, c - half), min(w, c + half + 1)
        win = img[r0:r1, c0:c1]
        rr, cc = r - r0, c - c0
        a = ndimage.gaussian_filter(win, sigma_px, order=(0, 2), mode="nearest")[rr, cc]
        b = ndimage.gaussian_filter(win, sigma_px, order=(2, 0), mode="nearest")[rr, cc]
        d = ndimage.gaussian_filter(win, sigma_px, order=(1, 1), mode="nearest")[rr, cc]
        half_tr = 0.5 * (a + b)
        disc = float(np.sqrt(max(0.25 * (a - b) ** 2 + d ** 2, 0.0)))
        l1, l2 = half_tr + disc, half_tr - disc
        if l1 * l2 > 0:
            out[k] = min(abs(l1), abs(l2)) / max(abs(l1), abs(l2), 1e-12)
    return out


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


def fit_spot(image: NDArray[np.floating], row: int, col: int, sigma_px: float,
             half_px: int | None = None) -> SpotFit | None:
    """Least-squares Gaussian (x, y, sigma, amplitude, background) around (row, col).

    Returns None when the window is cut by the image border or the fit leaves it (the
    position would be extrapolated, not measured).
    """
    img = np.asarray(image, dtype=np.float64)
    half = int(half_px if half_px is not None else max(3, int(np.ceil(3.0 * sigma_px))))
    h, w = img.shape
    if row - half < 0 or col - half < 0 or row + half >= h or col + half >= w:
        return None
    patch = img[row - half:row + half + 1, col - half:col + half + 1]
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    bg0 = float(np.median(np.concatenate([patch[0], patch[-1], patch[:, 0], patch[:, -1]])))
    amp0 = float(patch[half, half] - bg0)
    if amp0 <= 0:
        return None

    def resid(p: FloatArray) -> FloatArray:
        x0, y0, s, a, b, bx, by = p
        g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2.0 * s * s))
        return (a * g + b + bx * xx + by * yy - patch).ravel()

    # A sloped background and a soft-L1 loss: a hole edge, a fringe or a neighbour in the
    # window must not pull the centre.
    edge = np.concatenate([patch[0], patch[-1], patch[:, 0], patch[:, -1]])
    scale = max(1.4826 * float(np.median(np.abs(edge - bg0))), 1e-3 * max(abs(amp0), 1e-12))
    p0 = np.array([0.0, 0.0, sigma_px, amp0, bg0, 0.0, 0.0])
    lo = np.array([-half, -half, 0.3, 0.0, -np.inf, -np.inf, -np.inf])
    hi = np.array([half, half, 3.0 * half, np.inf, np.inf, np.inf, np.inf])
    try:
        sol = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac", max_nfev=200)
        sol = least_squares(resid, sol.x, bounds=(lo, hi), x_scale="jac", max_nfev=100,
                            loss="soft_l1", f_scale=3.0 * scale)
    except ValueError:  # non-finite pixels in the window
        return None
    x0, y0, s, a, b, bx, by = (float(v) for v in sol.x)
    if abs(x0) > half - 1 or abs(y0) > half - 1 or a <= 0:
        return None
    wgt = np.clip(patch - b - bx * xx - by * yy, 0.0, None)
    wgt = np.where(np.hypot(xx - x0, yy - y0) <= 2.5 * s, wgt, 0.0)
    total = float(wgt.sum())
    if total <= 0:
        return None
    mx, my = float((wgt * xx).sum() / total), float((wgt * yy).sum() / total)
    cxx = float((wgt * (xx - mx) ** 2).sum() / total)
    cyy = float((wgt * (yy - my) ** 2).sum() / total)
    cxy = float((wgt * (xx - mx) * (yy - my)).sum() / total)
    ev = np.linalg.eigvalsh(np.array([[cxx, cxy], [cxy, cyy]]))
    elong = float(np.sqrt(max(ev[1], 1e-12) / max(ev[0], 1e-12)))
    fitted = resid(sol.x)
    return SpotFit(x=col + x0, y=row + y0, sigma=s, amplitude=a, background=b,
                   rms=float(np.sqrt(np.mean(fitted ** 2))), elongation=elong)
