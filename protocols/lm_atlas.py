"""The light-microscope grid atlas: focused 20x tiles over the whole grid, stitched.

Why the steps look like this (AutoCLEM step 1, docs/clem-workflow.md): the grid sits in a
dish whose bottom is tilted by a few um over 3 mm, more than the ~1 um depth of field of a
20x/0.75, so focus has to follow the surface; and the stage misses commanded positions by
about a micrometre, so the atlas is stitched by registering the overlaps and solving a global
placement (protocols/stitching.py), never by trusting the stage.

Steps (keys under ``prefix``, default ``lm-atlas``):

- ``focus-KK``: with ``focus="map"`` (default) a few autofocus points (centre and a ring)
  are measured and a plane is fitted to them; tiles are then imaged at the plane's z. The
  plane is fitted from committed results only, so a resumed plan predicts the same z. A
  plane is enough because the film is flat on the scale of the grid and one autofocus per
  tile costs ~20 frames (5x the atlas time); ``focus="per_tile"`` refines every tile around
  its neighbour's focus, ``"fixed"`` trusts ``start_z_um`` (hardware focus lock).
- ``tile-rRR-cCC``: move, focus, snap every channel, write ``<key>.ome.tif``. Tiles follow
  the camera axes (so overlaps are even whatever the camera rotation), in a serpentine
  order; tiles that do not touch the disc of ``diameter_um`` are left out.
- ``stitch``: re-read the tiles from disc (a resumed session has nothing in memory), stitch
  the first channel, blend the others with the same placement, write ``atlas.ome.tif``
  (downsampled when it would exceed ``max_atlas_pixels``) and ``atlas.json`` with the
  pixel-to-stage affine, every overlap's quality and every tile's correction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.base import LightMicroscope, LimitViolation
from drivers.imaging import Image, affine_from
from protocols.lm_atlas_stitch import edge_json, load_atlas, register_neighbours, stitch_atlas
from protocols.lm_io import affine_json, image_record, load_images, save_images
from protocols.plan import Plan, Step, StepContext, StepResult

__all__ = ["FocusPlaneFit", "LMAtlasParams", "LMAtlasPlan", "TileSpec", "fit_focus_plane",
           "focus_points", "load_atlas", "tile_layout"]

log = structlog.get_logger(__name__)


class LMAtlasParams(BaseModel):
    """Parameters of an LM grid atlas; lengths in um, stage frame of the light microscope."""

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


@dataclass(frozen=True)
class FocusPlaneFit:
    """Focus z = z0 + sx * x + sy * y (stage um); points used and their worst residual."""

    z0_um: float
    slope: tuple[float, float]
    used: tuple[int, ...]
    max_residual_um: float

    def z_at(self, x_um: float, y_um: float) -> float:
        return self.z0_um + self.slope[0] * x_um + self.slope[1] * y_um


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


def focus_points(centre_um: tuple[float, float], diameter_um: float, n: int,
                 ring_fraction: float) -> list[tuple[float, float]]:
    """The centre and ``n - 1`` points on a ring at ``ring_fraction`` of the radius."""
    r = ring_fraction * diameter_um / 2
    pts = [(float(centre_um[0]), float(centre_um[1]))]
    for k in range(n - 1):
        a = 2 * math.pi * k / (n - 1) + math.pi / 4
        pts.append((float(centre_um[0] + r * math.cos(a)), float(centre_um[1] + r * math.sin(a))))
    return pts


def fit_focus_plane(xyz: NDArray[np.float64], max_residual_um: float) -> FocusPlaneFit:
    """Least-squares plane through (x, y, z) focus points, dropping the worst point while
    its residual exceeds ``max_residual_um`` and more than three points remain (an autofocus
    that locked onto dirt or a bar edge far from the film)."""
    keep = list(range(len(xyz)))
    while True:
        p = xyz[keep]
        a = np.column_stack([np.ones(len(p)), p[:, 0], p[:, 1]])
        coef, *_ = np.linalg.lstsq(a, p[:, 2], rcond=None)
        res = np.abs(a @ coef - p[:, 2])
        worst = int(np.argmax(res))
        if res[worst] <= max_residual_um or len(keep) <= 3:
            return FocusPlaneFit(float(coef[0]), (float(coef[1]), float(coef[2])),
                                 tuple(keep), float(res.max()))
        keep.pop(worst)


def _autofocus(lm: LightMicroscope, p: LMAtlasParams, start_z: float, wide: bool) -> float:
    """Coarse search (if ``wide``) then a fine one; both on the focus channel."""
    lm.set_channel(p.focus_channel)
    lm.move_z(start_z)
    if wide:
        lm.autofocus(p.search_range_um, p.search_step_um)
    return lm.autofocus(p.refine_range_um, p.refine_step_um)


class LMAtlasPlan(Plan):
    """Focus, tiles, stitch: see the module docstring for keys and files."""

    name = "lm_atlas"

    def __init__(self, params: LMAtlasParams) -> None:
        self.p = params
        # first-channel frames of recent tiles, for their later neighbours' overlaps (a
        # resumed plan re-reads them from their files); bounded to about two rows
        self._recent: dict[str, Image] = {}
        self._keep = 2

    # -- geometry ------------------------------------------------------------------------------

    def tiles(self, lm: LightMicroscope) -> list[TileSpec]:
        obj = lm.objectives.get(self.p.objective)
        if obj is None:
            raise LimitViolation(f"atlas objective {self.p.objective!r} not available "
                                 f"(lm.objectives: {sorted(lm.objectives)})")
        lm_shape = lm.camera_shape()
        return tile_layout(self.p.centre_um, self.p.diameter_um, obj.pixel_size_um,
                           obj.rotation_deg, obj.mirror, lm_shape, self.p.overlap)

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
        prev_key: str | None = None
        where = {(t.row, t.col): k for k, t in enumerate(tiles)}
        # serpentine order: the tile above is at most two rows back
        self._keep = 2 * (max((t.col for t in tiles), default=0) + 1) + 2
        for index, t in enumerate(tiles):
            earlier = [(where[rc], self.key(tiles[where[rc]].name))
                       for rc in ((t.row, t.col - 1), (t.row, t.col + 1), (t.row - 1, t.col))
                       if rc in where and where[rc] < index]
            if plane is not None:
                z_plan: float | None = plane.z_at(t.x_um, t.y_um)
            elif p.focus == "fixed":
                z_plan = p.start_z_um
            else:   # per tile: refine around the previous tile's focus
                z_plan = None if prev_key is None else float(ctx.result(prev_key)["z_um"])
            yield Step(self.key(t.name), self._tile_action(t, z_plan, plane, index, earlier),
                       title=f"atlas {t.name}", estimate_s=0.3 + exposure, instrument="lm")
            prev_key = self.key(t.name)
        yield Step(self.key("stitch"), self._stitch_action([self.key(t.name) for t in tiles]),
                   title="stitch the atlas", estimate_s=5.0 + 0.5 * len(tiles))

    def _focus_action(self, xy: tuple[float, float], start_z: float, wide: bool
                      ) -> Any:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            lm.set_objective(self.p.objective)
            lm.move_xy(*xy)
            z = _autofocus(lm, self.p, start_z, wide or self.p.focus != "map")
            ctx.log.info("lm_atlas.focus_point", x_um=xy[0], y_um=xy[1], z_um=round(z, 3))
            return {"xy_um": [xy[0], xy[1]], "z_um": float(z)}
        return action

    def _neighbour(self, ctx: StepContext, key: str) -> Image:
        img = self._recent.get(key)
        if img is None:     # resumed: the neighbour's step ran in an earlier process
            img = next(im for im in load_images(ctx, ctx.result(key)["path"])
                       if im.channel == self.p.channels[0])
        return img

    def _remember(self, key: str, img: Image, keep: int) -> None:
        self._recent[key] = img
        while len(self._recent) > keep:
            self._recent.pop(next(iter(self._recent)))

    def _tile_action(self, t: TileSpec, z_plan: float | None, plane: FocusPlaneFit | None,
                     index: int, earlier: list[tuple[int, str]]) -> Any:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            p = self.p
            lm.set_objective(p.objective)
            lm.move_xy(t.x_um, t.y_um)
            if p.focus == "per_tile":
                z = _autofocus(lm, p, p.start_z_um if z_plan is None else z_plan,
                               wide=z_plan is None)
            else:
                z = float(z_plan if z_plan is not None else p.start_z_um)
                lm.move_z(z)
            images = [replace_index(lm.snap(ch)) for ch in p.channels]
            rel = f"{self.key(t.name)}.ome.tif"
            art = save_images(ctx, rel, images, "lm_atlas_tile", name=t.name,
                              row=t.row, col=t.col)
            transmitted = {ch: lm.channels[ch].excitation_nm is None for ch in p.channels}
            # this tile's overlaps with the neighbours already acquired, committed with it
            first = images[0]
            pairs = register_neighbours(first, index, [(i, self._neighbour(ctx, k))
                                                       for i, k in earlier],
                                        p.max_stage_error_um)
            self._remember(self.key(t.name), first, keep=self._keep)
            return {"row": t.row, "col": t.col, "path": rel, "artifacts": [art],
                    "pairs": [edge_json(e) for e in pairs],
                    "z_um": float(z), "stage_um": [t.x_um, t.y_um, float(z)],
                    "pixel_to_stage": affine_json(images[0].pixel_to_stage),
                    "transmitted": transmitted,
                    "focus_plane": None if plane is None else {
                        "z0_um": plane.z0_um, "slope": list(plane.slope),
                        "used_points": list(plane.used),
                        "max_residual_um": plane.max_residual_um},
                    "frames": [image_record(im) for im in images]}
        return action

    def _stitch_action(self, tile_keys: list[str]) -> Any:
        def action(ctx: StepContext) -> StepResult:
            return stitch_atlas(ctx, self.p, tile_keys)
        return action


def replace_index(img: Image) -> Image:
    """Tiles are single planes: t = 0, z = 0 whatever the focus, so channels stack as C."""
    return img.with_data(img.data, index={"t": 0, "z": 0})


