"""The light-microscope grid atlas: focused 20x tiles over the whole grid, stitched.

Why the steps look like this (AutoCLEM step 1, docs/clem-workflow.md): the grid sits in a
dish whose bottom is tilted by a few um over 3 mm, more than the ~1 um depth of field of a
20x/0.75, so focus has to follow the surface; and the stage misses commanded positions by
about a micrometre, so the atlas is stitched by registering the overlaps and solving a global
placement, never by trusting the stage.

Steps (keys under ``prefix``, default ``lm-atlas``):

- ``focus-KK``: with ``focus="map"`` (default) a few autofocus points (centre and a ring)
  are measured and a plane is fitted to them (protocols/lm_atlas_focus.py); tiles are then
  imaged at the plane's z. The plane is fitted from committed results only, so a resumed plan
  predicts the same z. ``focus="per_tile"`` refines every tile around its neighbour's focus,
  ``"fixed"`` trusts ``start_z_um`` (hardware focus lock).
- ``tile-rRR-cCC``: move, focus, snap every channel; commits the tile's ``<key>.ome.tif`` and
  its overlaps with the neighbours acquired before it. Tiles follow the camera axes (so
  overlaps are even whatever the camera rotation), in a serpentine order; tiles that do not
  touch the disc of ``diameter_um`` are left out.
- ``stitch``: the global solve with every committed overlap, the atlas finished and written
  as ``atlas.ome.tif`` (downsampled when it would exceed ``max_atlas_pixels``) with
  ``atlas.json`` (pixel-to-stage affine, every overlap's quality, every tile's correction).

Compute runs while the hardware works (protocols/lm_atlas_build.py): a tile's registration,
file and blend are queued to background threads as its frames come in, and its step acquires
the *next* tile before it waits for them, so it commits its tile (file and overlaps durable)
after the next tile's exposures. After an interruption the next tile is its own step's: a plan
object that continues uses the frames taken, a rebuilt one acquires them again; no step runs
twice. The instrument is driven only from the runner's thread, in the same order as without
background threads, so the same seed gives the same tiles, overlaps and atlas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.base import LightMicroscope, LimitViolation
from drivers.errors import ClemdError
from drivers.imaging import Image, affine_from
from protocols.compute_lane import Job
from protocols.lm_atlas_build import AtlasBuilder
from protocols.lm_atlas_focus import FocusPlaneFit, fit_focus_plane, focus_points, focus_search
from protocols.lm_atlas_stitch import edge_from_json, edge_json, load_atlas, write_atlas
from protocols.lm_io import affine_json, image_record
from protocols.mosaic_solve import Edge
from protocols.plan import Plan, Step, StepContext, StepResult

__all__ = ["FocusPlaneFit", "LMAtlasParams", "LMAtlasPlan", "TileSpec", "fit_focus_plane",
           "focus_points", "load_atlas", "tile_layout"]

log = structlog.get_logger(__name__)


class LMAtlasParams(BaseModel):
    """Parameters of an LM grid atlas; lengths in um, stage frame of the light microscope.

    ``flat_field_tiles``: the illumination of transmitted channels is fitted on the first
    this many tiles, so the others can be blended as they arrive (protocols/lm_atlas_build.py).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["lm_atlas"] = "lm_atlas"
    centre_um: tuple[float, float] = (0.0, 0.0)
    diameter_um: float = Field(3050.0, gt=0, le=20000)
    objective: str = Field("20x", min_length=1)
    channels: tuple[str, ...] = Field(("BF", "DIC"), min_length=1)
    overlap: float = Field(0.1, ge=0.02, le=0.5)
    focus: Literal["map", "per_tile", "fixed"] = "map"
    focus_channel: str = Field("BF", min_length=1)
    focus_points: int = Field(5, ge=3, le=25)
    focus_ring_fraction: float = Field(0.5, gt=0, le=1.0)
    start_z_um: float = 0.0
    search_range_um: float = Field(20.0, gt=0, le=500)
    search_step_um: float = Field(2.0, gt=0, le=50)
    refine_range_um: float = Field(3.0, gt=0, le=50)
    refine_step_um: float = Field(0.5, gt=0, le=10)
    max_plane_residual_um: float = Field(1.5, gt=0)
    max_stage_error_um: float = Field(3.0, gt=0, le=100)
    atlas_pixel_um: float | None = Field(None, gt=0)
    max_atlas_pixels: int = Field(25_000_000, ge=10_000)
    max_tiles: int = Field(400, ge=1)
    flat_field: bool = True
    flat_field_tiles: int = Field(9, ge=4, le=400)
    prefix: str = Field("lm-atlas", pattern=r"^[a-z0-9][a-z0-9_/-]*$")

    @model_validator(mode="after")
    def _check(self) -> LMAtlasParams:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels {self.channels} lists a channel twice")
        if self.search_step_um > self.search_range_um:
            raise ValueError("search_step_um must not exceed search_range_um")
        if self.refine_step_um > self.refine_range_um:
            raise ValueError("refine_step_um must not exceed refine_range_um")
        return self


