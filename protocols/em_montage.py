"""Montages as keyed steps: one step per tile, then one stitch step (EM atlas, square maps).

Why one step per tile: a 14 x 14 atlas or a 12 x 12 square map takes minutes; a crash in
the middle must cost one tile, not the montage. Each tile step moves, exposes, writes the
tile as MRC and commits its path and nominal affine; the stitch step rebuilds the tiles from
their files (protocols/em_acquire.py), stitches them (protocols/stitching.py) and writes the
mosaic MRC with a JSON sidecar holding its pixel-to-stage affine and the overlap report.
With an overview (``layout.overview``, square maps) an ``overview`` step first images the
whole montage at a lower magnification; the stitch step matches every tile against it and
uses the matches as absolute constraints (protocols/em_overview.py), which places tiles whose
overlaps show nothing (thick cell bodies).

On a real SerialEM with a montage folder (``em.native_montage``) the plan instead runs one
``montage`` step: SerialEM's own montage, one journal entry for all tiles (a crash mid-way
repeats the montage). ``acquisition="auto"``, the default, chooses it whenever the driver has
it and SerialEM can lay this montage out (its own limits: area, frame and overlap in pixels,
the whole rectangle inside the stage limits); else tiles. "tiles" and "montage" force one.

Every tile position (and its backlash take-up point) is checked against the stage limits
in ``validate`` before anything moves; a refusal names the tile, its position and the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from drivers.base import AcquisitionSettings, ElectronMicroscope, Image, LowDoseArea
from drivers.errors import LimitViolation
from protocols.atomic_write import write_text_atomic
from protocols.em_acquire import approach, load_frame, save_frame
from protocols.em_overview import match_tiles
from protocols.mrc_io import write_mrc
from protocols.plan import Step, StepContext, StepResult
from protocols.stitching import Mosaic, StitchSettings, stitch

__all__ = ["Acquisition", "MontageLayout", "check_layout", "check_positions", "grid_positions",
           "map_image", "montage_steps", "read_map_sidecar", "resolve_acquisition", "tile_metas"]

Acquisition = Literal["auto", "tiles", "montage"]
Resolved = Literal["tiles", "montage"]
log = structlog.get_logger("clemd.protocols.em_montage")


def resolve_acquisition(em: ElectronMicroscope, requested: Acquisition,
                        centre_um: tuple[float, float], tiles_xy: tuple[int, int],
                        overlap: float, area: LowDoseArea,
                        settings: AcquisitionSettings) -> Resolved:
    """"auto" -> SerialEM's own montage when the driver has one and accepts this montage
    (``check_montage``, which moves nothing), else tile steps; the choice depends only on the
    config and the params, so a resumed plan makes it again the same way."""
    if requested != "auto":
        return requested
    if not em.native_montage:
        return "tiles"
    try:
        em.check_montage(centre_um, tiles_xy, overlap, area, settings)
    except LimitViolation as err:
        log.info("em.montage.tiles_instead", reason=str(err))
        return "tiles"
    return "montage"


@dataclass(frozen=True)
class MontageLayout:
    """Everything one montage needs: where its tiles go and how to name what it writes.

    ``prefix`` starts every step key (``em-atlas``, ``square-3/map``); ``stem`` names the
    files (``em-atlas`` -> ``em-atlas/tile-000.mrc``, ``em-atlas.mrc``, ``em-atlas.json``).
    """

    prefix: str
    stem: str
    title: str
    area: LowDoseArea
    settings: AcquisitionSettings
    override: bool
    centre_um: tuple[float, float]
    tiles_xy: tuple[int, int]
    overlap: float
    positions: tuple[tuple[float, float], ...]
    stitch: StitchSettings
    approach_um: float
    acquisition: Resolved = "tiles"
    overview: AcquisitionSettings | None = None
    overview_sigma_px: float = 1.0

    @property
    def tile_keys(self) -> list[str]:
        if self.acquisition == "montage":
            return [f"{self.prefix}/montage"]
        return [f"{self.prefix}/tile-{k:03d}" for k in range(len(self.positions))]

    @property
    def stitch_key(self) -> str:
        return f"{self.prefix}/stitch"

    @property
    def overview_key(self) -> str:
        return f"{self.prefix}/overview"

    def estimate_tile_s(self) -> float:
        """Exposure plus a typical move and readout (for progress bars only)."""
        return self.settings.exposure_s + 2.0


def grid_positions(em: ElectronMicroscope, centre_um: tuple[float, float],
                   tiles_xy: tuple[int, int], overlap: float,
                   settings: AcquisitionSettings) -> list[tuple[float, float]]:
    """Tile centres of a rectangular montage in the camera's axes, row by row."""
    return em.montage_positions(centre_um, tiles_xy, overlap, settings)


