"""The vignetting a stitched overview repeats in every tile, estimated from the overview.

Why: a tile mosaic dims every tile's corners the same way (by up to a third) and steps
the gain from tile to tile. Where tiles span only ~2 squares a seam runs through most
squares, a kink that the film's per-square planes (atlas_film) cannot follow, and the
film differences that tell the pose (broken squares ~10% brighter) drown: on independent
grid 641004849 ordinary squares spread 10% in log transmission, as much as broken squares
stand out. What repeats with the tile period is the optics, not the specimen (the grid
lattice is rotated against the tiles and its pitch is no divisor of theirs), so folding
the film's log intensity by the tile period and taking medians per position in the tile
and per tile separates the flat field from the film - retrospective flat-field
correction (as BaSiC and CIDRE do for tiled fluorescence), here for the tile grid that
stitching left in one image: on that grid the ordinary squares' spread fell from 0.106 to
0.023 and its 18 broken squares stood 0.09 above them. Nothing is changed when no tile
period explains the film, or when it repeats fewer than MIN_TILES times (the round mesh
edge of a whole-grid EM atlas was once read as a 3-tile field and moved the cover's
answer off the right pose).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

BINS = 24            # positions per tile side at which the flat field is estimated
MIN_TILE_PX = 40     # shortest tile side searched (working pixels: 100 um at 2.5 um)
MIN_TILES = 4        # a period must repeat this often across the image
MIN_EXPLAINED = 0.5  # of the film's column/row profile variance, for a period to count
MIN_AMPLITUDE = 0.03  # log units: a flat field flatter than this is left alone
ROUNDS = 4           # alternations between the in-tile field and the tile gains
# A tile's gain is the median of its film: in a tile of fewer squares than this a broken
# square would be read as the tile's gain (and a lattice seen square-on as tiles).
MIN_TILE_SQUARES = 2.5


@dataclass(frozen=True)
class TileField:
    """The mosaic found: tile period (x, y) in pixels, the log flat field per pixel and the
    metal's level it multiplies the image above."""

    period: tuple[float, float]
    log_gain: FloatArray
    amplitude: float
    dark: float


def _profile(logs: FloatArray, film: BoolArray, axis: int) -> FloatArray:
    """Median log film intensity per column (axis 0) or row (axis 1); NaN where fewer than
    8 film pixels."""
    enough = film.sum(axis=axis) >= 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as meant
        out = np.nanmedian(np.where(film, logs, np.nan), axis=axis)
    return np.where(enough, out, np.nan)


def _period(profile: FloatArray) -> tuple[float, float]:
    """(period, explained variance) of the shortest tile period that explains the profile:
    the profile folded by the period and averaged per fold position, against its spread."""
    x = np.flatnonzero(np.isfinite(profile))
    if len(x) < 4 * MIN_TILE_PX:
        return float("nan"), 0.0
    # The lamp's slow slope and the mesh's round edge across the whole image are no tile's.
    y = profile[x] - np.polyval(np.polyfit(x, profile[x], 2), x)
    var = float(np.mean(y ** 2))
    if var <= 0:
        return float("nan"), 0.0
    n = len(profile)
    scores = []
    for p in np.arange(MIN_TILE_PX, n / MIN_TILES, 0.5):
        b = np.minimum((np.mod(x, p) / p * BINS).astype(int), BINS - 1)
        sums = np.bincount(b, y, BINS)
        counts = np.maximum(np.bincount(b, minlength=BINS), 1)
        fit = (sums / counts)[b]
        scores.append((float(p), 1.0 - float(np.mean((y - fit) ** 2)) / var))
    if not scores:
        return float("nan"), 0.0
    p_best, best = max(scores, key=lambda t: t[1])
    # Multiples of the period explain as much; the tile is the shortest that does.
    for k in (4, 3, 2):
        near = [t for t in scores if abs(t[0] * k / p_best - 1.0) < 0.03]
        if near and max(t[1] for t in near) >= 0.9 * best:
            return max(near, key=lambda t: t[1])
    return p_best, best