@dataclass(frozen=True)
class TileSpec:
    """One atlas tile: its place in the tile grid and the stage position of its centre."""

    row: int
    col: int
    x_um: float
    y_um: float

    @property
    def name(self) -> str:
        return f"tile-r{self.row:02d}-c{self.col:02d}"


def tile_layout(centre_um: tuple[float, float], diameter_um: float, pixel_size_um: float,
                rotation_deg: float, mirror: bool, shape: tuple[int, int], overlap: float
                ) -> list[TileSpec]:
    """Tiles along the camera axes covering the disc, in serpentine order.

    The number per axis is the fewest whose fields, stepped by the field minus the overlap,
    span ``diameter_um``; tiles whose field misses the disc are dropped.
    """
    h, w = shape
    linear = affine_from(pixel_size_um, rotation_deg, (0.0, 0.0), (1, 1), mirror)[:, :2]
    steps_px = (w * (1 - overlap), h * (1 - overlap))
    counts = [max(1, math.ceil((diameter_um - n * pixel_size_um) / (s * pixel_size_um) - 1e-9) + 1)
              for n, s in ((w, steps_px[0]), (h, steps_px[1]))]
    nx, ny = counts
    radius = diameter_um / 2
    half = np.array([w * pixel_size_um / 2, h * pixel_size_um / 2])
    tiles = []
    for r in range(ny):
        cols = range(nx) if r % 2 == 0 else range(nx - 1, -1, -1)
        for c in cols:
            local = np.array([(c - (nx - 1) / 2) * steps_px[0], (r - (ny - 1) / 2) * steps_px[1]])
            # distance from the disc centre to the nearest point of the field (camera axes)
            centre_cam = local * pixel_size_um
            nearest = np.maximum(np.abs(centre_cam) - half, 0.0)
            if float(np.hypot(*nearest)) > radius:
                continue
            d = linear @ local
            tiles.append(TileSpec(r, c, float(centre_um[0] + d[0]), float(centre_um[1] + d[1])))
    return tiles


@dataclass
class _Flight:
    """A tile acquired, its overlaps and file queued (not yet committed)."""

    index: int
    z_um: float
    images: list[Image]
    registered: Job[list[Edge]]
    written: Job[dict[str, Any]]


@dataclass
class _AtlasRun:
    """What one run of the plan holds between steps: the builder, the next tile if it was
    acquired already, or the error that acquiring it raised (that tile's step raises it)."""

    owner: tuple[str, int]
    builder: AtlasBuilder
    prefetched: dict[int, _Flight] = field(default_factory=dict)
    errors: dict[int, ClemdError] = field(default_factory=dict)

    def take(self, index: int) -> _Flight | None:
        if index in self.errors:
            raise self.errors.pop(index)
        return self.prefetched.pop(index, None)

    def prefetch(self, index: int, acquire: Callable[[], _Flight]) -> None:
        if index in self.prefetched:
            return
        try:
            self.prefetched[index] = acquire()
        except ClemdError as err:   # the next tile's failure: raised by the next tile's step
            self.errors[index] = err


