"""Flat-field estimate for transmitted-light tiles: one smooth illumination for all tiles.

Why: the illumination falls off towards the corners of the field (several percent on a
widefield stand), which leaves seams in the atlas and, worse, is as large as the ~3 %
brightness step that tells a torn (broken) film from an intact one. Every tile is the same
specimen-independent illumination times what lies under it, so a shared smooth field can be
fitted from the tiles themselves: log I = log s_tile + log F(x, y), with F a quadratic in the
tile's normalised coordinates and one offset per tile, over the bright (open, not metal)
pixels, with the worst-fitting pixels trimmed and the fit repeated (cells, bar edges).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["estimate_flat_field"]


def _basis(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.column_stack([x, y, x * x, y * y, x * y])


def estimate_flat_field(tiles: Sequence[NDArray[np.generic]], *, samples: int = 48,
                        min_tiles: int = 4, open_fraction: float = 0.6,
                        trim_iterations: int = 3) -> NDArray[np.float32] | None:
    """Relative illumination (mean 1) of the tiles' shape, or None with too few tiles.

    Pixels count as open when brighter than ``open_fraction`` of their tile's 95th
    percentile; tiles with fewer than 5 % open pixels are left out (all metal).
    """
    if len(tiles) < min_tiles:
        return None
    h, w = np.asarray(tiles[0]).shape
    step = max(1, min(h, w) // samples)
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    xn = (xs.ravel() - (w - 1) / 2) / ((w - 1) / 2)
    yn = (ys.ravel() - (h - 1) / 2) / ((h - 1) / 2)
    rows_x: list[NDArray[np.float64]] = []
    rows_y: list[NDArray[np.float64]] = []
    vals: list[NDArray[np.float64]] = []
    tile_of: list[NDArray[np.int_]] = []
    used = 0
    for tile in tiles:
        sub = np.asarray(tile, dtype=np.float64)[::step, ::step].ravel()
        bright = sub > open_fraction * np.percentile(sub, 95)
        if bright.mean() < 0.05:
            continue
        rows_x.append(xn[bright])
        rows_y.append(yn[bright])
        vals.append(np.log(np.clip(sub[bright], 1e-6, None)))
        tile_of.append(np.full(int(bright.sum()), used))
        used += 1
    if used < min_tiles:
        return None
    x, y = np.concatenate(rows_x), np.concatenate(rows_y)
    v, t = np.concatenate(vals), np.concatenate(tile_of)
    basis = _basis(x, y)
    keep = np.ones(len(v), dtype=bool)
    coef: NDArray[np.float64] = np.zeros(5)
    for _ in range(trim_iterations + 1):
        # the per-tile offsets are eliminated by centring each tile's kept rows (the same
        # least-squares solution as with one column per tile, at a fifth of the cost)
        n = np.maximum(np.bincount(t[keep], minlength=used), 1)
        mean_v = np.bincount(t[keep], v[keep], minlength=used) / n
        mean_b = np.column_stack([np.bincount(t[keep], basis[keep, k], minlength=used) / n
                                  for k in range(5)])
        coef = np.asarray(np.linalg.lstsq(basis[keep] - mean_b[t[keep]],
                                          v[keep] - mean_v[t[keep]], rcond=None)[0],
                          dtype=np.float64)
        offsets = mean_v - mean_b @ coef
        res = np.abs(basis @ coef + offsets[t] - v)
        keep = res <= max(3.0 * 1.4826 * float(np.median(res[keep])), 1e-4)
    xf = ((np.arange(w) - (w - 1) / 2) / ((w - 1) / 2))[None, :]
    yf = ((np.arange(h) - (h - 1) / 2) / ((h - 1) / 2))[:, None]
    a, b, c, d, e = coef[:5]
    field = np.exp(a * xf + b * yf + c * xf * xf + d * yf * yf + e * xf * yf)
    out: NDArray[np.float32] = (field / field.mean()).astype(np.float32)
    return out
