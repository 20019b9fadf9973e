"""Stitch overlapping tiles into one mosaic that carries its pixel-to-stage affine.

Why not trust the stage: LM stages and TEM stages miss commanded positions by 0.5-5 um, which
is several to hundreds of pixels, so a mosaic placed on nominal positions has torn bars and
doubled beads and every coordinate read from it inherits the error. Instead:

1. pairs of tiles that overlap are found from the nominal affines;
2. each overlap is registered (protocols/overlap_registration.py: masked normalised
   cross-correlation of smoothed gradient images, searched only within twice ``max_stage_error_um`` of the nominal shift, scored by NCC,
   flagged when a lattice makes two shifts equally good);
3. a global weighted least-squares problem places every tile (one translation each) so that
   all accepted pairwise shifts agree (protocols/mosaic_solve.py); optional ``anchors``
   (tiles matched against a lower-magnification overview of the whole area) tie in tiles whose
   overlaps show nothing; the gauge keeps the *mean* of the nominal positions of each
   connected group, so the mosaic stays in the stage frame without favouring any one tile's
   stage error; the worst edge is dropped and the problem re-solved while any residual
   exceeds ``outlier_px`` (a wrong match disagrees with the loops around it);
4. tiles without any accepted overlap or anchor keep their nominal position and are flagged
   with their expected error (the stage's repeatability);
5. tiles are blended (protocols/mosaic_blend.py), optionally to a coarser output pixel.

All tiles must share the linear part (pixel size, rotation, mirror) of the first tile's affine;
only the translations differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.imaging import Image
from protocols.mosaic_blend import Canvas, blend_tiles, plan_canvas
from protocols.mosaic_solve import Edge, solve_placement
from protocols.stitch_edges import (
    AnchorMatch,
    anchor_edges,
    common_frame,
    dark_tiles,
    measure_pair,
    measure_pairs,
)
from protocols.stitch_results import AnchorReport, Mosaic, OverlapReport, TilePlacement
from protocols.stitch_settings import StitchingError, StitchSettings, registration_settings

FloatArray = NDArray[np.float64]
log = structlog.get_logger(__name__)

__all__ = ["AnchorMatch", "AnchorReport", "Mosaic", "OverlapReport", "StitchSettings",
           "StitchingError", "TilePlacement", "common_frame", "measure_pair",
           "registration_settings", "stitch", "tile_expected_error_um", "tile_local_error_um"]


def _anchor_agreement_um(edges: Sequence[Edge], residuals_px: Sequence[float], px_um: float,
                         any_status: bool = False) -> dict[int, float]:
    """Per tile, how far (um) its best unambiguous overview match that passed the score gates
    lies from where the solve put the tile (used or refused as an outlier); ``any_status``:
    its best overview match of any kind (a weaker hint: refused ones count too)."""
    out: dict[int, float] = {}
    for e, r in zip(edges, residuals_px, strict=True):
        trusted = not e.ambiguous and e.status in ("used", "outlier")
        if e.is_anchor and (trusted or any_status) and np.isfinite(r):
            out[e.j] = min(out.get(e.j, np.inf), float(r) * px_um)
    return out


def tile_local_error_um(k: int, edges: Sequence[Edge], residuals: Sequence[float],
                    px_um: float) -> float | None:
    """How far tile k may be from where the rest of the mosaic puts it: its used edges' rms
    residual, at least half a pixel of the measurement; None when no edge placed it."""
    own = [(r, e.scale) for e, r in zip(edges, residuals, strict=True)
           if e.status == "used" and k in (e.i, e.j)]
    if not own:
        return None
    res = max(float(np.sqrt(np.mean([r * r for r, _ in own]))), 0.5 * min(sc for _, sc in own))
    return res * px_um


def tile_expected_error_um(local_um: float | None, group_size: int, s: StitchSettings) -> float:
    """How far tile k may be from the truth: the stage repeatability when nothing placed
    it; otherwise the mosaic's common offset (stage / sqrt(group)) and its local error."""
    if local_um is None:
        return s.stage_error_rms_um
    return float(np.hypot(s.stage_error_rms_um / np.sqrt(max(group_size, 1)), local_um))


