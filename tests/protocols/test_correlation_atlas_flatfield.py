"""The tile mosaic's flat field: found where tiles repeat their vignetting, absent elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from protocols.correlation.atlas_flatfield import flatten_tiles, tile_field
from tests.protocols.independent_grids import answered_right

PITCH = 50.0  # px


def _grid(n: int = 600, pitch: float = PITCH, angle: float = 0.35, bar: float = 15.0,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(transmission, metal, broken) of a rotated square mesh; 10% of squares broken
    (10% brighter), every square's film within 1% of the others."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * xx + s * yy) / pitch, (-s * xx + c * yy) / pitch
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - iu, v - iv
    half = 0.5 * bar / pitch
    metal = (fu < half) | (fu > 1 - half) | (fv < half) | (fv > 1 - half)
    keys = (iu + 100) * 1000 + (iv + 100)
    uniq, inv = np.unique(keys, return_inverse=True)
    level = 1 + rng.normal(0, 0.01, len(uniq))
    broken_sq = rng.random(len(uniq)) < 0.1
    level[broken_sq] *= 1.1
    t = np.where(metal, 0.03, level[inv.reshape(keys.shape)])
    return t, metal, ~metal & broken_sq[inv.reshape(keys.shape)]


def _mosaic(t: np.ndarray, tiles: int, vignette: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = t.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    th, tw = h / tiles, w / tiles
    fy, fx = (yy % th) / th - 0.5, (xx % tw) / tw - 0.5
    steps = rng.normal(1, 0.04, (tiles + 1, tiles + 1))
    gain = (1 - 2 * vignette * (fx ** 2 + fy ** 2)) * steps[(yy // th).astype(int),
                                                           (xx // tw).astype(int)]
    lamp = 1 + 0.2 * (xx / w - 0.5)
    return np.asarray(rng.poisson(t * gain * lamp * 2000) + 100.0, np.float64)


def _film_spread(img: np.ndarray, metal: np.ndarray, broken: np.ndarray) -> tuple[float, float]:
    """(spread of ordinary film, broken film's lead over it), log units, away from bars."""
    core = ~ndimage.binary_dilation(metal, iterations=4)
    dark = float(np.median(img[metal]))
    logs = np.log(np.maximum(img - dark, 1.0))
    ok, br = logs[core & ~broken], logs[core & broken]
    return float(np.std(ok)), float(np.median(br) - np.median(ok))


@pytest.mark.parametrize("tiles", [5, 6])
def test_a_mosaic_s_repeated_vignetting_is_found_and_divided_out(tiles: int) -> None:
    """Tiles two squares wide, 40% darker corners, 4% gain steps, a lamp slope: the
    broken squares' 10% drowns in the vignetting until the flat field is divided out."""
    t, metal, broken = _grid()
    img = _mosaic(t, tiles, 0.4)
    tf = tile_field(img, metal, PITCH)
    assert tf is not None
    assert tf.period == pytest.approx((600 / tiles, 600 / tiles), rel=0.02)
    before, lead_before = _film_spread(img, metal, broken)
    after, lead = _film_spread(flatten_tiles(img, metal, PITCH), metal, broken)
    assert before > lead_before                      # the signal was below the spread
    # after: pixel noise (2%) and the lamp slope (+-10%, the film planes take it) are left
    assert after < 0.3 * before and lead > 2.5 * after


def test_an_image_without_tiles_is_left_alone() -> None:
    """One frame (no mosaic), only the lamp's slope: no tile period, nothing changed."""
    t, metal, _ = _grid(seed=2)
    img = _mosaic(t, 1, 0.0)
    assert tile_field(img, metal, PITCH) is None
    assert flatten_tiles(img, metal, PITCH) is img


def test_tiles_of_one_square_are_not_taken_apart_from_the_film() -> None:
    """A lattice seen square-on under tiles one pitch wide: each tile's gain would be its
    square's film (broken squares included), so no flat field is taken."""
    t, metal, _ = _grid(angle=0.0, seed=3)
    img = _mosaic(t, 12, 0.4)
    assert tile_field(img, metal, PITCH) is None
    assert tile_field(img, metal, PITCH / 2) is not None  # the same tiles, 4 squares each


def test_an_independent_grid_whose_film_drowned_in_tile_vignetting_is_answered_right(
        ) -> None:
    """benchmarks/correlation_independent_atlas.py grid 641004849 (seed 2): six tiles of
    ~2 squares a side in the LM; its 18 broken squares were refused as noise."""
    answered_right(641004849)
