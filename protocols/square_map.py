"""Square maps: medium-magnification montages of the selected grid squares.

AutoCLEM step 8: 12 x 12 tiles at 4,700x with 20% overlap and a large defocus, so that the
200 nm beads show (SerialEM's MMM, here the View preset). The maps are where beads are found
for correlation and what every target is realigned to, so their pixel-to-stage affine must
hold to well under a micrometre: the tiles are approached from one side (no backlash between
neighbours) and stitched by their overlaps (protocols/stitching.py).

Why an overview first: over a square with cells, tiles over thick cell bodies have no usable
overlap; one image of the whole map at a lower magnification (the highest whose field holds
it) anchors every tile that shows anything (protocols/em_overview.py), and tiles with neither
overlap nor overview match are flagged with their expected error (the stage's).

Steps per square: ``square-{id}/map/overview`` (unless ``overview`` is None),
``square-{id}/map/tile-NNN``, then ``square-{id}/map/stitch``, which writes
``square-{id}-map.mrc`` and ``square-{id}-map.json`` (affine, overlap report). Squares are
visited in the order given; every tile of every square is checked against the stage limits
before anything moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, field_validator

from drivers.base import ElectronMicroscope, LowDoseArea
from protocols.em_acquire import APPROACH_UM
from protocols.em_montage import (
    Acquisition,
    MontageLayout,
    check_layout,
    grid_positions,
    montage_steps,
    resolve_acquisition,
)
from protocols.em_overview import OverviewParams, montage_corners, overview_settings
from protocols.em_params import FrozenParams, SettingsOverride, StitchParams
from protocols.plan import Plan, Step, StepContext
from protocols.stitching import StitchSettings

__all__ = ["ID_CHARS", "SquareMapParams", "SquareMapPlan", "SquareSpec", "map_key"]

ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-.")


def map_key(square_id: str) -> str:
    """Step key of a square map's stitch step, whose result holds the map's files and affine."""
    return f"square-{square_id}/map/stitch"


class SquareSpec(FrozenParams):
    """One square to map: an id (used in step keys and file names) and its EM stage centre."""

    id: str = Field(min_length=1, max_length=32)
    x_um: float
    y_um: float

    @field_validator("id")
    @classmethod
    def _id_is_a_key(cls, v: str) -> str:
        if not set(v) <= ID_CHARS:
            raise ValueError(f"square id {v!r} may hold only letters, digits and _+-.")
        return v


class SquareMapParams(FrozenParams):
    """Params of the square maps (micrometres, EM stage frame)."""

    kind: Literal["square_map"] = "square_map"
    squares: tuple[SquareSpec, ...] = Field(min_length=1)
    tiles_xy: tuple[int, int] = (12, 12)
    overlap: float = Field(default=0.2, ge=0.05, lt=0.5)
    area: LowDoseArea = LowDoseArea.VIEW
    settings: SettingsOverride | None = None
    stitch: StitchParams = StitchParams()
    approach_um: float = Field(default=APPROACH_UM, ge=0, le=50)
    acquisition: Acquisition = "auto"
    overview: OverviewParams | None = OverviewParams()

    @field_validator("tiles_xy")
    @classmethod
    def _tiles(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (1 <= v[0] <= 64 and 1 <= v[1] <= 64):
            raise ValueError(f"tiles_xy {v} must lie within 1..64 in each direction")
        return v

    @field_validator("squares")
    @classmethod
    def _unique(cls, v: tuple[SquareSpec, ...]) -> tuple[SquareSpec, ...]:
        ids = [s.id for s in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"square ids must be unique, got {ids}")
        return v


class SquareMapPlan(Plan):
    """For each square: tiles at the View preset (4,700x), one step each, then a stitch step."""

    name = "square_map"

    def __init__(self, params: SquareMapParams) -> None:
        self.p = params

    def layout(self, em: ElectronMicroscope, square: SquareSpec) -> MontageLayout:
        p = self.p
        settings = (p.settings or SettingsOverride()).apply(em, p.area)
        centre = (square.x_um, square.y_um)
        positions = grid_positions(em, centre, p.tiles_xy, p.overlap, settings)
        s = p.stitch
        overview = None if p.overview is None else overview_settings(
            em, settings, montage_corners(em, positions, settings), p.overview)
        return MontageLayout(
            prefix=f"square-{square.id}/map", stem=f"square-{square.id}-map",
            title=f"square {square.id} map", area=p.area, settings=settings,
            override=p.settings is not None, centre_um=centre, tiles_xy=p.tiles_xy,
            overlap=p.overlap, positions=tuple(positions),
            stitch=StitchSettings(max_stage_error_um=s.max_stage_error_um,
                                  smoothing_sigma_px=s.smoothing_sigma_px, min_ncc=s.min_ncc,
                                  output_pixel_um=s.output_pixel_um,
                                  stage_rms_um=s.stage_rms_um, dark_fraction=0.01,
                                  log_gradient=True),
            approach_um=p.approach_um,
            acquisition=resolve_acquisition(em, p.acquisition, centre, p.tiles_xy, p.overlap,
                                            p.area, settings),
            overview=overview,
            overview_sigma_px=(1.0 if p.overview is None
                               else p.overview.smoothing_sigma_px))

    def validate(self, ctx: StepContext) -> None:
        em = ctx.require_em()
        for square in self.p.squares:
            check_layout(em, self.layout(em, square), f"square {square.id} map")

    def total_steps(self, ctx: StepContext) -> int | None:
        em = ctx.require_em()
        return sum(len(self.layout(em, s).tile_keys) + 1 + int(self.p.overview is not None)
                   for s in self.p.squares)

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        em = ctx.require_em()
        for square in self.p.squares:
            layout = self.layout(em, square)

            def extra(c: StepContext, sq: SquareSpec = square) -> dict[str, object]:
                return {"kind": "square_map", "square_id": sq.id,
                        "square_centre_um": [sq.x_um, sq.y_um]}

            yield from montage_steps(layout, ctx, extra=extra)