def stitch(tiles: Sequence[Image], settings: StitchSettings | None = None, *,
           anchors: Sequence[AnchorMatch] = (), pairs: Sequence[Edge] | None = None) -> Mosaic:
    """Register overlaps, solve a global placement and blend ``tiles`` into one ``Mosaic``.

    ``anchors``: matches of tiles against an overview of the whole area (absolute
    constraints, protocols/em_overview.py). ``pairs``: overlaps already measured (e.g. in the
    tile steps, with ``measure_pair``); None measures them here. Pure computation, no
    hardware. Raises StitchingError for unusable input (no tiles, mixed camera geometry,
    output too large for ``max_output_pixels``: set ``output_pixel_um``).
    """
    s = settings or StitchSettings()
    start = time.perf_counter()
    linear, offsets = common_frame(tiles)
    px_um = float(tiles[0].pixel_size_um)
    factor = 1.0 if s.output_pixel_um is None else s.output_pixel_um / px_um
    n = len(tiles)
    canvas_guess = plan_canvas(offsets, [t.shape for t in tiles], factor)
    if canvas_guess.shape[0] * canvas_guess.shape[1] > s.max_output_pixels:
        raise StitchingError(f"mosaic of {canvas_guess.shape} pixels exceeds max_output_pixels "
                             f"{s.max_output_pixels}; set stitching.output_pixel_um")
    dark = dark_tiles(tiles, s.dark_fraction)
    measured = (measure_pairs(tiles, offsets, s, registration_settings(s, px_um))
                if pairs is None else list(pairs))
    edges = [e for e in measured + anchor_edges(anchors, linear, offsets, s)
             if e.j not in dark and e.i not in dark]
    solved = solve_placement(offsets, edges, s.outlier_px)
    positions, labels = solved.positions, solved.labels
    used_count, anchor_count = np.zeros(n, int), np.zeros(n, int)
    for e in solved.edges:
        if e.status == "used":
            if e.is_anchor:
                anchor_count[e.j] += 1
            else:
                used_count[[e.i, e.j]] += 1
    placed = (used_count + anchor_count) > 0
    main = int(np.bincount(labels[placed]).argmax()) if placed.any() else -1
    t0 = np.asarray(tiles[0].pixel_to_stage, float)[:, 2]
    overview_says = _anchor_agreement_um(solved.edges, solved.residuals_px, px_um)
    overview_hints = _anchor_agreement_um(solved.edges, solved.residuals_px, px_um,
                                          any_status=True)
    placements = []
    for k in range(n):
        translation = linear @ positions[k] + t0
        correction = linear @ (positions[k] - offsets[k])
        group = int((labels == labels[k]).sum())
        # a group not linked to the main mosaic is placed as a whole only by the stage, and
        # its inner matches had no overview to check them: the stage's error, undivided
        local = tile_local_error_um(k, solved.edges, solved.residuals_px, px_um)
        expected = (tile_expected_error_um(local, group, s)
                    if labels[k] == main else s.stage_error_rms_um)
        reason = ""
        if k in dark:
            reason = (f"opaque (mean under stitching.dark_fraction {s.dark_fraction:g} of the "
                      f"montage's median): nothing to register, kept at its nominal position "
                      f"(expected error ~{expected:.2f} um, the stage's)")
        elif not placed[k]:
            reason = (f"no usable overlap{' and no overview match' if anchors else ''}: kept at "
                      f"its nominal position (expected error ~{expected:.2f} um, the stage's)")
        elif labels[k] != main:
            reason = (f"not linked to the main mosaic: placed within its own group of {group} "
                      "tiles, whose absolute position is only as good as the stage")
        elif (anchors and used_count[k] == 1 and anchor_count[k] == 0
              and not overview_hints.get(k, np.inf) < s.max_stage_error_um):
            # a leaf of an anchored montage: one match placed it, no loop checked it, and its
            # overview match, even a refused one (ambiguous, low score), does not agree within
            # the stage bound. On a hole lattice a period off scores as well: in the session
            # sim three leaves were 4 um off (their overview matches 1.5-3.9 um away) and
            # eleven right (0.01-1.4 um away)
            expected = max(expected, s.stage_error_rms_um, float(np.hypot(*correction)))
            reason = (f"placed by one overlap only, which no other overlap or overview match "
                      f"checked: possibly one lattice period off (expected error "
                      f"~{expected:.2f} um)")
        elif (np.abs(correction).max() > 1.5 * s.max_stage_error_um
              and not overview_says.get(k, np.inf) < 2.0 * s.max_stage_error_um):
            # 1.5x: a correct tile moves by its own error plus the mosaic's common offset.
            # A stage that misses by 1 um rms moves many tiles that far, so an unambiguous
            # overview match that agrees within half a lattice period (twice the bound)
            # clears it; tiles a period off disagree with theirs by the period (session sim)
            reason = (f"moved ({correction[0]:.2f}, {correction[1]:.2f}) um from nominal, more "
                      f"than 1.5 x stitching.max_stage_error_um {s.max_stage_error_um:g}: "
                      "possibly one lattice period off")
            # it may be off by as much as it moved (a period): its residuals cannot say
            expected = max(expected, float(np.hypot(*correction)))
        placements.append(TilePlacement(
            k, np.hstack([linear, translation[:, None]]),
            (float(correction[0]), float(correction[1])), int(used_count[k]), bool(reason),
            reason, int(anchor_count[k]), expected,
            expected if reason or local is None else local))
    reports, anchor_reports = [], []
    for e, r in zip(solved.edges, solved.residuals_px, strict=True):
        if e.is_anchor:
            anchor_reports.append(AnchorReport(e.j, e.status, e.ncc, e.z_score, e.ambiguous,
                                               float(r) * px_um, e.scale))
        else:
            reports.append(OverlapReport(
                e.i, e.j, (float(e.nominal[0]), float(e.nominal[1])),
                (float(e.measured[0]), float(e.measured[1])), e.ncc, e.peak_ratio, e.ambiguous,
                e.status, float(r), px_um))
    canvas: Canvas = plan_canvas(positions, [t.shape for t in tiles], factor)
    data = blend_tiles([t.data for t in tiles], positions, canvas, s.blend, s.fill_value)
    origin = np.asarray(canvas.origin_px)
    affine = np.hstack([linear * factor, (linear @ origin + t0)[:, None]])
    used_res = [r.residual_um for r in reports if r.status == "used"]
    stats = {
        "n_tiles": float(n), "n_overlaps": float(len(reports)),
        "n_used": float(len(used_res)),
        "n_flagged_tiles": float(sum(p.flagged for p in placements)),
        "rms_residual_um": float(np.sqrt(np.mean(np.square(used_res)))) if used_res else 0.0,
        "max_residual_um": float(max(used_res, default=0.0)),
    }
    if anchors:
        stats["n_anchors"] = float(len(anchor_reports))
        stats["n_anchors_used"] = float(sum(a.status == "used" for a in anchor_reports))
        if solved.reference_px is not None and solved.reference_linear is not None:
            ref_um = linear @ np.asarray(solved.reference_px)
            stats["overview_offset_x_um"], stats["overview_offset_y_um"] = map(float, ref_um)
            g = np.asarray(solved.reference_linear)
            stats["overview_scale_correction"] = float((g[0, 0] + g[1, 1]) / 2)
            stats["overview_rotation_correction_deg"] = float(
                np.degrees((g[1, 0] - g[0, 1]) / 2))
    elapsed = time.perf_counter() - start
    log.info("stitched", elapsed_s=round(elapsed, 3), **stats)
    return Mosaic(data, px_um * factor, affine, tuple(placements), tuple(reports), elapsed,
                  stats, tuple(anchor_reports))
