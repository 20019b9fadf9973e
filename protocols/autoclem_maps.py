"""Square maps as the session may trust them: tiles the stitching could not place.

A square map is stitched from tiles; a tile that neither shared a usable overlap with its
neighbours nor matched the overview (a corner on the bars, a thick cell body) is kept where
the stage said it was, up to the stage's repeatability (~1 um) from the truth
(protocols/stitching.py ``expected_error_um``). The stitching flags it, and also tiles it
placed but cannot vouch for (a group linked only to itself; a tile moved so far it may be a
hole-lattice period, 4 um, off); the session trusts no flagged tile. Everything else in the map shares one common
offset, which the bead correlation absorbs. Two consequences for the session:

- beads the EM finds on such a tile are mispositioned by up to a micrometre; matched, they
  bend the fitted transform (a square matched "within 1.00 um" instead of 0.2). They are left
  out of the bead correlation (``correlate_map_beads``);
- a target on such a tile is reached where the tile was drawn (realign aligns to the map's
  picture), so that tile's expected error joins the target's predicted error
  (``UnplacedTile.holds``, used by the transfer).

A tile the stitching placed and trusts is still only as well placed as its overlaps agree:
its local error (the rms residual of its own edges, at least half a pixel; the map sidecar's
``tiles``) is not shared with the rest of the map, so the bead correlation, fitted over the
whole map, cannot absorb it. It joins the predicted error of a target on that tile
(``placed_tile_error``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.imaging import apply_affine, invert_affine
from protocols.correlation.bead_images import BeadImageCorrelation
from protocols.correlation.beads_em import detect_em_beads
from protocols.correlation.beads_lm import BeadDetections, detect_lm_beads
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.points import correlate_points
from protocols.em_montage import read_map_sidecar
from protocols.plan import StepContext, StepResult

__all__ = ["UnplacedTile", "correlate_map_beads", "placed_tile_error", "unplaced_tiles"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class UnplacedTile:
    """One tile kept at its nominal position: its footprint (stage um -> tile pixels)."""

    index: int
    expected_error_um: float
    stage_to_px: FloatArray
    shape: tuple[int, int]

    def holds(self, xy_um: FloatArray) -> NDArray[np.bool_]:
        """Which EM stage points (N, 2) lie on this tile (its overlaps included)."""
        px = apply_affine(self.stage_to_px, np.asarray(xy_um, float)).reshape(-1, 2)
        h, w = self.shape
        return np.asarray((px[:, 0] >= -0.5) & (px[:, 0] <= w - 0.5)
                          & (px[:, 1] >= -0.5) & (px[:, 1] <= h - 0.5), dtype=bool)


def unplaced_tiles(ctx: StepContext, square_id: str, map_res: StepResult
                   ) -> list[UnplacedTile]:
    """The map's flagged tiles: those nothing placed (opaque, no usable overlap or overview
    match), and also those placed but not trusted (a group not linked to the rest of the
    map, whose absolute position is the stage's; a tile moved far enough to be a lattice
    period off), each with the expected error the stitching gave it."""
    out = []
    for flag in map_res.get("flagged_tiles", []):
        k = int(flag["index"])
        tile = _tile_meta(ctx, square_id, k)
        a = np.asarray(tile["pixel_to_stage"], float).copy()
        a[:, 2] += np.asarray(flag["correction_um"], float)
        h, w = (int(v) for v in tile["shape"])
        out.append(UnplacedTile(k, float(flag["expected_error_um"]), invert_affine(a), (h, w)))
    return out


def _tile_meta(ctx: StepContext, square_id: str, k: int) -> dict[str, Any]:
    """Tile ``k``'s committed metadata: its own step with tile steps, else the one step of
    SerialEM's montage (tiles in index order)."""
    single = ctx.store.get(f"square-{square_id}/map/tile-{k:03d}")
    if single is not None:
        return single
    tiles: list[dict[str, Any]] = ctx.result(f"square-{square_id}/map/montage")["tiles"]
    return tiles[k]


def placed_tile_error(ctx: StepContext, map_res: StepResult, xy_um: FloatArray
                      ) -> tuple[int, float] | None:
    """The placed (unflagged) map tile under EM stage point ``xy_um`` with the largest local
    error, from the map's sidecar, as (tile, local error in um); None when no such tile
    holds it or the sidecar predates per-tile footprints."""
    sidecar, _ = read_map_sidecar(ctx.data_dir / map_res["json"])
    flagged = {int(f["index"]) for f in map_res.get("flagged_tiles", [])}
    best: tuple[int, float] | None = None
    for t in sidecar.get("tiles", []):
        if int(t["index"]) in flagged:
            continue
        h, w = (int(v) for v in t["shape"])
        tile = UnplacedTile(int(t["index"]), float(t["local_error_um"]),
                            invert_affine(np.asarray(t["pixel_to_stage"], float)), (h, w))
        if tile.holds(xy_um)[0] and (best is None or tile.expected_error_um > best[1]):
            best = (tile.index, tile.expected_error_um)
    return best


def correlate_map_beads(lm: FloatArray, lm_pixel_um: float, em: FloatArray,
                        em_pixel_um: float, em_pixel_to_stage: FloatArray,
                        unplaced: list[UnplacedTile], targets_lm_px: FloatArray
                        ) -> tuple[BeadImageCorrelation, int]:
    """protocols/correlation/bead_images.py ``correlate_bead_images`` with the EM beads on
    unplaced tiles left out; also returns how many were left out.

    Raises CorrelationInputError when either side keeps fewer than 2 beads."""
    lm_beads = detect_lm_beads(lm, lm_pixel_um)
    found = detect_em_beads(em, em_pixel_um)
    stage = apply_affine(np.asarray(em_pixel_to_stage, float), found.xy_px).reshape(-1, 2)
    off = np.zeros(len(found), dtype=bool)
    for tile in unplaced:
        off |= tile.holds(stage)
    em_beads = BeadDetections(found.xy_px[~off], found.score[~off], found.size_px[~off],
                              found.contrast[~off])
    for name, det in (("LM image", lm_beads), ("EM map", em_beads)):
        if len(det) < 2:
            raise CorrelationInputError(f"{name}: {len(det)} bead(s) usable, need at least 2"
                                        + (f" ({int(off.sum())} on unplaced map tiles)"
                                           if name == "EM map" and off.any() else ""))
    res = correlate_points(lm_beads.xy_um(lm_pixel_um), em_beads.xy_um(em_pixel_um),
                           np.asarray(targets_lm_px, float).reshape(-1, 2) * lm_pixel_um,
                           lm_weights=lm_beads.score, em_weights=em_beads.score,
                           from_frame="lm_px_um", to_frame="em_px_um")
    em_px = None if res.targets_um is None else res.targets_um / em_pixel_um
    return BeadImageCorrelation(lm_beads, em_beads, res, em_px), int(off.sum())
