"""The simulated TEM as the EM protocol tests and benchmark use it, and its ground truth.

Frames stay small (256-512 px) but keep the real fields of view: the camera is the real
4096 x 4096 and every low-dose preset is binned (Search 200x bin 16, View 4,700x bin 8,
Focus/Trial/Record 39,000x bin 8: 2.24 nm pixels, 1.15 um field). Only tests and benchmarks
import this module; ground truth comes from the simulator (``true_pixel_to_stage``) and the
specimen (``spec.truth``), never from the protocols.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.base import Image
from drivers.clock import VirtualClock
from drivers.imaging import apply_affine, invert_affine
from protocols.plan import MemoryStepStore, StepContext
from simulators.electron import SimulatedElectronMicroscope
from simulators.specimen import Specimen, SquareState

LOW_DOSE: dict[str, Any] = {
    "search": {"mag_index": 6, "exposure_s": 0.5, "binning": 16, "dose_rate_e_per_a2_s": 0.002},
    "view": {"mag_index": 16, "exposure_s": 1.0, "binning": 8, "dose_rate_e_per_a2_s": 0.02,
             "defocus_offset_um": -50.0},
    "focus": {"mag_index": 24, "exposure_s": 0.5, "binning": 8, "dose_rate_e_per_a2_s": 2.0,
              "axis_offset_um": 2.0},
    "trial": {"mag_index": 24, "exposure_s": 0.5, "binning": 8, "dose_rate_e_per_a2_s": 0.5,
              "axis_offset_um": 2.0},
    "record": {"mag_index": 24, "exposure_s": 1.2, "binning": 8, "dose_rate_e_per_a2_s": 2.0},
}
#: Intermediate magnification of realign: 11,500x binned 8 (7.6 nm pixels, 3.9 um field).
FINE_MAG_INDEX = 19


def make_em(spec: Specimen, seed: int = 0, **overrides: Any) -> SimulatedElectronMicroscope:
    """A simulated TEM with the real stage error (1 um rms, backlash) and binned presets."""
    return SimulatedElectronMicroscope.for_tests(spec, VirtualClock(), camera=(4096, 4096),
                                                 seed=seed, low_dose=LOW_DOSE, **overrides)


def context(em: SimulatedElectronMicroscope, data_dir: Path,
            store: MemoryStepStore | None = None) -> StepContext:
    return StepContext(clock=em.clock, data_dir=data_dir, store=store or MemoryStepStore(),
                       em=em)


def good_squares(spec: Specimen, *, cells: bool | None = None) -> list[Any]:
    """Whole squares with usable ice, optionally only those with (or without) cells."""
    out = [s for s in spec.squares if s.state == SquareState.OK and not s.partial
           and abs(s.i) + abs(s.j) > 0]
    if cells is not None:
        out = [s for s in out if bool(s.cell_ids) == cells]
    return out


def em_xy(spec: Specimen, grid_xy: Any) -> NDArray[np.float64]:
    return np.asarray(spec.truth.grid_to_em_stage(np.asarray(grid_xy, float)), dtype=np.float64)


def tile_errors_um(em: SimulatedElectronMicroscope, tiles: list[Image],
                   affines: list[NDArray[np.float64]]) -> NDArray[np.float64]:
    """Worst corner distance (um) per tile between ``affines`` and the tiles' true affines."""
    out = []
    for tile, a in zip(tiles, affines, strict=True):
        h, w = tile.shape
        c = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
        d = apply_affine(a, c) - apply_affine(em.true_pixel_to_stage(tile), c)
        out.append(float(np.hypot(d[:, 0], d[:, 1]).max()))
    return np.asarray(out)


def true_stage_of_map_pixel(em: SimulatedElectronMicroscope, tiles: list[Image],
                            placements: list[NDArray[np.float64]],
                            pixel_stage_um: NDArray[np.float64]) -> NDArray[np.float64]:
    """True stage position of the map point the map's affine calls ``pixel_stage_um``.

    Uses the tile whose (stitched) footprint holds the point closest to its centre.
    """
    best, best_d = None, np.inf
    for tile, a in zip(tiles, placements, strict=True):
        p = apply_affine(invert_affine(a), pixel_stage_um)
        h, w = tile.shape
        d = float(np.abs(p - np.array([(w - 1) / 2, (h - 1) / 2])).max())
        if d < best_d:
            best, best_d = (tile, p), d
    assert best is not None
    tile, p = best
    return np.asarray(apply_affine(em.true_pixel_to_stage(tile), p), dtype=np.float64)


def miss_nm(em: SimulatedElectronMicroscope, img: Image, truth_xy: NDArray[np.float64],
            height_um: float = 0.0) -> float:
    """Distance (nm, image plane) of a true stage point from the centre of ``img``."""
    centre = (np.array(img.shape[::-1], float) - 1) / 2
    p = em.true_stage_to_pixel(img, truth_xy, height_um)[0]
    return float(np.hypot(*(p - centre)) * img.pixel_size_um * 1e3)


class MappedSquare:
    """A square mapped by SquareMapPlan (id ``m``), with what the tests need of the truth."""

    def __init__(self, em: SimulatedElectronMicroscope, spec: Specimen, data_dir: Path,
                 square: int = 3, tiles_xy: tuple[int, int] = (3, 3)) -> None:
        import json

        from protocols.em_acquire import load_frame
        from protocols.plan import run_plan
        from protocols.square_map import SquareMapParams, SquareMapPlan, map_key

        self.em, self.data_dir = em, data_dir
        self.centre = em_xy(spec, good_squares(spec, cells=False)[square].centre_um)
        self.store = MemoryStepStore()
        ctx = context(em, data_dir, self.store)
        run_plan(SquareMapPlan(SquareMapParams(
            squares=({"id": "m", "x_um": float(self.centre[0]), "y_um": float(self.centre[1])},),
            tiles_xy=tiles_xy)), ctx)
        self.result = ctx.result(map_key("m"))
        sidecar = json.loads((data_dir / self.result["json"]).read_text())
        n = tiles_xy[0] * tiles_xy[1]
        self.tiles = [load_frame(data_dir, ctx.result(f"square-m/map/tile-{k:03d}"))
                      for k in range(n)]
        self.placements = []
        for tile, corr in zip(self.tiles, sidecar["tile_corrections_um"], strict=True):
            a = tile.pixel_to_stage.copy()
            a[:, 2] += corr
            self.placements.append(a)

    def target(self, offset_um: tuple[float, float]) -> tuple[NDArray[np.float64],
                                                              NDArray[np.float64]]:
        """A target picked on the map (map frame) and where it truly is (stage frame)."""
        nominal = self.centre + np.asarray(offset_um, float)
        return nominal, true_stage_of_map_pixel(self.em, self.tiles, self.placements, nominal)
