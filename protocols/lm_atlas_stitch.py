"""The LM atlas's overlaps and stitch: registered tile by tile, solved and blended at the end.

Why register inside the tile steps: each tile's overlaps with the neighbours already acquired
are measured while the tile is in memory (protocols/stitching.py ``measure_pair``) and
committed with the tile's step, so the final step only solves the placement and blends, and
never registers the whole atlas at once; a resumed plan re-reads a neighbour from its file.
Registration uses the raw first channel (smoothed gradients ignore the slow illumination the
flat field removes); blending uses flat-fielded tiles, read once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from drivers.imaging import Image, invert_affine
from protocols.lm_flat_field import estimate_flat_field
from protocols.lm_io import affine_from_json, affine_json, load_images, save_images, write_json
from protocols.mosaic_blend import blend_tiles, plan_canvas
from protocols.mosaic_solve import Edge
from protocols.plan import StepContext, StepResult
from protocols.stitching import Mosaic, StitchSettings, measure_pair, registration_settings, stitch

if TYPE_CHECKING:
    from protocols.lm_atlas import LMAtlasParams

__all__ = ["atlas_report", "edge_from_json", "edge_json", "load_atlas", "register_neighbours",
           "stitch_atlas"]


def edge_json(e: Edge) -> dict[str, Any]:
    """A measured overlap as strict JSON (committed with the tile step)."""
    return {"i": e.i, "j": e.j, "nominal": [float(v) for v in e.nominal],
            "measured": [float(v) for v in e.measured], "ncc": float(e.ncc),
            "peak_ratio": float(e.peak_ratio), "ambiguous": bool(e.ambiguous),
            "status": e.status, "z_score": float(e.z_score)}


def edge_from_json(d: dict[str, Any]) -> Edge:
    return Edge(int(d["i"]), int(d["j"]), np.asarray(d["nominal"], float),
                np.asarray(d["measured"], float), float(d["ncc"]), float(d["peak_ratio"]),
                bool(d["ambiguous"]), d["status"], z_score=float(d["z_score"]))


def register_neighbours(tile: Image, index: int, neighbours: list[tuple[int, Image]],
                        max_stage_error_um: float) -> list[Edge]:
    """Overlaps of ``tile`` (index ``index``) with earlier neighbours, as ``stitch`` would
    measure them (``i`` the neighbour, ``j`` this tile; offsets in the neighbour's pixels)."""
    s = StitchSettings(max_stage_error_um=max_stage_error_um)
    reg = registration_settings(s, float(tile.pixel_size_um))
    linear_inv = np.linalg.inv(np.asarray(tile.pixel_to_stage, float)[:, :2])
    out = []
    for i, nb in neighbours:
        nominal = linear_inv @ (np.asarray(tile.pixel_to_stage, float)[:, 2]
                                - np.asarray(nb.pixel_to_stage, float)[:, 2])
        edge = measure_pair(nb, tile, i, index, nominal, s, reg)
        if edge is not None:
            out.append(edge)
    return out


def atlas_pixel_um(p: LMAtlasParams, tiles: list[Image], positions: NDArray[np.float64]
                   ) -> float | None:
    """Output pixel: ``atlas_pixel_um`` if set, else full resolution if it fits
    ``max_atlas_pixels``, else the smallest pixel that does (None = full resolution)."""
    if p.atlas_pixel_um is not None:
        return p.atlas_pixel_um
    px = tiles[0].pixel_size_um
    canvas = plan_canvas(positions, [t.shape for t in tiles], 1.0)
    n = canvas.shape[0] * canvas.shape[1]
    if n <= p.max_atlas_pixels:
        return None
    return float(px * math.sqrt(n / p.max_atlas_pixels) * 1.01)


def _offsets_px(affines: list[NDArray[np.float64]], reference: NDArray[np.float64]
                ) -> NDArray[np.float64]:
    """(x, y) of each tile's pixel (0, 0) in the pixel frame of ``reference`` (stitching's
    common frame is tile 0's nominal affine)."""
    inv = invert_affine(reference)[:, :2]
    return np.array([inv @ (np.asarray(a)[:, 2] - reference[:, 2]) for a in affines])


def stitch_atlas(ctx: StepContext, p: LMAtlasParams, tile_keys: list[str]) -> StepResult:
    """Read the tiles back, stitch the first channel, blend the rest, write atlas + report."""
    per_tile = [load_images(ctx, ctx.result(k)["path"]) for k in tile_keys]
    channels = list(p.channels)
    by_channel = {ch: [next(im for im in planes if im.channel == ch) for planes in per_tile]
                  for ch in channels}
    transmitted = ctx.result(tile_keys[0])["transmitted"] if tile_keys else {}
    flat: dict[str, list[float]] = {}
    for ch in channels:
        field = estimate_flat_field([im.data for im in by_channel[ch]]) if (
            p.flat_field and transmitted.get(ch, False)) else None
        if field is not None:
            by_channel[ch] = [im.with_data(np.asarray(im.data, np.float32) / field)
                              for im in by_channel[ch]]
            flat[ch] = [float(field.min()), float(field.max())]
    reg = by_channel[channels[0]]
    nominal = _offsets_px([im.pixel_to_stage for im in reg], reg[0].pixel_to_stage)
    out_px = atlas_pixel_um(p, reg, nominal)
    settings = StitchSettings(max_stage_error_um=p.max_stage_error_um, output_pixel_um=out_px)
    results = [ctx.result(k) for k in tile_keys]
    # overlaps measured in the tile steps (None: an older journal, measure them here)
    pairs = ([edge_from_json(e) for r in results for e in r["pairs"]]
             if all("pairs" in r for r in results) else None)
    mosaic = stitch(reg, settings, pairs=pairs)
    positions = _offsets_px([t.pixel_to_stage for t in mosaic.tiles], reg[0].pixel_to_stage)
    factor = 1.0 if out_px is None else out_px / reg[0].pixel_size_um
    canvas = plan_canvas(positions, [t.shape for t in reg], factor)
    planes = [mosaic.as_image(reg[0])]
    for ch in channels[1:]:
        data = blend_tiles([im.data for im in by_channel[ch]], positions, canvas)
        planes.append(mosaic.as_image(by_channel[ch][0]).with_data(data))
    planes = [im.with_data(im.data, index={"t": 0, "z": 0}, extra={}) for im in planes]
    rel = f"{p.prefix}/atlas.ome.tif"
    arts = [save_images(ctx, rel, planes, "lm_atlas", name="LM atlas",
                        pixel_size_um=mosaic.pixel_size_um)]
    report = atlas_report(mosaic, tile_keys, channels)
    report["flat_field_range"] = flat
    arts.append(write_json(ctx, f"{p.prefix}/atlas.json", report, "lm_atlas_report"))
    flagged = [r for r in report["tiles"] if r["flagged"]]
    ctx.log.info("lm_atlas.stitched", tiles=len(tile_keys), flagged=len(flagged),
                 shape=list(mosaic.data.shape), **mosaic.stats)
    return {"path": rel, "report": f"{p.prefix}/atlas.json", "artifacts": arts,
            "pixel_to_stage": report["pixel_to_stage"], "pixel_size_um": mosaic.pixel_size_um,
            "shape": list(mosaic.data.shape), "channels": channels, "stats": report["stats"],
            "flagged_tiles": [r["key"] for r in flagged], "tile_keys": list(tile_keys)}


def atlas_report(mosaic: Mosaic, tile_keys: list[str], channels: list[str]) -> dict[str, Any]:
    """The atlas's affine and the evidence for it, as strict JSON."""
    return {
        "pixel_to_stage": affine_json(mosaic.pixel_to_stage),
        "pixel_size_um": mosaic.pixel_size_um, "shape": list(mosaic.data.shape),
        "channels": channels, "stats": {k: float(v) for k, v in mosaic.stats.items()},
        "stitch_s": mosaic.elapsed_s,
        "tiles": [{"key": tile_keys[t.index], "pixel_to_stage": affine_json(t.pixel_to_stage),
                   "correction_um": list(t.correction_um), "overlaps_used": t.n_overlaps_used,
                   "flagged": t.flagged, "reason": t.reason} for t in mosaic.tiles],
        "overlaps": [{"a": tile_keys[o.i], "b": tile_keys[o.j], "status": o.status,
                      "ncc": float(o.ncc), "peak_ratio": _finite(o.peak_ratio),
                      "ambiguous": o.ambiguous, "residual_um": o.residual_um,
                      "correction_um": o.correction_um,
                      "nominal_shift_px": list(o.nominal_shift_px),
                      "measured_shift_px": list(o.measured_shift_px)} for o in mosaic.overlaps],
    }


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def load_atlas(ctx: StepContext, result: StepResult) -> tuple[list[Image], NDArray[np.float64]]:
    """The atlas planes written by the stitch step and its pixel-to-stage affine."""
    return load_images(ctx, result["path"]), affine_from_json(result["pixel_to_stage"])
