"""One virtual EM grid with cells, beads and viruses, and its ground truth.

A ``Specimen`` is generated from a seed and never changes afterwards: the simulated
light and electron microscopes render views of it, and tests ask its ``truth`` where any
point really lies on either stage. Geometry is held analytically (bars, holes) or as
small rasters (finder marks, cells) so that a 2048 x 2048 view renders in a few hundred
milliseconds at any magnification.

Frames are defined in simulators/placement.py. Specimen-space z is height above the film
in micrometres (beads sit on the back side, at about -0.1 um).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property

import cv2
import numpy as np
from numpy.typing import NDArray

from simulators.placement import Deformation, FocusPlane, GroundTruth, Placement
from simulators.specimen_config import SpecimenConfig

MARK_RASTER_UM = 0.5
CELL_RASTER_UM = 0.5
TRAJECTORY_STEP_S = 10.0


class SquareState(IntEnum):
    OK = 0
    BROKEN = 1        # carbon film torn away: bright in EM, no beads or cells
    THICK_ICE = 2     # too thick for tomography: dark in EM


class VirusMotion(IntEnum):
    STATIC = 0
    DIFFUSING = 1
    DIRECTED = 2


@dataclass(frozen=True)
class Square:
    """A grid square, numbered by its offset (i, j) in pitches from the grid centre."""

    i: int
    j: int
    centre_um: tuple[float, float]
    state: SquareState
    partial: bool                       # cut by the rim
    cell_ids: tuple[int, ...] = ()
    bead_ids: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.i:+d}{self.j:+d}"


@dataclass(frozen=True)
class Cell:
    """A spread cell: a thick body and a thin lobed periphery (where tomograms are taken)."""

    centre_um: tuple[float, float]
    body_radius_um: float
    body_height_um: float
    periphery_radius_um: float
    periphery_thickness_um: float
    lobes: NDArray[np.float64]          # (K, 3): harmonic order, amplitude, phase
    seed: int

    def radius_at(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        r = np.ones_like(theta)
        for k, amp, ph in self.lobes:
            r = r + amp * np.cos(k * theta + ph)
        return self.periphery_radius_um * np.clip(r, 0.35, None)

    @property
    def extent_um(self) -> float:
        return float(self.periphery_radius_um * (1 + np.abs(self.lobes[:, 1]).sum()) + 4)

    def raster(self) -> NDArray[np.float32]:
        """Thickness (um) on a local raster of CELL_RASTER_UM centred on the cell."""
        half = int(np.ceil(self.extent_um / CELL_RASTER_UM))
        ax = (np.arange(-half, half + 1) * CELL_RASTER_UM).astype(np.float32)
        x, y = np.meshgrid(ax, ax)
        d = np.hypot(x, y)
        edge = self.radius_at(np.arctan2(y, x))
        periphery = self.periphery_thickness_um / (1 + np.exp((d - edge) / 1.2))
        body = self.body_height_um * np.exp(-0.5 * (d / self.body_radius_um) ** 2)
        rng = np.random.default_rng(self.seed)
        texture = cv2.GaussianBlur(rng.normal(0, 1, x.shape).astype(np.float32), (0, 0), 3)
        texture *= 0.25 / max(float(texture.std()), 1e-6)
        return (np.maximum(body, periphery) * (1 + texture)).clip(0).astype(np.float32)


@dataclass(frozen=True)
class Beads:
    """Fiducial beads, grid frame. ``lost`` beads fell off at freezing (LM only)."""

    xy_um: NDArray[np.float64]
    brightness: NDArray[np.float64]
    lost: NDArray[np.bool_]
    diameter_um: float


@dataclass(frozen=True)
class Contamination:
    """Ice crystals and debris that appear at freezing: EM only, some look like beads."""

    xy_um: NDArray[np.float64]
    diameter_um: NDArray[np.float64]
    contrast: NDArray[np.float64]


@dataclass(frozen=True)
class Viruses:
    """Virus particles: trajectories sampled every TRAJECTORY_STEP_S up to freezing."""

    trajectories_um: NDArray[np.float64]  # (V, T, 2) grid frame
    height_um: NDArray[np.float64]        # (V,) above the film
    motion: NDArray[np.int_]              # VirusMotion per virus
    brightness: NDArray[np.float64]
    square_keys: tuple[str, ...]

    def at(self, t_s: float) -> NDArray[np.float64]:
        """Positions at time ``t_s`` (clamped to [0, freeze]): (V, 2)."""
        steps = self.trajectories_um.shape[1]
        f = float(np.clip(t_s / TRAJECTORY_STEP_S, 0, steps - 1))
        i = min(int(f), steps - 2) if steps > 1 else 0
        w = f - i if steps > 1 else 0.0
        a = self.trajectories_um[:, i]
        b = self.trajectories_um[:, min(i + 1, steps - 1)]
        return a * (1 - w) + b * w

    @property
    def frozen_um(self) -> NDArray[np.float64]:
        return self.trajectories_um[:, -1]


@dataclass
class Specimen:
    """The virtual grid. Build with ``Specimen.generate(config)``."""

    config: SpecimenConfig
    squares: list[Square]
    cells: list[Cell]
    beads: Beads
    contamination: Contamination
    viruses: Viruses
    truth: GroundTruth
    hole_lattice_deg: float
    hole_origin_um: tuple[float, float]
    ice_nm: dict[tuple[int, int], float]
    _index: dict[tuple[int, int], Square] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {(s.i, s.j): s for s in self.squares}
        n = self.n_half
        self._state_lut = np.full((2 * n + 3, 2 * n + 3), -1, dtype=np.int8)
        self._ice_lut = np.zeros((2 * n + 3, 2 * n + 3), dtype=np.float32)
        for s in self.squares:
            self._state_lut[s.i + n + 1, s.j + n + 1] = int(s.state)
            self._ice_lut[s.i + n + 1, s.j + n + 1] = self.ice_nm[(s.i, s.j)]

    # ------------------------------------------------------------------ generation

    @classmethod
    def generate(cls, config: SpecimenConfig | None = None, **overrides: object) -> Specimen:
        from simulators.specimen_build import build_specimen  # generation lives apart

        cfg = config or SpecimenConfig.build(**overrides)
        if config is not None and overrides:
            cfg = SpecimenConfig.build(**{**config.model_dump(), **overrides})
        return build_specimen(cfg, cls)

    # ------------------------------------------------------------------ geometry

    @property
    def n_half(self) -> int:
        return int(np.ceil(self.config.grid_diameter_um / 2 / self.config.pitch_um))

    @property
    def mesh_radius_um(self) -> float:
        return self.config.grid_diameter_um / 2 - self.config.rim_width_um

    def square(self, i: int, j: int) -> Square:
        return self._index[(i, j)]

    def square_at(self, xy_um: NDArray[np.float64]) -> tuple[NDArray[np.int_], NDArray[np.int_]]:
        """Square indices (i, j) of grid-frame points."""
        p = np.asarray(xy_um, dtype=float) / self.config.pitch_um
        return np.rint(p[..., 0]).astype(int), np.rint(p[..., 1]).astype(int)

    def metal(self, gx: NDArray[np.float32], gy: NDArray[np.float32],
              px_um: float) -> NDArray[np.float32]:
        """Fraction of each pixel covered by metal: bars, rim and finder marks (0..1).

        Edges are anti-aliased over one pixel; outside the grid disc the value is 0 (the
        renderer decides whether that is glass or the cartridge ring).
        """
        c = self.config
        half_open = (c.pitch_um - c.bar_width_um) / 2
        soft = max(px_um, 1e-3)
        cov = None
        for g in (gx, gy):
            f = g / np.float32(c.pitch_um)
            d = np.abs(f - np.rint(f)) * np.float32(c.pitch_um)     # distance from square centre
            bar = np.clip((d - half_open) / soft + 0.5, 0, 1)
            cov = bar if cov is None else np.maximum(cov, bar)
        r = np.hypot(gx, gy)
        rim = np.clip((r - self.mesh_radius_um) / soft + 0.5, 0, 1)
        inside = np.clip((c.grid_diameter_um / 2 - r) / soft + 0.5, 0, 1)
        marks = self._sample_raster(self.mark_raster, MARK_RASTER_UM, gx, gy)
        assert cov is not None
        return (np.maximum(np.maximum(cov, rim), marks) * inside).astype(np.float32)

    def inside_grid(self, gx: NDArray[np.float32], gy: NDArray[np.float32]) -> NDArray[np.bool_]:
        return np.hypot(gx, gy) <= self.config.grid_diameter_um / 2

    def square_state(self, gx: NDArray[np.float32], gy: NDArray[np.float32]) -> NDArray[np.int8]:
        """SquareState of the square under each point; -1 outside the mesh."""
        n = self.n_half
        i = np.clip(np.rint(gx / self.config.pitch_um).astype(int) + n + 1, 0, 2 * n + 2)
        j = np.clip(np.rint(gy / self.config.pitch_um).astype(int) + n + 1, 0, 2 * n + 2)
        return self._state_lut[i, j]

    def ice_thickness_nm(self, gx: NDArray[np.float32],
                         gy: NDArray[np.float32]) -> NDArray[np.float32]:
        """Vitreous ice over the film (per square, thicker towards the bars: the meniscus)."""
        c = self.config
        n = self.n_half
        i = np.clip(np.rint(gx / c.pitch_um).astype(int) + n + 1, 0, 2 * n + 2)
        j = np.clip(np.rint(gy / c.pitch_um).astype(int) + n + 1, 0, 2 * n + 2)
        base = self._ice_lut[i, j]
        fx = np.abs(gx / np.float32(c.pitch_um) - np.rint(gx / np.float32(c.pitch_um)))
        fy = np.abs(gy / np.float32(c.pitch_um) - np.rint(gy / np.float32(c.pitch_um)))
        edge = np.maximum(fx, fy) * 2    # 0 at centre, 1 at bar centre
        return (base * (1 + 0.8 * edge ** 4)).astype(np.float32)

    def hole_fraction(self, gx: NDArray[np.float32], gy: NDArray[np.float32],
                      px_um: float) -> NDArray[np.float32]:
        """Fraction of each pixel inside a film hole (R2/2 lattice), 0 on broken squares."""
        c = self.config
        t = np.deg2rad(self.hole_lattice_deg)
        ox, oy = self.hole_origin_um
        ct, st = np.float32(np.cos(t)), np.float32(np.sin(t))   # keep the maps float32
        u = ((gx - ox) * ct + (gy - oy) * st) / np.float32(c.hole_pitch_um)
        v = (-(gx - ox) * st + (gy - oy) * ct) / np.float32(c.hole_pitch_um)
        d = np.hypot(u - np.rint(u), v - np.rint(v)) * np.float32(c.hole_pitch_um)
        frac = np.clip((c.hole_diameter_um / 2 - d) / max(px_um, 1e-3) + 0.5, 0, 1)
        return frac.astype(np.float32)

    def cell_thickness_um(self, gx: NDArray[np.float32], gy: NDArray[np.float32],
                          view_to_grid: NDArray[np.float64] | None = None) -> NDArray[np.float32]:
        """Cell thickness (um) under each point.

        ``view_to_grid`` (the 2x3 pixel-to-grid affine of the view, approximately) lets a
        cell touch only its own pixel box instead of the whole frame.
        """
        out = np.zeros(gx.shape, dtype=np.float32)
        x0, x1 = float(gx.min()), float(gx.max())
        y0, y1 = float(gy.min()), float(gy.max())
        for idx, cell in enumerate(self.cells):
            cx, cy = cell.centre_um
            e = cell.extent_um
            if cx + e < x0 or cx - e > x1 or cy + e < y0 or cy - e > y1:
                continue
            sl = _pixel_box(view_to_grid, (cx, cy), e + 2, gx.shape)
            if sl is None:
                continue
            raster = self._cell_raster(idx)
            half = (raster.shape[0] - 1) / 2
            mx = (gx[sl] - cx) / CELL_RASTER_UM + half
            my = (gy[sl] - cy) / CELL_RASTER_UM + half
            vals = _remap(raster, mx.astype(np.float32), my.astype(np.float32))
            out[sl] = np.maximum(out[sl], vals)
        return out

    # ------------------------------------------------------------------ points

    def beads_in(self, box: tuple[float, float, float, float], *,
                 em: bool = False) -> NDArray[np.int_]:
        """Indices of beads inside grid-frame box (x0, y0, x1, y1); ``em`` drops lost ones."""
        xy = self.beads.xy_um
        m = (xy[:, 0] >= box[0]) & (xy[:, 0] <= box[2]) & (xy[:, 1] >= box[1]) & (xy[:, 1] <= box[3])
        if em:
            m &= ~self.beads.lost
        return np.nonzero(m)[0]

    def bead_heights_um(self) -> NDArray[np.float64]:
        """Beads lie on the back side of the film."""
        return np.full(len(self.beads.xy_um), -self.beads.diameter_um / 2)

    # ------------------------------------------------------------------ rasters

    @cached_property
    def mark_raster(self) -> NDArray[np.uint8]:
        """Finder marks (centre 'F' and per-square binary codes) at MARK_RASTER_UM."""
        from simulators.specimen_build import finder_mark_rectangles

        size = int(np.ceil(self.config.grid_diameter_um / MARK_RASTER_UM)) + 4
        raster = np.zeros((size, size), dtype=np.uint8)
        half = (size - 1) / 2
        for x0, y0, x1, y1 in finder_mark_rectangles(self):
            p0 = (int(round(x0 / MARK_RASTER_UM + half)), int(round(y0 / MARK_RASTER_UM + half)))
            p1 = (int(round(x1 / MARK_RASTER_UM + half)) - 1,
                  int(round(y1 / MARK_RASTER_UM + half)) - 1)
            cv2.rectangle(raster, p0, p1, 255, thickness=-1)
        return raster

    def _cell_raster(self, idx: int) -> NDArray[np.float32]:
        cache = self.__dict__.setdefault("_cell_rasters", {})
        if idx not in cache:
            cache[idx] = self.cells[idx].raster()
        return cache[idx]  # type: ignore[no-any-return]  # dict of rasters

    @staticmethod
    def _sample_raster(raster: NDArray[np.uint8], step_um: float, gx: NDArray[np.float32],
                       gy: NDArray[np.float32]) -> NDArray[np.float32]:
        half = (raster.shape[0] - 1) / 2
        mx = (gx / step_um + half).astype(np.float32)
        my = (gy / step_um + half).astype(np.float32)
        return _remap(raster, mx, my).astype(np.float32) * np.float32(1 / 255)


def _remap(raster: NDArray[np.generic], mx: NDArray[np.float32],
           my: NDArray[np.float32]) -> NDArray[np.generic]:
    """Bilinear lookup of ``raster`` at (mx, my) for maps of any shape (cv2 wants 2D < 32k)."""
    if mx.ndim == 2 and max(mx.shape) < 32000:
        return cv2.remap(raster, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    n = mx.size
    width = 1024
    pad = (-n) % width
    fx = np.pad(mx.ravel(), (0, pad), constant_values=-10).reshape(-1, width)
    fy = np.pad(my.ravel(), (0, pad), constant_values=-10).reshape(-1, width)
    out = cv2.remap(raster, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                    borderValue=0)
    return out.ravel()[:n].reshape(mx.shape)


def _pixel_box(view_to_grid: NDArray[np.float64] | None, centre: tuple[float, float],
               radius: float, shape: tuple[int, ...]) -> tuple[slice, slice] | None:
    """Pixel slices that can hold grid points within ``radius`` of ``centre``."""
    h, w = shape[0], shape[1]
    if view_to_grid is None:
        return (slice(0, h), slice(0, w))
    a = np.asarray(view_to_grid, dtype=float)
    inv = np.linalg.inv(a[:, :2])
    c = inv @ (np.asarray(centre) - a[:, 2])
    r = radius * float(np.abs(inv).sum(axis=1).max())
    r0, r1 = int(max(0, np.floor(c[1] - r))), int(min(h, np.ceil(c[1] + r) + 1))
    c0, c1 = int(max(0, np.floor(c[0] - r))), int(min(w, np.ceil(c[0] + r) + 1))
    if r0 >= r1 or c0 >= c1:
        return None
    return (slice(r0, r1), slice(c0, c1))


__all__ = ["Beads", "Cell", "Contamination", "Deformation", "FocusPlane", "GroundTruth",
           "Placement", "Specimen", "SpecimenConfig", "Square", "SquareState", "VirusMotion",
           "Viruses"]