def check_layout(em: ElectronMicroscope, layout: MontageLayout, what: str) -> None:
    """Refuse the montage before anything moves: every tile position, and for SerialEM's
    montage what SerialEM itself would refuse."""
    check_positions(em, layout.positions, what, layout.approach_um)
    if layout.acquisition == "montage":
        try:
            em.check_montage(layout.centre_um, layout.tiles_xy, layout.overlap, layout.area,
                             layout.settings)
        except LimitViolation as err:
            raise LimitViolation(f"{what} refused before moving: {err}") from err


def check_positions(em: ElectronMicroscope, positions: Sequence[tuple[float, float]],
                    what: str, approach_um: float) -> None:
    """Refuse the whole montage if any tile (or its take-up point) is outside the limits."""
    for k, (x, y) in enumerate(positions):
        for px, py in ((x, y), (x - approach_um, y - approach_um)):
            try:
                em.limits.check_xy(px, py)
            except LimitViolation as err:
                raise LimitViolation(f"{what} refused before moving: tile {k} at "
                                     f"({x:.1f}, {y:.1f}) um: {err}") from err


def montage_steps(layout: MontageLayout, ctx: StepContext,
                  extra: Callable[[StepContext], dict[str, Any]] | None = None
                  ) -> Iterator[Step]:
    """Yield the tile steps and the stitch step of ``layout``.

    ``extra`` adds fields to the sidecar JSON and stitch result (e.g. the square's id).
    With ``layout.overview`` an overview step comes first (protocols/em_overview.py).
    """
    if layout.overview is not None:
        yield Step(layout.overview_key, _overview_action(layout),
                   title=f"{layout.title}: overview at mag index {layout.overview.mag_index}",
                   estimate_s=layout.overview.exposure_s + 5.0, instrument="em")
    if layout.acquisition == "montage":
        yield Step(layout.tile_keys[0], _montage_action(layout),
                   title=f"{layout.title}: SerialEM montage of {len(layout.positions)} tiles",
                   estimate_s=layout.estimate_tile_s() * len(layout.positions), instrument="em")
    else:
        for k, key in enumerate(layout.tile_keys):
            yield Step(key, _tile_action(layout, k),
                       title=f"{layout.title}: tile {k + 1}/{len(layout.positions)}",
                       estimate_s=layout.estimate_tile_s(), instrument="em")
    yield Step(layout.stitch_key, _stitch_action(layout, extra), title=f"{layout.title}: stitch",
               estimate_s=5.0)


def _tile_action(layout: MontageLayout, k: int) -> Callable[[StepContext], StepResult]:
    def action(ctx: StepContext) -> StepResult:
        em = ctx.require_em()
        x, y = layout.positions[k]
        here = np.asarray(em.stage_position()[:2])
        # take up backlash at the first tile, and whenever we do not come from the previous
        # tile (a resumed montage: the axes' last direction is unknown)
        fresh = k == 0 or np.abs(here - np.asarray(layout.positions[k - 1])).max() > 1e-3
        approach(em, x, y, from_um=layout.approach_um, force=fresh)
        img = em.acquire(layout.area, layout.settings if layout.override else None)
        meta = save_frame(ctx.data_dir, f"{layout.stem}/tile-{k:03d}.mrc", img)
        return {**meta, "index": k, "nominal_um": [x, y]}
    return action


def _overview_action(layout: MontageLayout) -> Callable[[StepContext], StepResult]:
    def action(ctx: StepContext) -> StepResult:
        em = ctx.require_em()
        assert layout.overview is not None
        x, y = layout.centre_um
        approach(em, x, y, from_um=layout.approach_um, force=True)
        img = em.acquire(layout.area, layout.overview)
        return save_frame(ctx.data_dir, f"{layout.stem}/overview.mrc", img)
    return action


def _montage_action(layout: MontageLayout) -> Callable[[StepContext], StepResult]:
    def action(ctx: StepContext) -> StepResult:
        em = ctx.require_em()
        tiles = em.montage(layout.centre_um, layout.tiles_xy, layout.overlap, layout.area,
                           layout.settings if layout.override else None)
        metas = []
        for k, img in enumerate(tiles):
            meta = save_frame(ctx.data_dir, f"{layout.stem}/tile-{k:03d}.mrc", img)
            metas.append({**meta, "index": k, "nominal_um": list(layout.positions[k])})
        return {"tiles": metas}
    return action


def tile_metas(layout: MontageLayout, ctx: StepContext) -> list[dict[str, Any]]:
    """Committed metadata of every tile, in tile order."""
    if layout.acquisition == "montage":
        metas: list[dict[str, Any]] = ctx.result(layout.tile_keys[0])["tiles"]
        return metas
    return [ctx.result(key) for key in layout.tile_keys]


def _overlap_report(mosaic: Mosaic) -> list[dict[str, Any]]:
    return [{"i": o.i, "j": o.j, "status": o.status, "ncc": round(o.ncc, 4),
             "correction_um": round(o.correction_um, 4), "residual_um": round(o.residual_um, 4),
             "ambiguous": o.ambiguous} for o in mosaic.overlaps]


