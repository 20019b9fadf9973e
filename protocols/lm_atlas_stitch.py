"""The LM atlas's overlaps, and its last step's output: the atlas file and its report.

Why register inside the tile steps: each tile's overlaps with the neighbours already acquired
are measured while the tile is in memory (protocols/stitching.py ``measure_pair``, run in the
background while the next tile is acquired: protocols/lm_atlas_build.py) and committed with
the tile's step, so the last step only solves and never registers the whole atlas at once; a
resumed plan re-reads a neighbour from its file. Registration uses the raw first channel
(smoothed gradients ignore the slow illumination the flat field removes).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from drivers.imaging import Image
from protocols.lm_io import affine_from_json, affine_json, artifact, load_images, write_json
from protocols.mosaic_solve import Edge
from protocols.plan import StepContext, StepResult
from protocols.stitching import Mosaic, StitchSettings, measure_pair, registration_settings

if TYPE_CHECKING:
    from protocols.lm_atlas import LMAtlasParams
    from protocols.lm_atlas_build import AtlasProduct

__all__ = ["atlas_report", "edge_from_json", "edge_json", "load_atlas", "register_neighbours",
           "write_atlas"]


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


def write_atlas(ctx: StepContext, p: LMAtlasParams, tile_keys: list[str],
                product: AtlasProduct) -> StepResult:
    """Commit the assembled atlas (``atlas.ome.tif``, written while the tiles were acquired)
    and write its report (``atlas.json``)."""
    channels = list(p.channels)
    frames = [Image(data=np.zeros((1, 1), np.float32), pixel_size_um=1.0,
                    pixel_to_stage=np.zeros((2, 3)), instrument="lm",
                    stage_um=tuple(f["stage_um"]), time_s=float(f["time_s"]),
                    channel=f["channel"], objective=f["objective"], z_um=f["z_um"],
                    exposure_s=f["exposure_s"])
              for f in ctx.result(tile_keys[0])["frames"]]      # tile 0's, one per channel
    rel = f"{p.prefix}/atlas.ome.tif"
    product.stream.commit(product.planes_meta(frames))
    arts = [artifact(rel, "lm_atlas", name="LM atlas", pixel_size_um=product.pixel_size_um)]
    placement = product.placement
    mosaic = Mosaic(product.planes[0], product.pixel_size_um, product.pixel_to_stage,
                    placement.tiles, placement.overlaps, 0.0, placement.stats)
    report = atlas_report(mosaic, tile_keys, channels)
    report["flat_field_range"] = product.flat_range
    report["assembly"] = product.assembly
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