class LMAtlasPlan(Plan):
    """Focus, tiles, stitch: see the module docstring for keys and files."""

    name = "lm_atlas"

    def __init__(self, params: LMAtlasParams) -> None:
        self.p = params
        self._run: _AtlasRun | None = None

    # -- geometry ------------------------------------------------------------------------------

    def tiles(self, lm: LightMicroscope) -> list[TileSpec]:
        obj = lm.objectives.get(self.p.objective)
        if obj is None:
            raise LimitViolation(f"atlas objective {self.p.objective!r} not available "
                                 f"(lm.objectives: {sorted(lm.objectives)})")
        return tile_layout(self.p.centre_um, self.p.diameter_um, obj.pixel_size_um,
                           obj.rotation_deg, obj.mirror, lm.camera_shape(), self.p.overlap)

    def _focus_xy(self) -> list[tuple[float, float]]:
        if self.p.focus != "map":
            return []
        return focus_points(self.p.centre_um, self.p.diameter_um, self.p.focus_points,
                            self.p.focus_ring_fraction)

    def validate(self, ctx: StepContext) -> None:
        """Refuse before anything moves: unknown objective or channel, tiles off the stage."""
        lm = ctx.require_lm()
        for ch in (*self.p.channels, self.p.focus_channel):
            if ch not in lm.channels:
                raise LimitViolation(f"atlas channel {ch!r} not available "
                                     f"(lm.channels: {sorted(lm.channels)})")
        tiles = self.tiles(lm)
        if len(tiles) > self.p.max_tiles:
            h, w = lm.camera_shape()
            raise LimitViolation(
                f"atlas needs {len(tiles)} tiles of {w}x{h} px at {self.p.objective} for "
                f"{self.p.diameter_um:g} um, more than max_tiles {self.p.max_tiles}: use a larger "
                f"camera field or a lower magnification, or raise max_tiles")
        for t in tiles:
            try:
                lm.limits.check_xy(t.x_um, t.y_um)
            except LimitViolation as err:
                raise LimitViolation(f"atlas {t.name} at ({t.x_um:.1f}, {t.y_um:.1f}) um: "
                                     f"{err}; reduce diameter_um or move centre_um") from err
        for x, y in self._focus_xy():
            lm.limits.check_xy(x, y)
        half = self.p.search_range_um / 2
        for z in (self.p.start_z_um - half, self.p.start_z_um + half):
            if not lm.limits.z.contains(z):
                raise LimitViolation(f"atlas focus search {self.p.start_z_um:g} +- {half:g} um "
                                     f"leaves the z limits [{lm.limits.z.lower:g}, "
                                     f"{lm.limits.z.upper:g}]")

    def total_steps(self, ctx: StepContext) -> int | None:
        return len(self._focus_xy()) + len(self.tiles(ctx.require_lm())) + 1

    def key(self, name: str) -> str:
        return f"{self.p.prefix}/{name}"

    def _state(self, ctx: StepContext) -> _AtlasRun:
        """This run's builder (a new one for another session folder or journal)."""
        owner = (str(ctx.data_dir), id(ctx.store))
        if self._run is None or self._run.owner != owner:
            if self._run is not None:
                self._run.builder.close()
            lm = ctx.require_lm()
            obj = lm.objectives[self.p.objective]
            shape = lm.camera_shape()
            tiles = self.tiles(lm)
            planned = [affine_from(obj.pixel_size_um, obj.rotation_deg, (t.x_um, t.y_um), shape,
                                   obj.mirror) for t in tiles]
            transmitted = {ch: lm.channels[ch].excitation_nm is None for ch in self.p.channels}
            builder = AtlasBuilder(ctx, self.p, [self.key(t.name) for t in tiles], planned,
                                   shape, obj.pixel_size_um, transmitted)
            self._run = _AtlasRun(owner, builder)
        return self._run

    def _z_for(self, t: TileSpec, plane: FocusPlaneFit | None, prev_z: float | None
               ) -> float | None:
        """Where a tile is imaged: the focus plane, ``start_z_um``, or (per tile) the
        previous tile's focus to refine around (None: the first tile, searched widely)."""
        if plane is not None:
            return plane.z_at(t.x_um, t.y_um)
        if self.p.focus == "fixed":
            return self.p.start_z_um
        return prev_z

    # -- steps -------------------------------------------------------------------------------

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        lm = ctx.require_lm()
        p = self.p
        points = self._focus_xy()
        for k, xy in enumerate(points):
            prev = p.start_z_um if k == 0 else ctx.result(self.key(f"focus-{k - 1:02d}"))["z_um"]
            yield Step(self.key(f"focus-{k:02d}"), self._focus_action(xy, float(prev), k == 0),
                       title=f"atlas focus point {k + 1}/{len(points)}", estimate_s=5.0,
                       instrument="lm")
        plane: FocusPlaneFit | None = None
        if points:
            xyz = np.array([[*xy, ctx.result(self.key(f"focus-{k:02d}"))["z_um"]]
                            for k, xy in enumerate(points)])
            plane = fit_focus_plane(xyz, p.max_plane_residual_um)
        tiles = self.tiles(lm)
        exposure = sum(lm.channels[c].exposure_s for c in p.channels)
        where = {(t.row, t.col): k for k, t in enumerate(tiles)}
        earlier = [[(where[rc], self.key(tiles[where[rc]].name))
                    for rc in ((t.row, t.col - 1), (t.row, t.col + 1), (t.row - 1, t.col))
                    if rc in where and where[rc] < index] for index, t in enumerate(tiles)]
        prev_z: float | None = None
        for index, t in enumerate(tiles):
            if index > 0 and p.focus == "per_tile":
                prev_z = float(ctx.result(self.key(tiles[index - 1].name))["z_um"])
            action = self._tile_action(tiles, index, self._z_for(t, plane, prev_z), plane,
                                       earlier)
            yield Step(self.key(t.name), action, title=f"atlas {t.name}",
                       estimate_s=0.3 + exposure, instrument="lm")
        yield Step(self.key("stitch"), self._stitch_action([self.key(t.name) for t in tiles]),
                   title="stitch the atlas", estimate_s=1.0 + 0.05 * len(tiles))

    def _focus_action(self, xy: tuple[float, float], start_z: float, wide: bool
                      ) -> Callable[[StepContext], StepResult]:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            lane = self._state(ctx).builder.io
            lm.set_objective(self.p.objective)
            lm.move_xy(*xy)
            z = focus_search(lm, self.p, start_z, wide or self.p.focus != "map", lane)
            ctx.log.info("lm_atlas.focus_point", x_um=xy[0], y_um=xy[1], z_um=round(z, 3))
            return {"xy_um": [xy[0], xy[1]], "z_um": float(z)}
        return action

    def _acquire(self, ctx: StepContext, run: _AtlasRun, t: TileSpec, index: int,
                 z_plan: float | None, earlier: list[tuple[int, str]]) -> _Flight:
        """Move, focus and snap one tile; queue its overlaps as soon as the first channel is
        in, then its file and its blend."""
        lm = ctx.require_lm()
        p = self.p
        builder = run.builder
        builder.start_tile(index)
        lm.set_objective(p.objective)
        lm.move_xy(t.x_um, t.y_um)
        if p.focus == "per_tile":
            z = focus_search(lm, p, p.start_z_um if z_plan is None else z_plan,
                           z_plan is None, builder.io)
        else:
            z = float(z_plan if z_plan is not None else p.start_z_um)
            lm.move_z(z)
        images: list[Image] = []
        registered: Job[list[Edge]] | None = None
        for ch in p.channels:
            images.append(replace_index(lm.snap(ch)))
            if registered is None:
                registered = builder.register(index, images[0], earlier)
        assert registered is not None           # channels has at least one entry
        written = builder.write(index, images, name=t.name, row=t.row, col=t.col)
        builder.blend(index, images, registered)
        return _Flight(index, float(z), images, registered, written)

    def _tile_action(self, tiles: list[TileSpec], index: int, z_plan: float | None,
                     plane: FocusPlaneFit | None, earlier: list[list[tuple[int, str]]]
                     ) -> Callable[[StepContext], StepResult]:
        t = tiles[index]

        def action(ctx: StepContext) -> StepResult:
            run = self._state(ctx)
            flight = run.take(index) or self._acquire(ctx, run, t, index, z_plan,
                                                        earlier[index])
            if index + 1 < len(tiles):       # the next tile's hardware, while this one computes
                nxt = tiles[index + 1]
                z_next = self._z_for(nxt, plane, flight.z_um)
                run.prefetch(index + 1, lambda: self._acquire(ctx, run, nxt, index + 1, z_next,
                                                              earlier[index + 1]))
            pairs = flight.registered.result()
            art = flight.written.result()
            images, z = flight.images, flight.z_um
            return {"row": t.row, "col": t.col, "path": art["path"], "artifacts": [art],
                    "pairs": [edge_json(e) for e in pairs],
                    "z_um": z, "stage_um": [t.x_um, t.y_um, z],
                    "pixel_to_stage": affine_json(images[0].pixel_to_stage),
                    "transmitted": dict(run.builder.transmitted),
                    "focus_plane": None if plane is None else {
                        "z0_um": plane.z0_um, "slope": list(plane.slope),
                        "used_points": list(plane.used),
                        "max_residual_um": plane.max_residual_um},
                    "frames": [image_record(im) for im in images]}
        return action

    def _stitch_action(self, tile_keys: list[str]) -> Callable[[StepContext], StepResult]:
        def action(ctx: StepContext) -> StepResult:
            run = self._state(ctx)
            results = [ctx.result(k) for k in tile_keys]
            pairs = [edge_from_json(e) for r in results for e in r["pairs"]]
            try:
                product = run.builder.finish(results, pairs)
            finally:
                run.builder.close()
                self._run = None
            try:
                return write_atlas(ctx, self.p, tile_keys, product)
            except BaseException:
                product.stream.discard()
                raise
        return action


def replace_index(img: Image) -> Image:
    """Tiles are single planes: t = 0, z = 0 whatever the focus, so channels stack as C."""
    return img.with_data(img.data, index={"t": 0, "z": 0})