def _stitch_action(layout: MontageLayout, extra: Callable[[StepContext], dict[str, Any]] | None
                   ) -> Callable[[StepContext], StepResult]:
    def action(ctx: StepContext) -> StepResult:
        metas = tile_metas(layout, ctx)
        tiles = [replace(load_frame(ctx.data_dir, m), index={"tile": int(m["index"])})
                 for m in metas]
        anchors, overview_meta = [], None
        if layout.overview is not None:
            overview_meta = ctx.result(layout.overview_key)
            anchors = match_tiles(tiles, load_frame(ctx.data_dir, overview_meta),
                                  2.0 * layout.stitch.max_stage_error_um,
                                  layout.overview_sigma_px, layout.stitch.log_gradient)
        mosaic = stitch(tiles, layout.stitch, anchors=anchors)
        mrc_rel, json_rel = f"{layout.stem}.mrc", f"{layout.stem}.json"
        write_mrc(ctx.data_dir / mrc_rel, mosaic.data.astype(np.float32), mosaic.pixel_size_um,
                  labels=(f"clemd {layout.title}"[:80],))
        first = metas[0]
        h, w = mosaic.data.shape
        centre = mosaic.pixel_to_stage[:, :2] @ np.array([(w - 1) / 2, (h - 1) / 2]) \
            + mosaic.pixel_to_stage[:, 2]
        result: StepResult = {
            "mrc": mrc_rel, "json": json_rel, "shape": [h, w],
            "pixel_size_um": float(mosaic.pixel_size_um),
            "pixel_to_stage": mosaic.pixel_to_stage.tolist(),
            "centre_um": [float(centre[0]), float(centre[1])],
            "stage_z_um": float(first["stage_um"][2]),
            "mag_index": first["mag_index"], "magnification": first["magnification"],
            "binning": first["binning"], "exposure_s": first["exposure_s"],
            "defocus_um": first["defocus_um"], "low_dose_area": first["low_dose_area"],
            "tiles_xy": list(layout.tiles_xy), "n_tiles": len(tiles),
            "stats": {k: float(v) for k, v in mosaic.stats.items()},
            "flagged_tiles": [{"index": t.index, "reason": t.reason,
                               "correction_um": list(t.correction_um),
                               "expected_error_um": round(t.expected_error_um, 3)}
                              for t in mosaic.tiles if t.flagged],
            "overview": None if overview_meta is None else {
                "path": overview_meta["path"], "mag_index": overview_meta["mag_index"],
                "pixel_size_um": overview_meta["pixel_size_um"],
                "anchors_used": sum(a.status == "used" for a in mosaic.anchors),
                "anchors": len(mosaic.anchors)},
        }
        if extra is not None:
            result.update(extra(ctx))
        sidecar = {**result, "kind": "em_map", "overlaps": _overlap_report(mosaic),
                   "anchors": [{"tile": a.tile, "status": a.status, "ncc": round(a.ncc, 4),
                                "z_score": round(a.z_score, 2), "ambiguous": a.ambiguous,
                                "residual_um": round(a.residual_um, 4)}
                               for a in mosaic.anchors],
                   "tile_corrections_um": [list(t.correction_um) for t in mosaic.tiles],
                   "tile_expected_error_um": [round(t.expected_error_um, 3)
                                              for t in mosaic.tiles],
                   # each tile's footprint as placed and how far it may be from where the
                   # rest of the map puts it (the session adds it to a target's error)
                   "tiles": [{"index": t.index, "shape": list(img.shape),
                              "pixel_to_stage": np.asarray(t.pixel_to_stage).tolist(),
                              "local_error_um": round(t.local_error_um, 4)}
                             for t, img in zip(mosaic.tiles, tiles, strict=True)]}
        write_text_atomic(ctx.data_dir / json_rel, json.dumps(sidecar, indent=1))
        ctx.log.info("em.montage.stitched", plan=layout.prefix, shape=[h, w],
                     flagged=len(result["flagged_tiles"]), **mosaic.stats)
        return result
    return action


def map_image(result: dict[str, Any], base_dir: Path) -> Image:
    """A stitched map as an ``Image`` (float32 data, its affine) from its stitch result or
    sidecar JSON; ``base_dir`` is the folder its relative ``mrc`` path starts from."""
    meta = {"path": result["mrc"], "pixel_size_um": result["pixel_size_um"],
            "pixel_to_stage": result["pixel_to_stage"],
            "stage_um": [*result["centre_um"], result.get("stage_z_um", 0.0)], "time_s": 0.0,
            "mag_index": result.get("mag_index"), "binning": result.get("binning", 1),
            "defocus_um": result.get("defocus_um"), "low_dose_area": result.get("low_dose_area"),
            "magnification": result.get("magnification"), "exposure_s": result.get("exposure_s")}
    return load_frame(base_dir, meta)


def read_map_sidecar(path: Path) -> tuple[dict[str, Any], Path]:
    """A map's sidecar JSON and the folder its file paths are relative to."""
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result, path.parent
