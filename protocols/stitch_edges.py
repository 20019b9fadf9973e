"""Measurements for the placement solve: tile overlaps and overview matches as edges.

Why apart from the solve (protocols/mosaic_solve.py) and the orchestration
(protocols/stitching.py): a measurement can be taken anywhere and at any time (the LM atlas
registers each tile's overlaps in the tile's own step, ``measure_pair``; square maps match
tiles against an overview, protocols/em_overview.py, ``AnchorMatch``); this module only
turns images and matches into ``Edge`` records in the common tile-pixel frame
(``common_frame``), judged against the score gates of ``StitchSettings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from drivers.imaging import Image
from protocols.mosaic_solve import REFERENCE, Edge, EdgeStatus
from protocols.overlap_registration import (
    RegistrationSettings,
    context_px,
    register_overlap,
    structure,
)
from protocols.stitch_settings import StitchingError, StitchSettings

FloatArray = NDArray[np.float64]

__all__ = ["AnchorMatch", "anchor_edges", "common_frame", "dark_tiles", "measure_pair",
           "measure_pairs"]

OverlapStatus = EdgeStatus


@dataclass(frozen=True)
class AnchorMatch:
    """A tile matched against an overview of the whole area (protocols/em_overview.py).

    ``shift_um``: where the tile's content lies in the overview minus where the nominal
    affines put it (stage um); ``lever_um``: the tile's centre minus the overview's centre;
    ``scale``: the overview's pixel over the tile's (its precision relative to an overlap's).
    """

    tile: int
    shift_um: tuple[float, float]
    lever_um: tuple[float, float]
    ncc: float
    z_score: float
    peak_ratio: float
    ambiguous: bool
    scale: float



def common_frame(tiles: Sequence[Image]) -> tuple[FloatArray, FloatArray]:
    """Linear part shared by all tiles and each tile's (x, y) offset in tile-0 pixels."""
    if not tiles:
        raise StitchingError("no tiles to stitch")
    linear = np.asarray(tiles[0].pixel_to_stage, float)[:, :2]
    scale = float(np.sqrt(abs(np.linalg.det(linear))))
    inv = np.linalg.inv(linear)
    t0 = np.asarray(tiles[0].pixel_to_stage, float)[:, 2]
    offsets = np.empty((len(tiles), 2))
    for k, tile in enumerate(tiles):
        a = np.asarray(tile.pixel_to_stage, float)
        if np.abs(a[:, :2] - linear).max() > 1e-3 * scale:
            raise StitchingError(f"tile {k}: pixel size or rotation differs from tile 0 "
                                 f"({a[:, :2].tolist()} vs {linear.tolist()}); stitching assumes "
                                 "one camera geometry")
        offsets[k] = inv @ (a[:, 2] - t0)
    return linear, offsets


def _filtered_crop(tile: Image, x0: int, x1: int, y0: int, y1: int, sigma_px: float,
                   log_scale: bool = False) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """``structure`` of a tile region, filtered with context from the tile around it.

    The mask excludes pixels next to the tile's own edges, where the filter had no context:
    across a narrow overlap those edges of the two tiles face each other and would otherwise
    pull the match towards the nominal shift.
    """
    h, w = tile.shape
    c = context_px(sigma_px)
    cx0, cy0 = max(0, x0 - c), max(0, y0 - c)
    filtered = structure(tile.data[cy0:min(h, y1 + c), cx0:min(w, x1 + c)], sigma_px,
                         log_scale)
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    mask = np.outer((ys >= c) & (ys < h - c), (xs >= c) & (xs < w - c))
    return filtered[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0], mask



def measure_pair(tile_i: Image, tile_j: Image, i: int, j: int, nominal: FloatArray,
                 s: StitchSettings, reg: RegistrationSettings) -> Edge | None:
    """Register the overlap of tiles i and j (``nominal``: j's offset from i in i's pixels).

    None when they do not overlap by ``min_overlap_px`` or only share a corner (unless
    ``corner_pairs``). Pure computation: a tile step can call it for its neighbours already
    acquired and commit the edge, so that the final step only solves (protocols/lm_atlas.py).
    """
    hi, wi = tile_i.shape
    hj, wj = tile_j.shape
    m = s.min_overlap_px
    margin = int(np.ceil(reg.max_shift_px)) + 1
    dx, dy = (int(v) for v in np.round(nominal))
    x0, x1 = max(0, dx), min(wi, dx + wj)
    y0, y1 = max(0, dy), min(hi, dy + hj)
    if x1 - x0 < m or y1 - y0 < m:
        return None
    along = max((x1 - x0) / min(wi, wj), (y1 - y0) / min(hi, hj))
    if along < 0.5 and not s.corner_pairs:
        return None  # diagonal neighbours share a corner: small, often bar-only, and redundant
    # tile i: the nominal overlap widened by the search radius; tile j: what the stage says
    # lies in that window
    ax0, ax1 = max(0, x0 - margin), min(wi, x1 + margin)
    ay0, ay1 = max(0, y0 - margin), min(hi, y1 + margin)
    bx0, bx1 = max(0, ax0 - dx), min(wj, ax1 - dx)
    by0, by1 = max(0, ay0 - dy), min(hj, ay1 - dy)
    a, mask_a = _filtered_crop(tile_i, ax0, ax1, ay0, ay1, s.smoothing_sigma_px,
                               s.log_gradient)
    b, mask_b = _filtered_crop(tile_j, bx0, bx1, by0, by1, s.smoothing_sigma_px,
                               s.log_gradient)
    match = register_overlap(a, b, (bx0 + dx - ax0, by0 + dy - ay0), reg, mask_a, mask_b)
    measured = np.array([dx + match.shift_px[0], dy + match.shift_px[1]])
    status: OverlapStatus = "used"
    if match.ncc < s.min_ncc or match.z_score < s.min_z_score:
        status = "low_score"
    elif match.ambiguous and s.reject_ambiguous:
        status = "ambiguous"
    return Edge(i, j, np.asarray(nominal, float), measured, match.ncc, match.peak_ratio,
                match.ambiguous, status, z_score=match.z_score)


def measure_pairs(tiles: Sequence[Image], offsets: FloatArray, s: StitchSettings,
                   reg: RegistrationSettings) -> list[Edge]:
    pairs = []
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            edge = measure_pair(tiles[i], tiles[j], i, j, offsets[j] - offsets[i], s, reg)
            if edge is not None:
                pairs.append(edge)
    return pairs


def dark_tiles(tiles: Sequence[Image], fraction: float | None) -> set[int]:
    if fraction is None or not tiles:
        return set()
    means = np.array([float(np.mean(t.data)) for t in tiles])
    return {k for k, m in enumerate(means) if m < fraction * float(np.median(means))}


def anchor_edges(anchors: Sequence[AnchorMatch], linear: FloatArray, offsets: FloatArray,
                  s: StitchSettings) -> list[Edge]:
    """Tile-to-overview matches as edges in the common tile-pixel frame."""
    inv = np.linalg.inv(linear)
    out = []
    for a in anchors:
        d = inv @ np.asarray(a.shift_um, float)
        lever = inv @ np.asarray(a.lever_um, float)
        status: OverlapStatus = "used"
        if a.ncc < s.min_anchor_ncc or a.z_score < s.min_z_score:
            status = "low_score"
        elif a.ambiguous:
            status = "ambiguous"   # an anchor has no loop to catch a wrong period: never used
        out.append(Edge(REFERENCE, a.tile, offsets[a.tile], offsets[a.tile] + d, a.ncc,
                        a.peak_ratio, a.ambiguous, status, scale=a.scale,
                        lever=(float(lever[0]), float(lever[1])), z_score=a.z_score))
    return out

