"""What 100x fluorescence z-stacks show, measured once for inspection, targets and ranking.

Square inspection (protocols/lm_inspection.py) and target extraction
(protocols/target_extraction.py) look at the same things in the same channels: diffraction
limited spots (viruses in 488, beads in 405), the cell tracker (640) and where one visit of
a position sits against another. They share these functions so that a bead counted when a
square was chosen is the bead that later bounds its targets:

- ``max_projection``: the 3D -> 2D projection AutoCLEM uses (the EM sees a projection too);
- ``detect_spots``: Laplacian-of-Gaussian spots with sub-pixel centres;
- ``cell_masks``: the cell and its thin periphery in a 640 projection;
- ``register_visits``: the offset between two visits of one position. The stage lands ~1 um
  elsewhere at every visit while images carry the commanded position; the structures of
  the cell channel (or the film and bar edges in any channel) do not change in minutes, so
  correlating projections measures the miss to a tenth of a pixel;
- ``beads_off_cell`` and ``outside_hull_um``: beads under a cell are seen by the light
  microscope but hidden in the EM map by the cell's mass, so only beads off the cell bound
  the targets a bead correlation can reach without extrapolating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from drivers.imaging import Image
from protocols.plan import InvalidStep

__all__ = ["Registration", "Spots", "beads_off_cell", "cell_masks", "detect_spots",
           "max_projection", "outside_hull_um", "register_visits"]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class Spots:
    """Detected spots: ``xy_px`` (N, 2) as (column, row) sub-pixel, strongest first."""

    xy_px: FloatArray
    score: FloatArray
    amplitude: FloatArray

    def __len__(self) -> int:
        return int(self.xy_px.shape[0])


def max_projection(images: Sequence[Image], channel: str
                   ) -> tuple[FloatArray, FloatArray, Image]:
    """MIP of one channel's z planes, the z (um) of each pixel's maximum, and one plane."""
    planes = [im for im in images if im.channel == channel]
    if not planes:
        raise InvalidStep(f"no {channel!r} planes to project (channels: "
                          f"{sorted({im.channel or '' for im in images})})")
    stack = np.stack([np.asarray(im.data, dtype=np.float64) for im in planes])
    arg = np.argmax(stack, axis=0)
    zs = np.array([np.nan if im.z_um is None else float(im.z_um) for im in planes])
    return stack.max(axis=0), zs[arg], planes[0]


def _robust_sd(values: FloatArray) -> float:
    v = values.ravel()
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def detect_spots(image: FloatArray, sigma_px: float, threshold_sigmas: float,
                 min_separation_px: float, edge_margin_px: int = 4) -> Spots:
    """LoG candidates sized to a diffraction-limited spot, local maxima above
    ``threshold_sigmas`` robust noise levels, centres by a Gaussian through the
    log-intensity of each peak and its neighbours (exact for a Gaussian spot, never rounded
    pixels); score = LoG response / noise."""
    img = np.asarray(image, dtype=np.float64)
    resp = -(sigma_px ** 2) * ndimage.gaussian_laplace(img, sigma_px, mode="nearest")
    noise = _robust_sd(resp) or 1e-12
    size = 2 * max(1, round(min_separation_px)) + 1
    peaks = (resp == ndimage.maximum_filter(resp, size=size, mode="nearest"))
    peaks &= resp > threshold_sigmas * noise
    m = max(2, edge_margin_px)
    peaks[:m], peaks[-m:], peaks[:, :m], peaks[:, -m:] = False, False, False, False
    rc = np.argwhere(peaks)
    smooth = ndimage.gaussian_filter(img, 0.5)
    background = float(np.median(img))
    xy, score, amp = [], [], []
    for r, c in rc:
        dx = _log_parabola(smooth[r, c - 1:c + 2] - background)
        dy = _log_parabola(smooth[r - 1:r + 2, c] - background)
        xy.append((c + dx, r + dy))
        score.append(resp[r, c] / noise)
        amp.append(img[r, c] - background)
    if not xy:
        return Spots(np.zeros((0, 2)), np.zeros(0), np.zeros(0))
    order = np.argsort(-np.asarray(score), kind="stable")
    return Spots(np.asarray(xy)[order], np.asarray(score)[order], np.asarray(amp)[order])


def _log_parabola(v: FloatArray) -> float:
    """Offset of a Gaussian's peak from the middle of three samples (in samples)."""
    a = np.log(np.clip(v, 1e-6, None))
    denom = a[0] - 2 * a[1] + a[2]
    if denom >= 0:
        return 0.0
    return float(np.clip(0.5 * (a[0] - a[2]) / denom, -0.5, 0.5))


def cell_masks(mip: FloatArray, pixel_um: float) -> tuple[BoolArray, BoolArray]:
    """Cell (above background) and thin-cell (periphery, below half the brightest level)
    masks of a 640 projection."""
    sm = ndimage.gaussian_filter(mip, max(1.0, 0.5 / pixel_um))
    bg = float(np.percentile(sm, 5))
    noise = float(1.4826 * np.median(np.abs(mip - np.median(mip)))) or 1.0
    top = float(np.percentile(sm, 99.5))
    level = bg + max(0.1 * (top - bg), 6 * noise / max(1.0, 0.5 / pixel_um))
    cell = ndimage.binary_opening(sm > level, iterations=2)
    thin = cell & (sm < bg + 0.5 * (top - bg))
    return np.asarray(cell, dtype=bool), np.asarray(thin, dtype=bool)


