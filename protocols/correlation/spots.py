"""Small round spots in an image: scale-space candidates and sub-pixel Gaussian fits.

Shared by the fLM bead detector (bright spots) and the EM bead detector (dark disks, fed
in as an inverted optical-density image). Both need the same three things: candidates from
a scale-normalised Laplacian of Gaussian at the expected spot size (the matched filter of
a blurred disk), a blob-versus-edge test on the Hessian (edges of holes, bars and cells
give strong responses that are long, not round), and a sub-pixel position from a Gaussian
fit, never a rounded pixel (protocols/correlation/spot_fit.py). Pixel (x, y) = (column, row).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

FloatArray = NDArray[np.float64]


def robust_sd(values: NDArray[np.floating]) -> float:
    """Standard deviation from the median absolute deviation (outliers do not count)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _blurred(image: NDArray[np.floating], sigma_px: float) -> NDArray[np.float32]:
    img = np.ascontiguousarray(image, dtype=np.float32)
    return np.asarray(cv2.GaussianBlur(img, (0, 0), sigma_px, borderType=cv2.BORDER_REPLICATE),
                      np.float32)


def blob_level(image: NDArray[np.floating], sigma_px: float) -> FloatArray:
    """The image smoothed at ``sigma_px``: the local level a spot sits on."""
    return np.asarray(_blurred(image, sigma_px), np.float64)


def blob_response(image: NDArray[np.floating], sigma_px: float) -> FloatArray:
    """Scale-normalised negative LoG: positive and largest at bright blobs of ``sigma_px``.

    Gaussian blur, then the 3x3 Laplacian (OpenCV, float32): the same filter as SciPy's
    ``gaussian_laplace`` to within the discretisation, several times faster on 4k maps.
    """
    lap = cv2.Laplacian(_blurred(image, sigma_px), cv2.CV_32F, ksize=1,
                        borderType=cv2.BORDER_REPLICATE)
    return np.asarray(-(sigma_px ** 2) * lap, np.float64)


