"""EM atlas: a low-magnification montage of the whole grid, stitched, with its affine.

AutoCLEM step 6: 14 x 14 tiles at ~200x (SerialEM's LMM). The atlas is what the fLM atlas is
registered to (square correlation), so it must cover the grid and carry a pixel-to-stage
affine. The tile grid is sized from ``grid_radius_um`` and the camera field, and tiles whose
footprint misses the grid disc are dropped (corners of the square layout show only the
cartridge ring). A tile outside the stage limits refuses the plan before anything moves.

Steps: ``em-atlas/tile-NNN`` (move, expose in the Search area, write the tile), then
``em-atlas/stitch`` (write ``em-atlas.mrc`` and ``em-atlas.json`` with the affine and the
overlap report).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
from pydantic import Field

from drivers.base import ElectronMicroscope, LowDoseArea
from protocols.em_montage import (
    Acquisition,
    MontageLayout,
    check_layout,
    grid_positions,
    montage_steps,
    resolve_acquisition,
)
from protocols.em_params import FrozenParams, SettingsOverride, StitchParams
from protocols.plan import Plan, Step, StepContext
from protocols.stitching import StitchSettings

__all__ = ["ATLAS_KEY", "EMAtlasParams", "EMAtlasPlan"]

#: Step key of the atlas stitch step, whose result holds the atlas files and affine.
ATLAS_KEY = "em-atlas/stitch"


class EMAtlasParams(FrozenParams):
    """Params of the EM atlas (micrometres, EM stage frame)."""

    kind: Literal["em_atlas"] = "em_atlas"
    centre_um: tuple[float, float] = (0.0, 0.0)
    grid_radius_um: float = Field(default=1525.0, gt=0, le=5000)
    overlap: float = Field(default=0.15, ge=0.05, lt=0.5)
    area: LowDoseArea = LowDoseArea.SEARCH
    settings: SettingsOverride | None = None
    stitch: StitchParams = StitchParams(max_stage_error_um=5.0, smoothing_sigma_px=1.0)
    approach_um: float = Field(default=0.0, ge=0, le=50)
    acquisition: Acquisition = "auto"


class EMAtlasPlan(Plan):
    """Tiles of the grid at the Search preset, one step each, then one stitch step."""

    name = "em_atlas"

    def __init__(self, params: EMAtlasParams) -> None:
        self.p = params

    def layout(self, em: ElectronMicroscope) -> MontageLayout:
        """Tile positions covering the grid disc (all of them in ``montage`` mode)."""
        p = self.p
        settings = (p.settings or SettingsOverride()).apply(em, p.area)
        h, w = em.camera_shape(settings.binning)
        px = em.magnification(settings.mag_index).pixel_size_um * settings.binning
        field = np.array([w * px, h * px])
        step = field * (1 - p.overlap)
        n = [max(1, math.ceil((2 * p.grid_radius_um - f) / s) + 1) for f, s in zip(field, step,
                                                                               strict=True)]
        tiles_xy = (int(n[0]), int(n[1]))
        positions = grid_positions(em, p.centre_um, tiles_xy, p.overlap, settings)
        acquisition = resolve_acquisition(em, p.acquisition, p.centre_um, tiles_xy, p.overlap,
                                          p.area, settings)
        if acquisition == "tiles":
            reach = p.grid_radius_um + 0.5 * float(np.hypot(*field))
            c = np.asarray(p.centre_um)
            positions = [xy for xy in positions if np.hypot(*(np.asarray(xy) - c)) <= reach]
        s = p.stitch
        return MontageLayout(
            prefix="em-atlas", stem="em-atlas", title="EM atlas", area=p.area, settings=settings,
            override=p.settings is not None, centre_um=p.centre_um, tiles_xy=tiles_xy,
            overlap=p.overlap, positions=tuple(positions),
            stitch=StitchSettings(max_stage_error_um=s.max_stage_error_um,
                                  smoothing_sigma_px=s.smoothing_sigma_px, min_ncc=s.min_ncc,
                                  output_pixel_um=s.output_pixel_um),
            approach_um=p.approach_um, acquisition=acquisition)

    def validate(self, ctx: StepContext) -> None:
        em = ctx.require_em()
        check_layout(em, self.layout(em), "EM atlas")

    def total_steps(self, ctx: StepContext) -> int | None:
        return len(self.layout(ctx.require_em()).tile_keys) + 1

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        em = ctx.require_em()
        layout = self.layout(em)
        ctx.log.info("em.atlas.plan", tiles=len(layout.positions), tiles_xy=layout.tiles_xy)
        yield from montage_steps(layout, ctx, extra=lambda c: {"kind": "em_atlas"})