@dataclass(frozen=True)
class Registration:
    """``offset_px`` (dx, dy) to add to a point of the moving visit to find it in the
    reference; ``score`` the normalised correlation of the band-passed projections once
    aligned (1 = identical, ~0 = unrelated)."""

    offset_px: FloatArray
    score: float


def register_visits(reference: FloatArray, moving: FloatArray, pixel_um: float,
                    max_shift_um: float = 5.0) -> Registration:
    """Offset between two projections of one position, to a tenth of a pixel, and how well
    they agree once aligned (so a caller can refuse an unrelated pair).

    Why not FFT phase correlation: the cell channel is smooth and bright at some edges of
    the field, and a circular correlation of non-periodic images peaks near zero shift
    (measured: a 0.26 um miss read as 0). Instead the moving projection less a
    ``max_shift_um`` border is slid over the reference (normalised cross-correlation, no
    wrap-around), both band-passed (1 px to 1 um) so that uneven illumination, which stays
    with the camera, does not pull the answer to zero; the peak is refined by parabolas.
    A peak on the search border means the miss was larger than ``max_shift_um``: score 0.
    """
    ref = np.asarray(reference, dtype=np.float64)
    mov = np.asarray(moving, dtype=np.float64)
    if ref.shape != mov.shape:
        raise InvalidStep(f"cannot register visits of different shapes {ref.shape} and "
                          f"{mov.shape}")
    border = max(2, int(np.ceil(max_shift_um / pixel_um)))
    if 2 * border + 8 > min(ref.shape):
        raise InvalidStep(f"a {ref.shape} projection is too small to search +-{max_shift_um:g} "
                          f"um at {pixel_um:g} um/px")
    hi = max(5.0, 1.0 / pixel_um)
    a = _band_pass(ref, hi)
    b = _band_pass(mov, hi)[border:-border, border:-border]
    ncc = cv2.matchTemplate(a, b, cv2.TM_CCOEFF_NORMED)
    iy, ix = (int(v) for v in np.unravel_index(int(np.argmax(ncc)), ncc.shape))
    score = float(ncc[iy, ix])
    if ix in (0, ncc.shape[1] - 1) or iy in (0, ncc.shape[0] - 1):
        return Registration(np.array([float(ix - border), float(iy - border)]), 0.0)
    dx = _parabola(ncc[iy, ix - 1], ncc[iy, ix], ncc[iy, ix + 1])
    dy = _parabola(ncc[iy - 1, ix], ncc[iy, ix], ncc[iy + 1, ix])
    return Registration(np.array([ix + dx - border, iy + dy - border]), score)


def _band_pass(image: FloatArray, hi_px: float) -> NDArray[np.float32]:
    out = ndimage.gaussian_filter(image, 1.0) - ndimage.gaussian_filter(image, hi_px)
    return np.asarray(out, dtype=np.float32)


def _parabola(m: float, c: float, p: float) -> float:
    """Offset of a parabola's vertex through three samples from the middle one."""
    d = float(m - 2 * c + p)
    return 0.0 if d >= 0 else float(np.clip(0.5 * (m - p) / d, -0.5, 0.5))


def beads_off_cell(beads_px: FloatArray, cell: BoolArray, margin_px: float) -> BoolArray:
    """Which beads lie at least ``margin_px`` away from the cell mask."""
    pts = np.asarray(beads_px, dtype=np.float64).reshape(-1, 2)
    if not cell.any():
        return np.ones(len(pts), dtype=bool)
    dist = ndimage.distance_transform_edt(~cell)
    h, w = cell.shape
    c = np.clip(np.rint(pts[:, 0]).astype(int), 0, w - 1)
    r = np.clip(np.rint(pts[:, 1]).astype(int), 0, h - 1)
    return np.asarray(dist[r, c] >= margin_px, dtype=bool)


def outside_hull_um(points: FloatArray, hull_points: FloatArray, pixel_um: float
                    ) -> FloatArray:
    """Distance (um) of each point outside the convex hull of ``hull_points`` (0 inside);
    points and hull in pixels. Without a hull (fewer than 3 points, or all on a line) every
    point is infinitely far out: nothing bounds it."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    hp = np.asarray(hull_points, dtype=np.float64).reshape(-1, 2)
    if len(hp) < 3:
        return np.full(len(pts), np.inf)
    try:
        hull = ConvexHull(hp)
    except QhullError:
        return np.full(len(pts), np.inf)
    poly = hp[hull.vertices]
    inside = np.all(pts @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip(np.einsum("pkj,kj->pk", pts[:, None, :] - a[None], ab)
                / np.maximum(np.einsum("kj,kj->k", ab, ab), 1e-12), 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    dist = np.hypot(*(pts[:, None, :] - nearest).transpose(2, 0, 1)).min(axis=1)
    out: FloatArray = np.where(inside, 0.0, dist * pixel_um)
    return out