def tile_field(img: FloatArray, metal: BoolArray, pitch_px: float) -> TileField | None:
    """The repeated vignetting and tile gains of ``img`` (metal where ``metal``, darker
    than the film), or None when the metal is the brighter, no tile period explains at
    least MIN_EXPLAINED of the film's column and row profiles, the tiles hold fewer than
    MIN_TILE_SQUARES grid squares of ``pitch_px`` or the field varies less than
    MIN_AMPLITUDE."""
    film = ~metal
    if film.sum() < 100 or metal.sum() < 100:
        return None
    dark = float(np.median(img[metal]))
    if dark >= float(np.median(img[film])):
        # Metal brighter than film (reflected light, an inverted montage): the film's level
        # above no known zero, so its gain cannot be told from an offset. Left alone.
        return None
    above = img - dark
    film = film & (above > 0)
    logs = np.log(np.maximum(above, 1e-6))
    px, ex = _period(_profile(logs, film, 0))
    py, ey = _period(_profile(logs, film, 1))
    if not (np.isfinite(px) and np.isfinite(py)) or min(ex, ey) < MIN_EXPLAINED \
            or px * py < MIN_TILE_SQUARES * pitch_px ** 2:
        return None
    h, w = img.shape
    # Position in the tile (in bins) and tile index per column and per row: the tile grid
    # is separable, so nothing per pixel is needed until the film's pixels are picked.
    fx, fy = np.mod(np.arange(w), px) / px * BINS, np.mod(np.arange(h), py) / py * BINS
    bx, by = np.minimum(fx.astype(int), BINS - 1), np.minimum(fy.astype(int), BINS - 1)
    tx, ty = (np.arange(w) // px).astype(int), (np.arange(h) // py).astype(int)
    n_tx = int(tx.max()) + 1
    rr, cc = np.nonzero(film)
    f_pos, f_tile = by[rr] * BINS + bx[cc], ty[rr] * n_tx + tx[cc]
    vals = logs[rr, cc]
    field = np.zeros(BINS * BINS)
    gain = np.zeros((int(ty.max()) + 1) * n_tx)
    for _ in range(ROUNDS):
        field = _medians(vals - gain[f_tile], f_pos, BINS * BINS)
        gain = _medians(vals - field[f_pos], f_tile, len(gain))
    grid = field.reshape(BINS, BINS)
    grid = grid - float(np.median(grid))
    amplitude = float(np.percentile(grid, 95) - np.percentile(grid, 5))
    if amplitude < MIN_AMPLITUDE:
        return None
    # Bilinear between bin centres, wrapping across the tile edge it repeats over.
    cy, cx = np.broadcast_arrays(fy[:, None] - 0.5, fx[None, :] - 0.5)
    smooth = ndimage.map_coordinates(grid, [cy.ravel(), cx.ravel()], order=1,
                                     mode="grid-wrap").reshape(h, w)
    log_gain = smooth + (gain - float(np.median(gain)))[ty[:, None] * n_tx + tx[None, :]]
    return TileField(period=(float(px), float(py)), log_gain=log_gain, amplitude=amplitude,
                     dark=dark)


def _medians(values: FloatArray, labels: NDArray[np.intp], n: int) -> FloatArray:
    """Median of ``values`` per label 0..n-1 (0 where a label has none)."""
    index = np.arange(n)
    med = np.asarray(ndimage.median(values, labels, index), np.float64)
    return np.where(np.bincount(labels, minlength=n) > 0, med, 0.0)


def flatten_tiles(img: FloatArray, metal: BoolArray, pitch_px: float) -> FloatArray:
    """``img`` with its tile mosaic's flat field divided out above the metal's level (the
    image itself when :func:`tile_field` finds none)."""
    tf = tile_field(img, metal, pitch_px)
    if tf is None:
        return img
    return np.asarray(tf.dark + (img - tf.dark) * np.exp(-tf.log_gain), np.float64)
