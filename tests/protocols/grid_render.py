"""A small synthetic EM grid (bars, round mesh, a chiral centre mark, random marks on bars,
a few broken squares) rendered as an LM-like and an EM-like overview, for atlas tests.

Not the simulator: other mark shapes, no finder-code layout, block-sampled edges.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


def grid_metal(g: FloatArray, pitch: float = 125.0, bar: float = 35.0, mesh_r: float = 1300.0,
               seed: int = 0) -> NDArray[np.bool_]:
    """Metal at grid-frame points g (..., 2) um: bars, rim, an 'L'+dot centre mark, and
    random blocks on bars (a different finder pattern than the simulator's)."""
    rng = np.random.default_rng(seed)
    x, y = g[..., 0], g[..., 1]
    fx, fy = x / pitch - np.rint(x / pitch), y / pitch - np.rint(y / pitch)
    metal = (np.abs(fx) * pitch > (pitch - bar) / 2) | (np.abs(fy) * pitch > (pitch - bar) / 2)
    metal |= np.hypot(x, y) > mesh_r
    metal |= ((np.abs(x + 20) < 6) & (np.abs(y) < 30)) | ((np.abs(y + 24) < 6) & (x > -26)
                                                          & (x < 25))
    metal |= np.hypot(x - 20, y - 20) < 7
    for cx, cy in rng.uniform(-mesh_r, mesh_r, (300, 2)):
        bx = (np.rint(cx / pitch) + 0.5) * pitch - 0.5 * (pitch - bar) / 2 * 0
        metal |= (np.abs(x - bx + pitch / 2 - bar / 2 - 3) < 3) & (np.abs(y - cy) < 4)
    return np.asarray(metal)


def render_overview(linear: FloatArray, shift_um: FloatArray, pixel_um: float, size: int,
                    modality: str, seed: int = 0) -> NDArray[np.float32]:
    """An overview image whose pixel p shows grid point ``linear^-1 (p * px - shift)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    q = np.stack([xx, yy], -1) * pixel_um - shift_um
    g = q @ np.linalg.inv(linear).T
    metal = grid_metal(g, seed=seed)
    inside = np.hypot(g[..., 0], g[..., 1]) < 1525.0
    rng = np.random.default_rng(seed + 1)
    if modality == "lm":
        img = np.where(metal & inside, 0.05, 1.0)
    else:
        broken = (np.floor(g[..., 0] / 125.0 + 0.5) * 7 + np.floor(g[..., 1] / 125.0 + 0.5) * 3) % 23 == 0
        img = np.where(metal | ~inside, 0.0, np.where(broken, 1.0, 0.7))
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0)
    return (img * 1000 + rng.normal(0, 20, img.shape)).astype(np.float32)
