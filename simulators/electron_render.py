"""What the specimen does to the beam in one simulated EM frame: transmission and phase.

Each pixel is mapped to the TRUE EM stage (FrameGeometry, with stage error, tilt and image
shift) and on to the grid frame through ``truth.em_stage_to_grid``. That mapping is an
exact affine (pixel -> stage, the film is a plane) followed by the smooth freezing
deformation, so it is computed on coarse nodes and only the small non-affine residual is
upsampled (cv2.resize); full-resolution work is one affine per pixel.

Layers (grid frame, specimen.py): metal bars, rim and finder marks are opaque; vitreous ice,
the carbon film (absent in holes and on broken squares) and cells attenuate as
``exp(-t / mfp)`` along the tilted path; beads, contamination and viruses are spheres (or a
membrane shell) drawn in pixel space where they project, only if they are in the field.
Per-square quantities (ice, square state) change only under the bars, so they are sampled on
a grid 8x coarser. The frame is processed in tiles that fit in cache; tiles wholly under
metal are skipped, and tiles wholly inside one square opening skip the metal layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from simulators.electron_config import OpticsModel
from simulators.electron_geometry import FrameGeometry
from simulators.electron_optics import interaction_constant
from simulators.specimen import MARK_RASTER_UM, Specimen, SquareState

NODE_STEP_PX = 32
LAYER_STEP_PX = 8
TILE_ROWS = 64
TILE_COLS = 512


@dataclass(frozen=True)
class SpecimenMaps:
    """Transmission (0..1) and phase (rad) of one frame, plus what was drawn in it."""

    transmission: NDArray[np.float32]
    phase: NDArray[np.float32]
    drawn: dict[str, NDArray[np.int_]]       # indices of beads / contamination / viruses


def _nodes(n: int, size: int) -> NDArray[np.float64]:
    """Pixel positions that cv2.resize maps exactly onto n coarse samples."""
    return (np.arange(n) + 0.5) * size / n - 0.5


def _upsample(a: NDArray[np.float32], shape: tuple[int, int],
              interpolation: int = cv2.INTER_LINEAR) -> NDArray[np.float32]:
    return np.asarray(cv2.resize(a, (shape[1], shape[0]), interpolation=interpolation),
                      dtype=np.float32)


@dataclass(frozen=True)
class _BaseLayers:
    """Full-frame layers upsampled from the coarse grid."""

    ice: NDArray[np.float32]             # vitreous ice thickness (nm)
    cell: NDArray[np.float32] | None     # cell thickness (um); None = no cell in the frame
    carbon: NDArray[np.float32]          # carbon film thickness before holes (nm)
    inside: NDArray[np.float32] | None   # inside the grid disc; None = everywhere
    open_coarse: NDArray[np.float32]     # coarse (inside * (1 - metal)), for skipping tiles


class SpecimenSampler:
    """Samples the specimen's layers and objects for one frame geometry."""

    def __init__(self, specimen: Specimen, optics: OpticsModel) -> None:
        self.spec = specimen
        self.optics = optics
        self.sigma = interaction_constant(optics.high_voltage_kv)
        cells = specimen.cells
        self._cell_centres = np.array([c.centre_um for c in cells], dtype=float).reshape(-1, 2)
        self._cell_extents = np.array([c.extent_um for c in cells], dtype=float)

    # ------------------------------------------------------------------ mapping

    def _grid_mapping(self, geom: FrameGeometry) -> tuple[NDArray[np.float64],
                                                          NDArray[np.float32], float]:
        """Pixel -> grid affine (2x3), non-affine residual on coarse nodes (ny, nx, 2), and
        the largest residual (um)."""
        h, w = geom.shape
        ny, nx = max(2, math.ceil(h / NODE_STEP_PX)), max(2, math.ceil(w / NODE_STEP_PX))
        px, py = np.meshgrid(_nodes(nx, w), _nodes(ny, h))
        p = np.stack([px.ravel(), py.ravel()], axis=1)
        a = geom.pixel_to_stage_affine()
        q = p @ a[:, :2].T + a[:, 2]
        g = self.spec.truth.em_stage_to_grid(q)
        design = np.hstack([p, np.ones((len(p), 1))])
        coef, *_ = np.linalg.lstsq(design, g, rcond=None)
        residual: NDArray[np.float32] = (g - design @ coef).reshape(ny, nx, 2).astype(np.float32)
        affine: NDArray[np.float64] = np.ascontiguousarray(coef.T, dtype=np.float64)
        return affine, residual, float(np.abs(residual).max())

    # ------------------------------------------------------------------ frame

    def sample(self, geom: FrameGeometry) -> SpecimenMaps:
        h, w = geom.shape
        o = self.optics
        a_g, res_nodes, res_max = self._grid_mapping(geom)
        px_grid = math.sqrt(abs(np.linalg.det(a_g[:, :2])))
        res_x = res_y = None
        if res_max > 0.02 * px_grid:          # sub-nanometre residuals are not worth a pass
            res_x = _upsample(np.ascontiguousarray(res_nodes[..., 0]), (h, w))
            res_y = _upsample(np.ascontiguousarray(res_nodes[..., 1]), (h, w))
        path = 1.0 / math.cos(math.radians(geom.tilt_deg))
        frame_box = self._band_box(a_g, (h, w), res_max + 2 * px_grid)
        base = self._coarse_layers(a_g, res_nodes, (h, w), px_grid, frame_box)
        obj_mu, obj_phi, drawn = self._objects(geom, a_g, res_max)

        f_ice = np.float32(path / o.ice_mfp_nm)
        p_ice = np.float32(self.sigma * o.ice_v * path)
        f_carbon = np.float32(path / o.carbon_mfp_nm)
        p_carbon = np.float32(self.sigma * o.carbon_dv_v * path)
        p_metal = np.float32(o.metal_phase_rad)
        f_cell = np.float32(path * 1e3 / o.ice_mfp_nm)
        p_cell = np.float32(self.sigma * o.cell_dv_v * path * 1e3)
        transmission = np.zeros((h, w), np.float32)
        phase = np.zeros((h, w), np.float32)
        xs_all = np.arange(w, dtype=np.float32)
        for r0 in range(0, h, TILE_ROWS):
            r1 = min(h, r0 + TILE_ROWS)
            ys = np.arange(r0, r1, dtype=np.float32)[:, None]
            for c0 in range(0, w, TILE_COLS):
                c1 = min(w, c0 + TILE_COLS)
                rows, cols = slice(r0, r1), slice(c0, c1)
                if _coarse_window(base.open_coarse, (r0, r1, c0, c1), (h, w)).max() <= 0:
                    phase[rows, cols] = p_metal         # wholly under metal or off the grid
                    continue
                xs = xs_all[None, c0:c1]
                gx = np.float32(a_g[0, 0]) * xs + (np.float32(a_g[0, 1]) * ys
                                                   + np.float32(a_g[0, 2]))
                gy = np.float32(a_g[1, 0]) * xs + (np.float32(a_g[1, 1]) * ys
                                                   + np.float32(a_g[1, 2]))
                if res_x is not None and res_y is not None:
                    gx += res_x[rows, cols]
                    gy += res_y[rows, cols]
                tile_affine = a_g.copy()
                tile_affine[:, 2] += a_g[:, 0] * c0 + a_g[:, 1] * r0
                box = self._band_box(tile_affine, (r1 - r0, c1 - c0), res_max + 2 * px_grid)
                metal = self.spec.metal(gx, gy, px_grid) if self._may_hold_metal(box) else None
                open_ = None if base.inside is None else base.inside[rows, cols]
                if metal is not None:
                    open_ = (1.0 - metal) if open_ is None else open_ * (1.0 - metal)
                ice = base.ice[rows, cols]
                mu, ph = ice * f_ice, ice * p_ice
                film = base.carbon[rows, cols]
                if float(film.max()) > 0:
                    film = film * (1.0 - self.spec.hole_fraction(gx, gy, px_grid))
                    mu += film * f_carbon
                    ph += film * p_carbon
                if base.cell is not None:
                    cell = base.cell[rows, cols]
                    mu += cell * f_cell
                    ph += cell * p_cell
                if metal is not None:
                    ph += p_metal * metal
                if obj_mu is not None and obj_phi is not None:
                    mu += obj_mu[rows, cols]
                    ph += obj_phi[rows, cols]
                np.negative(mu, out=mu)
                np.exp(mu, out=mu)
                if open_ is not None:
                    mu *= open_
                transmission[rows, cols] = mu
                phase[rows, cols] = ph
        return SpecimenMaps(transmission=transmission, phase=phase, drawn=drawn)

    # ------------------------------------------------------------------ layers

    def _cells_near(self, box: tuple[float, float, float, float]) -> bool:
        c, e = self._cell_centres, self._cell_extents
        if len(c) == 0:
            return False
        return bool(np.any((c[:, 0] + e >= box[0]) & (c[:, 0] - e <= box[2])
                           & (c[:, 1] + e >= box[1]) & (c[:, 1] - e <= box[3])))

    def _coarse_layers(self, a_g: NDArray[np.float64], res_nodes: NDArray[np.float32],
                       shape: tuple[int, int], px_grid: float,
                       frame_box: tuple[float, float, float, float]) -> _BaseLayers:
        """Per-square and smooth layers sampled every LAYER_STEP_PX pixels, upsampled.

        Ice and square state jump only at bar centres, which metal hides. Coarse metal
        (edges as soft as the coarse step) finds tiles that are wholly covered. Cells come
        from a 0.5 um raster, so they are sampled every ~0.25 um and upsampled.
        """
        o = self.optics
        h, w = shape
        gx, gy = self._grid_nodes(a_g, res_nodes, shape, LAYER_STEP_PX)
        ice = self.spec.ice_thickness_nm(gx, gy).astype(np.float32)
        state = self.spec.square_state(gx, gy)
        carbon = np.where(state == int(SquareState.BROKEN), 0.0, o.carbon_nm).astype(np.float32)
        inside = self.spec.inside_grid(gx, gy).astype(np.float32)
        step_px = LAYER_STEP_PX * px_grid
        open_coarse = inside * (1.0 - self.spec.metal(gx, gy, step_px))
        cell = None
        if self._cells_near(frame_box):
            step = int(min(LAYER_STEP_PX, max(1, math.floor(0.25 / px_grid))))
            cgx, cgy = self._grid_nodes(a_g, res_nodes, shape, step)
            ny, nx = cgx.shape
            scale = np.diag([w / nx, h / ny])                 # node index -> pixel
            node_to_grid = np.hstack([a_g[:, :2] @ scale, (a_g[:, :2] @ (
                0.5 * np.diag(scale) - 0.5) + a_g[:, 2])[:, None]])
            cell = self.spec.cell_thickness_um(cgx, cgy, node_to_grid)
            if step > 1:
                cell = _upsample(cell, shape)
        return _BaseLayers(
            ice=_upsample(ice, shape), carbon=_upsample(carbon, shape, cv2.INTER_NEAREST),
            inside=None if bool(inside.min() >= 1) else _upsample(inside, shape),
            cell=cell, open_coarse=open_coarse)

    @staticmethod
    def _grid_nodes(a_g: NDArray[np.float64], res_nodes: NDArray[np.float32],
                    shape: tuple[int, int], step: int) -> tuple[NDArray[np.float32],
                                                                NDArray[np.float32]]:
        """Grid coordinates sampled every ``step`` pixels (cv2.resize-aligned nodes)."""
        h, w = shape
        ny, nx = max(2, math.ceil(h / step)), max(2, math.ceil(w / step))
        if step == 1:
            ny, nx = h, w
        px, py = np.meshgrid(_nodes(nx, w).astype(np.float32), _nodes(ny, h).astype(np.float32))
        res = [_upsample(np.ascontiguousarray(res_nodes[..., i]), (ny, nx)) for i in (0, 1)]
        gx = (np.float32(a_g[0, 0]) * px + np.float32(a_g[0, 1]) * py
              + np.float32(a_g[0, 2])) + res[0]
        gy = (np.float32(a_g[1, 0]) * px + np.float32(a_g[1, 1]) * py
              + np.float32(a_g[1, 2])) + res[1]
        return gx, gy

    @staticmethod
    def _band_box(affine: NDArray[np.float64], shape: tuple[int, int],
                  margin: float) -> tuple[float, float, float, float]:
        h, w = shape
        c = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
        g = c @ affine[:, :2].T + affine[:, 2]
        return (float(g[:, 0].min() - margin), float(g[:, 1].min() - margin),
                float(g[:, 0].max() + margin), float(g[:, 1].max() + margin))

    def _may_hold_metal(self, box: tuple[float, float, float, float]) -> bool:
        """False only when the box lies inside one square opening, clear of rim and marks."""
        c = self.spec.config
        half_open = (c.pitch_um - c.bar_width_um) / 2
        for lo, hi in ((box[0], box[2]), (box[1], box[3])):
            i = round((lo + hi) / 2 / c.pitch_um)
            if lo < i * c.pitch_um - half_open or hi > i * c.pitch_um + half_open:
                return True
        corner = max(math.hypot(x, y) for x in (box[0], box[2]) for y in (box[1], box[3]))
        if corner >= self.spec.mesh_radius_um:
            return True
        raster = self.spec.mark_raster
        half = (raster.shape[0] - 1) / 2
        c0, c1 = (math.floor(box[0] / MARK_RASTER_UM + half) - 1,
                  math.ceil(box[2] / MARK_RASTER_UM + half) + 2)
        r0, r1 = (math.floor(box[1] / MARK_RASTER_UM + half) - 1,
                  math.ceil(box[3] / MARK_RASTER_UM + half) + 2)
        window = raster[max(0, r0):max(0, r1), max(0, c0):max(0, c1)]
        return bool(window.any())

    # ------------------------------------------------------------------ objects

    def _objects(self, geom: FrameGeometry, a_g: NDArray[np.float64], res_max: float
                 ) -> tuple[NDArray[np.float32] | None, NDArray[np.float32] | None,
                            dict[str, NDArray[np.int_]]]:
        """Beads, contamination and viruses that project into the frame, drawn as spheres."""
        h, w = geom.shape
        spec, o = self.spec, self.optics
        box = self._band_box(a_g, (h, w), res_max + 2.0)
        drawn: dict[str, NDArray[np.int_]] = {}
        groups = []
        beads = spec.beads_in(box, em=True)
        groups.append(("beads", beads, spec.beads.xy_um[beads],
                       spec.bead_heights_um()[beads],
                       np.full(len(beads), spec.beads.diameter_um / 2),
                       np.full(len(beads), 1.0 / o.bead_mfp_nm),
                       np.full(len(beads), self.sigma * o.bead_dv_v)))
        cont = spec.contamination
        ci = _in_box(cont.xy_um, box)
        groups.append(("contamination", ci, cont.xy_um[ci],
                       np.full(len(ci), o.contamination_height_um), cont.diameter_um[ci] / 2,
                       cont.contrast[ci] / o.ice_mfp_nm, cont.contrast[ci] * self.sigma * o.ice_v))
        vir = spec.viruses
        vi = _in_box(vir.frozen_um, box)
        groups.append(("viruses", vi, vir.frozen_um[vi], vir.height_um[vi],
                       np.full(len(vi), o.virus_diameter_um / 2),
                       np.full(len(vi), 1.0 / o.virus_mfp_nm),
                       np.full(len(vi), self.sigma * o.virus_dv_v)))
        mu: NDArray[np.float32] | None = None
        phi: NDArray[np.float32] | None = None
        px_um = geom.pixel_size_um
        for name, idx, xy, height, radius, mu_per_nm, phi_per_nm in groups:
            if len(idx) == 0:
                drawn[name] = idx
                continue
            q = spec.truth.grid_to_em_stage(xy)
            pix = geom.stage_to_pixel(q, height)
            r_px = radius / px_um
            keep = ((pix[:, 0] > -r_px - 2) & (pix[:, 0] < w + r_px + 1)
                    & (pix[:, 1] > -r_px - 2) & (pix[:, 1] < h + r_px + 1))
            drawn[name] = idx[keep]
            if not keep.any():
                continue
            if mu is None or phi is None:
                mu, phi = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
            membrane = o.virus_membrane_nm / (px_um * 1e3) if name == "viruses" else 0.0
            for k in np.nonzero(keep)[0]:
                patch = _sphere_patch(float(pix[k, 0]), float(pix[k, 1]), float(r_px[k]),
                                      membrane, (h, w))
                if patch is None:
                    continue
                rows, cols, t_px = patch
                t_nm = t_px * np.float32(px_um * 1e3)
                mu[rows, cols] += t_nm * np.float32(mu_per_nm[k])
                phi[rows, cols] += t_nm * np.float32(phi_per_nm[k])
        return mu, phi, drawn


