"""Film transmission per square with the illumination taken out (atlas_film.py): a broken
square 10% brighter than intact film must stand out under tile vignetting that dims each
tile's corners by a third, which comparing a square's level with its neighbours' does not
survive.

Tiles here span 5.4 squares, as a 20x camera field does. With fewer squares per tile more
squares have a seam through them (the illumination's kink, which a plane cannot follow):
at 4 squares per tile intact squares scatter by 0.020 (0.084 comparing with neighbours),
at 2 by 0.09 either way, as much as the signal.

The same plane fits tell how much of a square something covers (cells, dirt), darker or
brighter than the film.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from protocols.correlation.atlas_film import with_film
from protocols.correlation.atlas_lattice import lattice_cells, metal_mask, with_brightness
from tests.protocols.grid_render import PITCH_UM, grid_metal

PX_UM = 2.5
SIZE = 900
TILE_PX = 270  # a stitched tile of 675 um: a 20x field (2048 x 0.33 um), 5.4 squares


def _overview(seed: int, broken: float, cell: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Transmitted-light overview (rotated grid) and which squares are torn (or, with
    ``cell``, carry a cell of that relative contrast instead: a 25 um disk off-centre)."""
    rng = np.random.default_rng(seed)
    t = np.deg2rad(17.0)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    g = (np.stack([xx, yy], -1) * PX_UM - SIZE * PX_UM / 2) @ rot.T
    metal = grid_metal(g, marks=False)
    ij = np.rint(g / PITCH_UM).astype(int)
    torn = rng.random((64, 64)) < 0.12
    is_torn = torn[ij[..., 0] + 32, ij[..., 1] + 32]
    film = np.where(metal, 0.03, np.where(is_torn, 1.0 + broken, 1.0))
    if cell:
        local = g - ij * PITCH_UM - 15.0
        film = np.where(~metal & is_torn & (np.hypot(local[..., 0], local[..., 1]) < 25.0),
                        1.0 + cell, np.where(metal, 0.03, 1.0))
    fx, fy = (xx % TILE_PX) / TILE_PX - 0.5, (yy % TILE_PX) / TILE_PX - 0.5
    gain = rng.normal(1.0, 0.03, (SIZE // TILE_PX + 1,) * 2)
    light = (1 - 0.35 * 2 * (fx ** 2 + fy ** 2)) * gain[(yy // TILE_PX).astype(int),
                                                        (xx // TILE_PX).astype(int)]
    light *= 1 + 0.2 * (xx / SIZE - 0.5)
    img = cv2.GaussianBlur((film * light).astype(np.float32), (0, 0), 1.0)
    img = rng.poisson(img * 2000).astype(np.float32)
    return img, torn


def _square_values(seed: int, broken: float, cell: float = 0.0):  # type: ignore[no-untyped-def]
    img, torn = _overview(seed, broken, cell)
    dark = metal_mask(img.astype(np.float64), PX_UM, 40.0, 400.0)
    cells = with_film(with_brightness(lattice_cells(dark, PX_UM, 20, 40.0, 400.0, 12), img,
                                      dark), img)
    assert cells.film is not None
    # Which squares are torn: the centre of each cell back in grid micrometres.
    rows, cols = cells.shape
    r, c = np.mgrid[:rows, :cols]
    xy = np.stack([c + cells.lo[0], r + cells.lo[1], np.ones_like(r)], -1) @ cells.index_to_px
    t = np.deg2rad(17.0)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    ij = np.rint(((xy * PX_UM - SIZE * PX_UM / 2) @ rot.T) / PITCH_UM).astype(int)
    is_torn = torn[np.clip(ij[..., 0] + 32, 0, 63), np.clip(ij[..., 1] + 32, 0, 63)]
    return cells, is_torn


def _clean_and_marked(values: np.ndarray | None, marked: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Measured values of unmarked and of marked squares, after checking there are enough."""
    assert values is not None
    measured = np.isfinite(values)
    assert measured.sum() > 80
    clean, hit = values[measured & ~marked], values[measured & marked]
    assert len(hit) >= 6
    return clean, hit


def test_a_broken_square_stands_out_of_tile_vignetting() -> None:
    cells, torn = _square_values(3, 0.10)
    ok, br = _clean_and_marked(cells.film, torn)
    measured = np.isfinite(cells.film)
    spread = 1.4826 * np.median(np.abs(ok - np.median(ok)))
    # log(1.1) = 0.095 above intact film; intact squares scatter by well under a third of it.
    assert abs(np.median(br) - np.median(ok) - np.log(1.1)) < 0.02
    assert spread < 0.025, spread
    assert np.mean(br > np.percentile(ok, 95)) > 0.9
    # A square's level against its 8 neighbours' median keeps the vignetting: the same
    # squares scatter as much as the signal, and torn ones hide among intact ones.
    b = cells.brightness - cells.metal_level
    b[b <= 0] = np.nan
    pad = np.pad(b, 1, constant_values=np.nan)
    neigh = np.stack([pad[1 + dr:1 + dr + b.shape[0], 1 + dc:1 + dc + b.shape[1]]
                      for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods
        naive = np.log(b / np.nanmedian(neigh, axis=0))
    n_ok = naive[measured & ~torn]
    n_ok = n_ok[np.isfinite(n_ok)]
    assert 1.4826 * np.median(np.abs(n_ok - np.median(n_ok))) > 3 * spread


def test_intact_film_alone_shows_no_broken_squares() -> None:
    """The same vignetting with no film difference: few squares stand out by half a broken
    square's step (those with a seam through them; 3-4% measured)."""
    cells, _ = _square_values(3, 0.0)
    film = cells.film
    assert film is not None
    vals = film[np.isfinite(film)]
    assert len(vals) > 80
    assert np.mean(np.abs(vals - np.median(vals)) > 0.05) < 0.06


@pytest.mark.parametrize("cell", [-0.2, 0.12], ids=["darker", "brighter"])
def test_cells_cover_part_of_their_squares_whichever_their_contrast(cell: float) -> None:
    """A cell covering a sixth of a square, 20% darker (transmitted light) or 12% brighter
    (reflected light), under the same vignetting: its square's cover stands above every
    clean one, and clean squares' cover is the few % of noise samples."""
    cells, has_cell = _square_values(5, 0.0, cell)
    clean, covered = _clean_and_marked(cells.cover, has_cell)
    # A 25 um disk in the 72 um sampled part of the opening: about a third of the samples.
    assert 0.15 < np.median(covered) < 0.45, np.median(covered)
    assert np.percentile(clean, 95) < 0.06  # measured 0.035-0.049 (squares with a seam)
    assert np.mean(covered > np.percentile(clean, 99)) > 0.9
