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

__all__ = ["BlendMode", "Canvas", "FeatherCanvas", "blend_tiles", "plan_canvas"]

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


def _window(data: NDArray[Any], offset_px: tuple[float, float], canvas: Canvas
            ) -> tuple[tuple[int, int, int, int], NDArray[np.float64], NDArray[np.float64],
                       NDArray[np.float32]] | None:
    """A tile resampled into its window (v0, v1, u0, u1) of ``canvas``, with the tile
    coordinates of the window's columns and rows; None when it misses the canvas."""
    h_out, w_out = canvas.shape
    f = canvas.factor
    ox, oy = canvas.origin_px
    h, w = data.shape
    u0, u1, xs = _axis(float(offset_px[0]), w, ox, f, w_out)
    v0, v1, ys = _axis(float(offset_px[1]), h, oy, f, h_out)
    if u1 <= u0 or v1 <= v0:
        return None
    sigma = max(0.0, (f - 1.0) / 2.0)  # anti-aliasing before downsampling (skimage's choice)
    img: NDArray[np.float32] = np.asarray(data, dtype=np.float32)
    if sigma > 0.3:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigma), dtype=np.float32)
    matrix = np.array([[f, 0.0, xs[0]], [0.0, f, ys[0]]])
    warped = np.asarray(cv2.warpAffine(img, matrix, (u1 - u0, v1 - v0),
                                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                       borderMode=cv2.BORDER_REPLICATE), dtype=np.float32)
    return (v0, v1, u0, u1), xs, ys, warped


def _tent(xs: NDArray[np.float64], ys: NDArray[np.float64], shape: tuple[int, int]
          ) -> NDArray[np.float32]:
    """Feather weight: distance to the tile's own edge (a tent), zero outside the tile."""
    h, w = shape
    in_x = (xs >= -1e-6) & (xs <= w - 1 + 1e-6)
    in_y = (ys >= -1e-6) & (ys <= h - 1 + 1e-6)
    wx = np.where(in_x, np.minimum(xs + 1.0, w - xs), 0.0)
    wy = np.where(in_y, np.minimum(ys + 1.0, h - ys), 0.0)
    return np.outer(wy.astype(np.float32), wx.astype(np.float32))


class FeatherCanvas:
    """A feathered blend assembled one tile at a time, for mosaics built while tiles arrive.

    Why: the feathered blend is a weighted sum, so each tile can be added as soon as it is
    acquired (and taken back and added elsewhere if its placement changes), instead of all
    tiles at the end; ``blend_tiles`` with ``mode="feather"`` gives the same result. Channels
    share the placement and so the weights: ``add`` counts a tile's weight with channel 0.
    The blended values are written to ``out`` (C, H, W; default an array of its own, or e.g. a
    file's memory map) by ``settle``, only where tiles were added or taken back since the last
    call, so a caller can keep the output current as it goes and finish with little left.
    """

    def __init__(self, canvas: Canvas, channels: int, out: NDArray[Any] | None = None,
                 fill_value: float = 0.0) -> None:
        self.canvas = canvas
        h, w = canvas.shape
        self.acc = np.zeros((channels, h, w), np.float32)
        self.weight = np.zeros((h, w), np.float32)
        self.out = np.zeros((channels, h, w), np.float32) if out is None else out
        if self.out.shape != self.acc.shape:
            raise ValueError(f"out has shape {self.out.shape}, the canvas {self.acc.shape}")
        self.fill_value = float(fill_value)
        if self.fill_value != 0.0 or out is None:
            self.out[...] = np.float32(self.fill_value)
        self._dirty: list[tuple[int, int, int, int]] = []

    def add(self, channel: int, data: NDArray[Any], offset_px: tuple[float, float],
            sign: float = 1.0) -> None:
        """Blend ``data`` with pixel (0, 0) at ``offset_px`` (common frame); ``sign=-1``
        takes back an earlier ``add`` of the same data at the same offset."""
        self.add_tile({channel: data}, offset_px, sign)

    def add_tile(self, planes: dict[int, NDArray[Any]], offset_px: tuple[float, float],
                 sign: float = 1.0) -> None:
        """``add`` for several channels of one tile: its window and weights computed once."""
        tw: NDArray[np.float32] | None = None
        for channel, data in planes.items():
            placed = _window(data, offset_px, self.canvas)
            if placed is None:
                return
            (v0, v1, u0, u1), xs, ys, warped = placed
            if tw is None:
                tw = _tent(xs, ys, data.shape)
            if sign > 0:
                cv2.accumulateProduct(warped, tw, self.acc[channel, v0:v1, u0:u1])
                if channel == 0:
                    cv2.accumulate(tw, self.weight[v0:v1, u0:u1])
            else:
                cv2.multiply(warped, tw, dst=warped)
                cv2.subtract(self.acc[channel, v0:v1, u0:u1], warped,
                             dst=self.acc[channel, v0:v1, u0:u1])
                if channel == 0:
                    cv2.subtract(self.weight[v0:v1, u0:u1], tw,
                                 dst=self.weight[v0:v1, u0:u1])
            self._dirty.append((v0, v1, u0, u1))

    def settle(self) -> int:
        """Write the blend into ``out`` where it changed since the last call; returns the
        number of windows written."""
        windows, self._dirty = self._dirty, []
        for v0, v1, u0, u1 in dict.fromkeys(windows):
            weight = self.weight[v0:v1, u0:u1]
            covered = weight >= 0.5       # a covered pixel weighs >= 1 (tent edge x edge)
            whole = bool(covered.all())
            for c in range(self.acc.shape[0]):
                out = self.out[c, v0:v1, u0:u1]
                if whole:
                    cv2.divide(self.acc[c, v0:v1, u0:u1], weight, dst=out)
                else:
                    np.copyto(out, np.float32(self.fill_value))
                    np.divide(self.acc[c, v0:v1, u0:u1], weight, out=out, where=covered)
        return len(windows)

    def finish(self) -> NDArray[Any]:
        """Settle what is left and return ``out``."""
        self.settle()
        return self.out


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
