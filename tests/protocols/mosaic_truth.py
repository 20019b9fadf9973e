"""Synthetic tiled acquisitions with ground truth, for the stitching tests and benchmark.

A large "specimen" image is rendered in a stage frame (pixel (0, 0) at stage (0, 0), no
rotation); tiles are cut from it at *true* positions (commanded + stage error) and labelled
with *nominal* affines (commanded positions only), as an instrument would report them.

Two appearances, both with the periodic structure that makes grid stitching hard:

- ``lm``: transmitted light at 20x: bright background with smooth illumination, dark grid
  bars (127 um pitch, 35 um wide), faint cells and debris; camera noise per tile;
- ``em``: a grid square at ~4,700x: carbon film with an R2/2 hole lattice (bright holes,
  4 um pitch), cells as thicker darker regions, small dark beads; Poisson noise per tile at
  a low dose (~20 counts per pixel), so single pixels are mostly noise.

The specimen is rendered noise-free; each tile gets its own noise when it is cut, as each
exposure does, so two tiles never share noise in their overlap.

Only tests and benchmarks import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from drivers.imaging import Image, affine_from, apply_affine, invert_affine

FloatArray = NDArray[np.float64]
Kind = Literal["lm", "em"]


@dataclass(frozen=True)
class TiledTruth:
    """Tiles with nominal affines, and what the affines should have been."""

    tiles: list[Image]
    true_affines: list[FloatArray]
    field: NDArray[np.float32]
    field_pixel_um: float

    def tile_errors_um(self, affines: list[FloatArray]) -> FloatArray:
        """Worst distance (um) over each tile's corners between ``affines`` and the truth."""
        out = []
        for tile, est, true in zip(self.tiles, affines, self.true_affines, strict=True):
            h, w = tile.shape
            corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
            d = apply_affine(est, corners) - apply_affine(true, corners)
            out.append(float(np.hypot(d[:, 0], d[:, 1]).max()))
        return np.asarray(out)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float
                  ) -> NDArray[np.float32]:
    """Unit-variance Gaussian-correlated noise; large sigmas are drawn coarse and enlarged."""
    step = max(1, int(sigma / 4))
    small = (shape[0] // step + 2, shape[1] // step + 2) if step > 1 else shape
    img = cv2.GaussianBlur(rng.standard_normal(small).astype(np.float32), (0, 0), sigma / step)
    if step > 1:
        img = cv2.resize(img, (small[1] * step, small[0] * step),
                         interpolation=cv2.INTER_CUBIC)[: shape[0], : shape[1]].copy()
    return img / (img.std() + 1e-12)


def _bars(shape: tuple[int, int], pixel_um: float, pitch_um: float, bar_um: float,
          phase_um: tuple[float, float]) -> NDArray[np.float32]:
    """1 on the bars, 0 in the squares, with ~1 um soft edges."""
    h, w = shape
    y = (np.arange(h) * pixel_um + phase_um[1]) % pitch_um
    x = (np.arange(w) * pixel_um + phase_um[0]) % pitch_um
    soft = max(1.0, 1.5 * pixel_um)
    by = 1 / (1 + np.exp(-(bar_um / 2 - np.abs(y - pitch_um / 2)) / soft))
    bx = 1 / (1 + np.exp(-(bar_um / 2 - np.abs(x - pitch_um / 2)) / soft))
    return np.maximum.outer(by, bx).astype(np.float32)


def _holes(shape: tuple[int, int], pixel_um: float, pitch_um: float, diameter_um: float
           ) -> NDArray[np.float32]:
    """1 inside the holes of a square hole lattice, 0 on the carbon."""
    h, w = shape
    y = (np.arange(h) * pixel_um) % pitch_um - pitch_um / 2
    x = (np.arange(w) * pixel_um) % pitch_um - pitch_um / 2
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    edge = max(0.05, pixel_um)
    return (1 / (1 + np.exp((r - diameter_um / 2) / edge))).astype(np.float32)


def render_field(kind: Kind, shape: tuple[int, int], pixel_um: float, seed: int,
                 texture: float = 1.0) -> NDArray[np.float32]:
    """The noise-free specimen; ``texture`` scales the non-periodic content (0 = pure lattice).

    LM values are camera counts (~1000 in the squares); EM values are expected electron counts
    per pixel (~40 in the holes).
    """
    rng = np.random.default_rng(seed)
    if kind == "lm":
        illum = 1.0 + 0.15 * _smooth_noise(rng, shape, 300.0)
        cells = 0.10 * _smooth_noise(rng, shape, 6.0) + 0.06 * _smooth_noise(rng, shape, 2.0)
        bars = _bars(shape, pixel_um, 127.0, 35.0, (20.0, 50.0))
        bar_texture = 0.03 * _smooth_noise(rng, shape, 3.0)
        img = illum * ((1 - bars) * (1.0 + texture * cells) + bars * (0.12 + texture * bar_texture))
        return (1000.0 * img).astype(np.float32)
    holes = _holes(shape, pixel_um, 4.0, 2.0)
    cell = np.clip(_smooth_noise(rng, shape, 1.5 / pixel_um), 0, None)
    film = 0.55 - 0.2 * texture * cell + 0.05 * texture * _smooth_noise(rng, shape, 0.08 / pixel_um)
    img = holes * 1.0 + (1 - holes) * film
    n_beads = int(texture * shape[0] * shape[1] * pixel_um ** 2 / 4.0)
    for _ in range(n_beads):
        cx, cy = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
        cv2.circle(img, (int(cx), int(cy)), max(1, int(0.1 / pixel_um)), 0.1, -1)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.8)
    return np.asarray(40.0 * np.clip(img, 0, None), np.float32)


