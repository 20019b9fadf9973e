"""A small synthetic EM grid rendered as an LM-like and an EM-like overview, for atlas tests.

Not the simulator, on purpose (the atlas code must not depend on one grid design): bars and a
round mesh, a chiral 'L'+dot centre mark, finder glyphs (small L-shapes in random squares
and orientations), notches on random bars; the EM view adds torn (bright) and thick-ice
(dark) squares and cells as dark blobs, the LM view faint cells and uneven illumination
(in reflected light, "lm_reflected": bright metal, dim film, cells dimmer still, which
with the metal bright is the opposite sign to the EM's).
Edges are block-sampled. ``marks=False`` leaves no chiral metal; with ``film=False`` as
well (no cells, torn or thick-ice squares) the grid has no chiral content at all.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
PITCH_UM, BAR_UM, MESH_R_UM, GRID_R_UM = 125.0, 35.0, 1300.0, 1525.0


def _square_table(seed: int, n: int = 32) -> dict[str, NDArray[np.float64]]:
    """Per-square random properties, indexed [i + n, j + n]."""
    rng = np.random.default_rng(seed)
    shape = (2 * n + 1, 2 * n + 1)
    return {"glyph": (rng.random(shape) < 0.15).astype(float),
            "glyph_rot": rng.integers(0, 4, shape).astype(float),
            "notch": (rng.random(shape) < 0.3).astype(float),
            "notch_pos": rng.uniform(-35, 35, shape),
            "state": rng.choice([0.0, 1.0, 2.0], size=shape, p=[0.85, 0.08, 0.07]),
            "cell": (rng.random(shape) < 0.12).astype(float),
            "cell_xy": rng.uniform(-25, 25, shape + (2,))}


def grid_metal(g: FloatArray, seed: int = 0, marks: bool = True) -> NDArray[np.bool_]:
    """Metal at grid-frame points g (..., 2) um: bars, rim and (with ``marks``) the centre
    mark, finder glyphs and bar notches."""
    x, y = g[..., 0], g[..., 1]
    i, j = np.rint(x / PITCH_UM), np.rint(y / PITCH_UM)
    lx, ly = x - i * PITCH_UM, y - j * PITCH_UM              # within the square, centred
    half_open = (PITCH_UM - BAR_UM) / 2
    metal = (np.abs(lx) > half_open) | (np.abs(ly) > half_open) | (np.hypot(x, y) > MESH_R_UM)
    if not marks:
        return np.asarray(metal)
    metal |= ((np.abs(x + 20) < 7) & (np.abs(y) < 32)) | ((np.abs(y + 25) < 7) & (x > -27)
                                                          & (x < 26))
    metal |= np.hypot(x - 20, y - 20) < 9
    t = _square_table(seed)
    n = (t["glyph"].shape[0] - 1) // 2
    ii = np.clip(i.astype(int) + n, 0, 2 * n)
    jj = np.clip(j.astype(int) + n, 0, 2 * n)
    centre = (i == 0) & (j == 0)
    rot = t["glyph_rot"][ii, jj]
    # A 30 um 'L' in one corner of the opening, turned by rot * 90 deg: chiral in any pose.
    u = np.where(rot % 2 == 0, lx, ly) * np.where(rot < 2, 1, -1)
    v = np.where(rot % 2 == 0, ly, -lx) * np.where(rot < 2, 1, -1)
    glyph = ((u > 10) & (u < 20) & (v > -35) & (v < 0)) | ((u > 10) & (u < 40) & (v > -35)
                                                           & (v < -25))
    metal |= glyph & (t["glyph"][ii, jj] > 0) & ~centre
    notch = (np.abs(lx - t["notch_pos"][ii, jj]) < 6) & (ly < -half_open + 8) & (ly > -half_open)
    metal |= notch & (t["notch"][ii, jj] > 0) & ~centre
    return np.asarray(metal)


def render_overview(linear: FloatArray, shift_um: FloatArray, pixel_um: float, size: int,
                    modality: str, seed: int = 0, marks: bool = True, film: bool = True,
                    cells: bool = True) -> NDArray[np.float32]:
    """An overview image whose pixel p shows grid point ``linear^-1 (p * px - shift)``.

    The grid content (marks, squares' states, cells) depends on ``seed`` only, so the LM
    and EM views of one grid share it; the noise differs by modality. ``cells=False``
    leaves this view's cells out (a modality that does not show them).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    q = np.stack([xx, yy], -1) * pixel_um - shift_um
    g = q @ np.linalg.inv(linear).T
    metal = grid_metal(g, seed=seed, marks=marks)
    inside = np.hypot(g[..., 0], g[..., 1]) < GRID_R_UM
    t = _square_table(seed)
    n = (t["state"].shape[0] - 1) // 2
    ii = np.clip(np.rint(g[..., 0] / PITCH_UM).astype(int) + n, 0, 2 * n)
    jj = np.clip(np.rint(g[..., 1] / PITCH_UM).astype(int) + n, 0, 2 * n)
    local = g - np.stack([np.rint(g[..., 0] / PITCH_UM), np.rint(g[..., 1] / PITCH_UM)],
                         -1) * PITCH_UM
    cell = (t["cell"][ii, jj] > 0) & (np.linalg.norm(local - t["cell_xy"][ii, jj], axis=-1) < 22)
    cell &= film & cells
    rng = np.random.default_rng(seed + (1 if modality == "lm" else 2))
    if modality in ("lm", "lm_reflected"):
        light = 1.0 - 0.25 * (np.hypot(xx - 0.3 * size, yy - 0.6 * size) / size) ** 2
        img = np.where(metal & inside, 0.05, np.where(cell, 0.9, 1.0)) * light
        if modality == "lm_reflected":  # metal bright; broken or thick film looks alike
            img = np.where(metal & inside, 1.0, np.where(cell, 0.13, 0.2)) * light
    else:
        state = t["state"][ii, jj] * film
        film = np.where(state == 1, 1.0, np.where(state == 2, 0.12, 0.7))
        img = np.where(metal | ~inside, 0.0, np.where(cell, 0.25, film))
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0)
    return np.asarray(img * 1000 + rng.normal(0, 20, img.shape), np.float32)