def _coarse_window(coarse: NDArray[np.float32], tile: tuple[int, int, int, int],
                   shape: tuple[int, int]) -> NDArray[np.float32]:
    """Coarse samples around a full-resolution tile (r0, r1, c0, c1), one node of margin."""
    ny, nx = coarse.shape
    h, w = shape
    r0, r1, c0, c1 = tile
    i0 = max(0, math.floor((r0 + 0.5) * ny / h - 0.5) - 1)
    i1 = min(ny, math.ceil((r1 - 0.5) * ny / h - 0.5) + 2)
    j0 = max(0, math.floor((c0 + 0.5) * nx / w - 0.5) - 1)
    j1 = min(nx, math.ceil((c1 - 0.5) * nx / w - 0.5) + 2)
    return coarse[i0:i1, j0:j1]


def _in_box(xy: NDArray[np.float64], box: tuple[float, float, float, float]) -> NDArray[np.int_]:
    m = (xy[:, 0] >= box[0]) & (xy[:, 0] <= box[2]) & (xy[:, 1] >= box[1]) & (xy[:, 1] <= box[3])
    return np.nonzero(m)[0]


def _sphere_patch(cx: float, cy: float, r: float, membrane: float, shape: tuple[int, int]
                  ) -> tuple[slice, slice, NDArray[np.float32]] | None:
    """Projected thickness (in pixels) of a sphere of radius ``r`` px at (cx, cy).

    With ``membrane`` > 0 it is a virus: a membrane shell of that thickness plus a core of
    0.6 r at a third of the density. Small spheres are supersampled so that a sub-pixel
    bead still carries its full mass.
    """
    h, w = shape
    c0, c1 = max(0, math.floor(cx - r - 1)), min(w, math.ceil(cx + r + 2))
    r0, r1 = max(0, math.floor(cy - r - 1)), min(h, math.ceil(cy + r + 2))
    if c0 >= c1 or r0 >= r1:
        return None
    s = 1 if r >= 4 else min(8, math.ceil(8 / max(r, 0.5)))
    sub = ((np.arange(s) + 0.5) / s - 0.5).astype(np.float32)
    xs = (np.arange(c0, c1, dtype=np.float32)[:, None] + sub[None, :]).ravel() - np.float32(cx)
    ys = (np.arange(r0, r1, dtype=np.float32)[:, None] + sub[None, :]).ravel() - np.float32(cy)
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2

    def ball(radius: float) -> NDArray[np.float32]:
        return np.float32(2.0) * np.sqrt(np.maximum(np.float32(radius * radius) - d2, 0))

    t = ball(r)
    if membrane > 0:
        t = t - ball(max(r - membrane, 0.0)) + np.float32(1 / 3) * ball(0.6 * r)
    if s > 1:
        t = t.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
    return slice(r0, r1), slice(c0, c1), t.astype(np.float32)