def local_noise(response: FloatArray, block_px: int = 64, samples_per_side: int = 32
                ) -> FloatArray:
    """Robust noise of ``response`` per block (MAD), as a full-size map.

    Photon noise makes the film noisier than the bars and a cell brighter than the film,
    so one global threshold is either blind on bright areas or flooded on them. Spots are
    sparse, so each block's median absolute value ignores them. The median is taken over
    at most ``samples_per_side``^2 pixels of each block on a regular sub-grid: the
    response is a blurred image, so neighbouring pixels carry little new information, and
    the full median of a 4k map was half of a square's correlation time.
    """
    h, w = response.shape
    b = max(8, int(block_px))
    step = max(1, b // max(1, int(samples_per_side)))
    b -= b % step  # whole sub-grid cells per block
    bs = b // step
    ny, nx = -(-h // b), -(-w // b)
    sub = np.abs(np.asarray(response[::step, ::step], np.float32))
    need_y, need_x = ny * bs - sub.shape[0], nx * bs - sub.shape[1]
    if need_y > 0 or need_x > 0:
        sub = np.pad(sub, ((0, max(need_y, 0)), (0, max(need_x, 0))), mode="reflect")
    sub = sub[:ny * bs, :nx * bs]
    blocks = sub.reshape(ny, bs, nx, bs).transpose(0, 2, 1, 3).reshape(ny, nx, -1)
    med = 1.4826 * np.median(blocks, axis=2).astype(np.float64)
    # Masked areas (bars) come in as zeros: the floor is taken from blocks with signal,
    # else a mostly masked map would get a floor of ~0 and flood with peaks.
    live = med[med > 0]
    floor = max(float(np.median(live)) * 1e-3 if live.size else 0.0, 1e-12)
    med = np.maximum(ndimage.maximum_filter(med, size=3, mode="nearest"), floor)
    return np.repeat(np.repeat(med, b, axis=0), b, axis=1)[:h, :w]


# For normal noise the 10th percentile of |x| is 0.1257 sigma.
Q10_ABS_PER_SIGMA = 0.1257


def level_noise(response: FloatArray, level: FloatArray, valid: NDArray[np.bool_] | None = None,
                bins: int = 16, stride: int = 3) -> Callable[[FloatArray], FloatArray]:
    """Noise of ``response`` as a function of the local ``level``: a function of level.

    Why: shot noise grows where fewer electrons (or photons) arrive, so in a density
    image the inside of a dark hole, under a cell or near a bar is several times noisier
    than the bright film beside it, at a scale finer than any block map can follow (a
    2 um hole is a few dozen pixels); and the logarithm of few counts has a heavy tail
    that the film's noise does not predict. Sorting (a sub-grid of) pixels by their
    smoothed level into equal-count bins and taking the 10th percentile of |response| per
    bin measures that curve from the image itself, whatever the camera, gain, offset or
    pixel type. The 10th percentile rather than the median: hole edges and fringes share
    the levels of the hole interiors and may fill most of a bin, beads are far sparser.
    Returned as a function so that callers evaluate it at candidate peaks only.
    """
    lv = np.asarray(level, np.float64)[::stride, ::stride]
    rs = np.abs(np.asarray(response, np.float64)[::stride, ::stride])
    if valid is not None:
        keep = np.asarray(valid, bool)[::stride, ::stride]
        lv, rs = lv[keep], rs[keep]
    lv, rs = lv.ravel(), rs.ravel()
    if lv.size < 20 * bins:
        return lambda at: np.zeros(np.shape(at))
    order = np.argsort(lv, kind="stable")
    chunks = np.array_split(order, bins)
    centres = np.array([np.median(lv[c]) for c in chunks])
    sd = np.array([np.percentile(rs[c], 10) / Q10_ABS_PER_SIGMA for c in chunks])
    centres, first = np.unique(centres, return_index=True)
    sd = sd[first]
    return lambda at: np.asarray(np.interp(np.asarray(at, np.float64), centres, sd),
                                 np.float64)


def local_peaks(response: FloatArray, threshold: float | FloatArray, min_distance_px: int,
                valid: NDArray[np.bool_] | None = None, max_peaks: int = 2000
                ) -> NDArray[np.intp]:
    """(row, col) of local maxima above ``threshold``, strongest first."""
    size = 2 * max(1, int(min_distance_px)) + 1
    resp32 = np.ascontiguousarray(response, dtype=np.float32)
    is_max = resp32 == cv2.dilate(resp32, np.ones((size, size), np.uint8),
                                  borderType=cv2.BORDER_REPLICATE)
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
    holes and bars are.
    """
    rc = np.asarray(rc, dtype=np.intp).reshape(-1, 2)
    if len(rc) == 0:
        return np.zeros(0)
    g = _blurred(image, sigma_px)
    r, c = rc[:, 0], rc[:, 1]
    # Sobel second-derivative kernels carry the same factor 4 in all three: ratios are exact.
    a = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)[r, c]
    b = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3, borderType=cv2.BORDER_REPLICATE)[r, c]
    d = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)[r, c]
    half_tr = 0.5 * (a + b).astype(np.float64)
    disc = np.sqrt(np.maximum(0.25 * (a - b).astype(np.float64) ** 2 + d.astype(np.float64) ** 2,
                              0.0))
    l1, l2 = half_tr + disc, half_tr - disc
    ratio = np.minimum(np.abs(l1), np.abs(l2)) / np.maximum(np.maximum(np.abs(l1), np.abs(l2)),
                                                           1e-12)
    return np.where(l1 * l2 > 0, ratio, 0.0)


def distinct_spots(xy: FloatArray, score: FloatArray, min_distance_px: float) -> NDArray[np.intp]:
    """Indices of the spots to keep, best score first, none within ``min_distance_px``
    (at least 1 px) of a better one.

    Why: two candidate peaks of one spot (a defocused bead's ring, a disk's flat top)
    converge to one position when fitted; the better-scored fit stands for the spot.
    """
    limit = max(1.0, float(min_distance_px))
    kept: list[int] = []
    for i in np.argsort(-np.asarray(score), kind="stable"):
        if all(np.hypot(*(xy[i] - xy[j])) > limit for j in kept):
            kept.append(int(i))
    return np.array(kept, dtype=np.intp)
