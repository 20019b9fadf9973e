"""Small synthetic bead images with known truth, for the bead-detection tests.

Deliberately a different generator from simulators/ (another PSF model, pixel-centred
sampling instead of pixel integration, another hole and bar layout, other noise), so the
detectors are not only checked against the simulator they will be benchmarked on.
Pixel (x, y) = (column, row); pixel centres at integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Rendered:
    """An image and where things really are in it (pixels)."""

    image: NDArray[np.generic]
    beads_px: FloatArray
    extras_px: FloatArray


def render_lm(xy_px: FloatArray, *, shape: tuple[int, int] = (384, 384), sigma_px: float = 1.1,
              peak: float = 3000.0, background: float = 120.0, seed: int = 0,
              extras: list[tuple[float, float, float, float]] | None = None,
              saturate_at: int | None = None) -> Rendered:
    """Bright Gaussian spots on a flat background, Poisson noise, uint16.

    ``extras`` are (x, y, peak, sigma) spots that are not beads (viruses, blobs).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    img = np.full(shape, background, dtype=np.float64)
    spots = [(x, y, peak * rng.uniform(0.85, 1.15), sigma_px) for x, y in xy_px]
    spots += list(extras or [])
    for x, y, a, s in spots:
        r = int(4 * s + 2)
        c0, c1 = max(0, int(x) - r), min(shape[1], int(x) + r + 1)
        r0, r1 = max(0, int(y) - r), min(shape[0], int(y) + r + 1)
        img[r0:r1, c0:c1] += a * np.exp(-((xx[r0:r1, c0:c1] - x) ** 2
                                          + (yy[r0:r1, c0:c1] - y) ** 2) / (2 * s * s))
    out = rng.poisson(img).astype(np.float64) + rng.normal(0, 2.0, shape)
    top = saturate_at if saturate_at is not None else 65535
    out = np.clip(np.rint(out), 0, top).astype(np.uint16)
    extra_xy = np.array([[e[0], e[1]] for e in extras or []]).reshape(-1, 2)
    return Rendered(out, np.asarray(xy_px, float), extra_xy)


def render_em(xy_px: FloatArray, *, shape: tuple[int, int] = (768, 768), radius_px: float = 3.0,
              bead_od: float = 0.5, counts: float = 800.0, seed: int = 0,
              hole_pitch_px: float = 0.0, hole_radius_px: float = 0.0,
              bar_rows: int = 0, extras: list[tuple[float, float, float, float]] | None = None
              ) -> Rendered:
    """Dark projected spheres on film (optical density), optional bright hole lattice and a
    dark bar along the top, Poisson counts, float32.

    ``extras`` are (x, y, radius_px, od) spheres that are not beads (contamination).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    od = 0.25 + 0.05 * np.sin(xx / 150.0) * np.cos(yy / 210.0)   # uneven ice
    if hole_pitch_px > 0:
        t = np.deg2rad(17.0)
        u = (xx * np.cos(t) + yy * np.sin(t)) / hole_pitch_px
        v = (-xx * np.sin(t) + yy * np.cos(t)) / hole_pitch_px
        d = np.hypot(u - np.rint(u), v - np.rint(v)) * hole_pitch_px
        od -= 0.2 * np.clip(hole_radius_px - d + 0.5, 0, 1)       # no carbon in the holes
        od += 0.3 * np.exp(-0.5 * ((d - hole_radius_px - 1.5) / 1.2) ** 2)  # defocus fringe
    spheres = [(x, y, radius_px, bead_od) for x, y in xy_px] + list(extras or [])
    for x, y, r, dens in spheres:
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        od += dens * np.sqrt(np.clip(1.0 - d2 / (r * r), 0.0, None))
    img = counts * np.exp(-od)
    if bar_rows:
        img[:bar_rows] = 0.0
    out = rng.poisson(img).astype(np.float32)
    extra_xy = np.array([[e[0], e[1]] for e in extras or []]).reshape(-1, 2)
    return Rendered(out, np.asarray(xy_px, float), extra_xy)


def spread_points(seed: int, n: int, lo: float, hi: float, min_dist: float) -> FloatArray:
    """``n`` random points in [lo, hi)^2 at least ``min_dist`` apart."""
    rng = np.random.default_rng(seed)
    pts: list[FloatArray] = []
    while len(pts) < n:
        p = rng.uniform(lo, hi, 2)
        if all(np.hypot(*(p - q)) >= min_dist for q in pts):
            pts.append(p)
    return np.array(pts)