def cut_tiles(field: NDArray[np.float32], field_pixel_um: float, grid: tuple[int, int],
              tile_shape: tuple[int, int], overlap: float, stage_error_um: float, seed: int,
              rotation_deg: float = 0.0, margin_um: float = 20.0,
              instrument: str = "lm") -> TiledTruth:
    """Cut ``grid`` = (nx, ny) tiles whose centres are commanded on a regular raster.

    Stage error is Gaussian with ``stage_error_um`` per axis, clipped at 3 sigma. Tiles share the
    field's pixel size and the given camera rotation. Each tile gets independent noise:
    Poisson counts for ``instrument="em"``, Gaussian read noise (15 counts) otherwise.
    """
    rng = np.random.default_rng(seed)
    nx, ny = grid
    h, w = tile_shape
    step = (1 - overlap) * np.array([w, h]) * field_pixel_um
    half_diag = 0.5 * np.hypot(w, h) * field_pixel_um
    field_affine = affine_from(field_pixel_um, 0.0, (0.0, 0.0), (1, 1))  # pixel (0,0) at (0,0)
    to_field = invert_affine(field_affine)
    tiles, truths = [], []
    for r in range(ny):
        for c in range(nx):
            centre = np.array([margin_um + half_diag + c * step[0],
                               margin_um + half_diag + r * step[1]])
            err = np.clip(rng.normal(0, stage_error_um, 2), -3 * stage_error_um, 3 * stage_error_um)
            nominal = affine_from(field_pixel_um, rotation_deg, tuple(centre), tile_shape)
            true = affine_from(field_pixel_um, rotation_deg, tuple(centre + err), tile_shape)
            tile_to_field = np.vstack([to_field, [0, 0, 1]]) @ np.vstack([true, [0, 0, 1]])
            data = cv2.warpAffine(field, tile_to_field[:2], (w, h),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT)
            if instrument == "em":
                data = rng.poisson(data).astype(np.float32)
            else:
                data = (data + rng.normal(0.0, 15.0, data.shape)).astype(np.float32)
            tiles.append(Image(data=data, pixel_size_um=field_pixel_um, pixel_to_stage=nominal,
                               instrument=instrument, stage_um=(centre[0], centre[1], 0.0),
                               index={"row": r, "col": c}))
            truths.append(true)
    return TiledTruth(tiles, truths, field, field_pixel_um)


def field_shape_for(grid: tuple[int, int], tile_shape: tuple[int, int], overlap: float,
                    pixel_um: float, stage_error_um: float, margin_um: float = 20.0
                    ) -> tuple[int, int]:
    """A field large enough for ``cut_tiles`` with the same arguments."""
    nx, ny = grid
    h, w = tile_shape
    extent = (1 - overlap) * np.array([w * (nx - 1), h * (ny - 1)]) + np.hypot(w, h)
    size = extent + 2 * (margin_um + 4 * stage_error_um) / pixel_um
    return int(size[1]) + 1, int(size[0]) + 1
