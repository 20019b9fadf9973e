"""Render placed tiles into one array: feathered or nearest-centre, optionally downsampled.

Placement is a pure translation per tile in a common pixel frame (all tiles share pixel size
and rotation), so each tile is resampled once with ``cv2.warpAffine`` into its own window
of the canvas; nothing ever allocates a canvas-sized temporary per tile, which keeps a
14 x 14 EM atlas or a 5 x 5 LM atlas of 2k tiles within memory.

Output pixel (u, v) has its centre at common-frame pixel ``origin + factor * (u, v)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["BlendMode", "Canvas", "blend_tiles", "plan_canvas"]

BlendMode = Literal["feather", "nearest"]


@dataclass(frozen=True)
class Canvas:
    """Where the output lies in the common tile-pixel frame."""

    origin_px: tuple[float, float]
    factor: float
    shape: tuple[int, int]


def plan_canvas(offsets_px: NDArray[np.float64], shapes: Sequence[tuple[int, int]],
                factor: float) -> Canvas:
    """Smallest canvas holding every tile; ``offsets_px`` (n, 2) are (x, y) of pixel (0, 0)."""
    sizes = np.array([(w - 1, h - 1) for h, w in shapes], dtype=float)
    lo = offsets_px.min(axis=0)
    hi = (offsets_px + sizes).max(axis=0)
    w_out, h_out = (np.floor((hi - lo) / factor + 1e-9) + 1).astype(int)
    return Canvas((float(lo[0]), float(lo[1])), float(factor), (int(h_out), int(w_out)))


def _axis(start: float, n_tile: int, canvas_origin: float, factor: float, n_out: int
          ) -> tuple[int, int, NDArray[np.float64]]:
    """Output index range [u0, u1) touched by a tile, and tile coordinates of those pixels."""
    u0 = max(0, int(np.floor((start - canvas_origin) / factor)))
    u1 = min(n_out, int(np.ceil((start + n_tile - 1 - canvas_origin) / factor)) + 1)
    x = np.asarray(canvas_origin + factor * np.arange(u0, u1) - start, dtype=np.float64)
    return u0, u1, x


def blend_tiles(tiles: Sequence[NDArray[Any]], offsets_px: NDArray[np.float64], canvas: Canvas,
                mode: BlendMode = "feather", fill_value: float = 0.0) -> NDArray[np.float32]:
    """Resample every tile into ``canvas`` and combine overlaps.

    ``feather`` weights each tile by its distance to its own edge (a tent), which hides seams
    from uneven illumination; ``nearest`` gives every output pixel to the tile whose centre is
    nearest (in units of the tile size), which keeps noise statistics of single tiles intact.
    Pixels no tile covers get ``fill_value``.
    """
    h_out, w_out = canvas.shape
    f = canvas.factor
    ox, oy = canvas.origin_px
    acc = np.zeros((h_out, w_out), np.float32)
    weight = np.zeros((h_out, w_out), np.float32)
    sigma = max(0.0, (f - 1.0) / 2.0)  # anti-aliasing before downsampling (skimage's choice)
    for data, (px, py) in zip(tiles, offsets_px, strict=True):
        h, w = data.shape
        u0, u1, xs = _axis(float(px), w, ox, f, w_out)
        v0, v1, ys = _axis(float(py), h, oy, f, h_out)
        if u1 <= u0 or v1 <= v0:
            continue
        img: NDArray[np.float32] = np.asarray(data, dtype=np.float32)
        if sigma > 0.3:
            img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigma), dtype=np.float32)
        matrix = np.array([[f, 0.0, xs[0]], [0.0, f, ys[0]]])
        warped = cv2.warpAffine(img, matrix, (u1 - u0, v1 - v0),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
        in_x = (xs >= -1e-6) & (xs <= w - 1 + 1e-6)
        in_y = (ys >= -1e-6) & (ys <= h - 1 + 1e-6)
        if mode == "feather":
            wx = np.where(in_x, np.minimum(xs + 1.0, w - xs), 0.0)
            wy = np.where(in_y, np.minimum(ys + 1.0, h - ys), 0.0)
            tw = np.outer(wy.astype(np.float32), wx.astype(np.float32))
            cv2.accumulateProduct(warped, tw, acc[v0:v1, u0:u1])
            cv2.accumulate(tw, weight[v0:v1, u0:u1])
        else:
            # weight holds 1 / (1 + normalised centre distance) of the winner so far
            dx = np.abs(xs - (w - 1) / 2.0) / w
            dy = np.abs(ys - (h - 1) / 2.0) / h
            closeness = (1.0 / (1.0 + np.maximum.outer(dy, dx))).astype(np.float32)
            closeness[~np.outer(in_y, in_x)] = 0.0
            win = closeness > weight[v0:v1, u0:u1]
            acc[v0:v1, u0:u1][win] = warped[win]
            weight[v0:v1, u0:u1][win] = closeness[win]
    uncovered = weight <= 0
    if mode == "feather":
        np.divide(acc, weight, out=acc, where=~uncovered)
    np.copyto(acc, np.float32(fill_value), where=uncovered)
    return acc
