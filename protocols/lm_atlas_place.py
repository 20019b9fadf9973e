"""The LM atlas's global placement from overlaps measured in the tile steps, without blending.

Why not ``protocols.stitching.stitch``: it blends the tiles too, all at the end, and the atlas
now blends each tile while the next ones are acquired (protocols/lm_atlas_build.py), so its
last step only solves. This is ``stitch``'s placement for the atlas's case (overlaps given, no
overview anchors, no opaque-tile rule): the same solve (protocols/mosaic_solve.py), the same
flags and expected errors, the same ``TilePlacement`` and ``OverlapReport`` records, so the
atlas report reads as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from protocols.mosaic_solve import Edge, solve_placement
from protocols.stitching import (
    OverlapReport,
    StitchingError,
    StitchSettings,
    TilePlacement,
    tile_expected_error_um,
    tile_local_error_um,
)

__all__ = ["AtlasPlacement", "offsets_px", "place_tiles"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class AtlasPlacement:
    """Solved positions (n, 2) in tile 0's nominal pixel frame, and the evidence for them."""

    linear: FloatArray
    origin_stage_um: FloatArray
    positions: FloatArray
    tiles: tuple[TilePlacement, ...]
    overlaps: tuple[OverlapReport, ...]
    stats: dict[str, float]


def offsets_px(affines: Sequence[NDArray[np.float64]], reference: NDArray[np.float64]
               ) -> FloatArray:
    """(x, y) of each tile's pixel (0, 0) in the pixel frame of ``reference``; refuses tiles
    whose pixel size or rotation differs from the reference's (one camera geometry)."""
    linear = np.asarray(reference, float)[:, :2]
    scale = float(np.sqrt(abs(np.linalg.det(linear))))
    inv = np.linalg.inv(linear)
    out = np.empty((len(affines), 2))
    for k, a in enumerate(affines):
        a = np.asarray(a, float)
        if np.abs(a[:, :2] - linear).max() > 1e-3 * scale:
            raise StitchingError(f"tile {k}: pixel size or rotation differs from tile 0 "
                                 f"({a[:, :2].tolist()} vs {linear.tolist()})")
        out[k] = inv @ (a[:, 2] - np.asarray(reference, float)[:, 2])
    return out


def place_tiles(affines: Sequence[NDArray[np.float64]], pairs: Sequence[Edge], px_um: float,
                s: StitchSettings, reference: NDArray[np.float64] | None = None
                ) -> AtlasPlacement:
    """Solve where every tile lies from its nominal affine and the measured overlaps.

    Positions are in the pixel frame of ``reference`` (default: tile 0's nominal affine).
    Tiles without a used overlap keep their nominal position and are flagged; a tile moved
    more than 1.5 x ``max_stage_error_um`` is flagged as possibly a lattice period off.
    """
    if not affines:
        raise StitchingError("no tiles to place")
    reference = np.asarray(affines[0] if reference is None else reference, float)
    linear, t0 = reference[:, :2], reference[:, 2]
    offsets = offsets_px(affines, reference)
    n = len(affines)
    solved = solve_placement(offsets, list(pairs), s.outlier_px)
    positions, labels = solved.positions, solved.labels
    used_count = np.zeros(n, int)
    for e in solved.edges:
        if e.status == "used":
            used_count[[e.i, e.j]] += 1
    placed = used_count > 0
    main = int(np.bincount(labels[placed]).argmax()) if placed.any() else -1
    placements = []
    for k in range(n):
        translation = linear @ positions[k] + t0
        correction = linear @ (positions[k] - offsets[k])
        group = int((labels == labels[k]).sum())
        local = tile_local_error_um(k, solved.edges, solved.residuals_px, px_um)
        expected = (tile_expected_error_um(local, group, s)
                    if labels[k] == main else s.stage_error_rms_um)
        reason = ""
        if not placed[k]:
            reason = (f"no usable overlap: kept at its nominal position (expected error "
                      f"~{expected:.2f} um, the stage's)")
        elif labels[k] != main:
            reason = (f"not linked to the main mosaic: placed within its own group of {group} "
                      "tiles, whose absolute position is only as good as the stage")
        elif np.abs(correction).max() > 1.5 * s.max_stage_error_um:
            reason = (f"moved ({correction[0]:.2f}, {correction[1]:.2f}) um from nominal, more "
                      f"than 1.5 x stitching.max_stage_error_um {s.max_stage_error_um:g}: "
                      "possibly one lattice period off")
        placements.append(TilePlacement(
            k, np.hstack([linear, translation[:, None]]),
            (float(correction[0]), float(correction[1])), int(used_count[k]), bool(reason),
            reason, 0, expected, expected if reason or local is None else local))
    reports = [OverlapReport(e.i, e.j, (float(e.nominal[0]), float(e.nominal[1])),
                             (float(e.measured[0]), float(e.measured[1])), e.ncc, e.peak_ratio,
                             e.ambiguous, e.status, float(r), px_um)
               for e, r in zip(solved.edges, solved.residuals_px, strict=True)]
    used_res = [r.residual_um for r in reports if r.status == "used"]
    stats = {
        "n_tiles": float(n), "n_overlaps": float(len(reports)), "n_used": float(len(used_res)),
        "n_flagged_tiles": float(sum(p.flagged for p in placements)),
        "rms_residual_um": float(np.sqrt(np.mean(np.square(used_res)))) if used_res else 0.0,
        "max_residual_um": float(max(used_res, default=0.0)),
    }
    return AtlasPlacement(linear, t0, positions, tuple(placements), tuple(reports), stats)
