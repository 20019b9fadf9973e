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
from dataclasses import dataclass, field

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.errors import ClemdError, ConfigError
from drivers.imaging import Image
from protocols.mosaic_blend import BlendMode, Canvas, blend_tiles, plan_canvas
from protocols.mosaic_solve import REFERENCE, Edge, EdgeStatus, solve_placement
from protocols.overlap_registration import (
    RegistrationSettings,
    context_px,
    register_overlap,
    structure,
)

FloatArray = NDArray[np.float64]
log = structlog.get_logger(__name__)

__all__ = ["AnchorMatch", "AnchorReport", "Mosaic", "OverlapReport", "StitchSettings", "StitchingError",
           "TilePlacement", "common_frame", "measure_pair", "registration_settings", "stitch"]

OverlapStatus = EdgeStatus


class StitchingError(ClemdError, ValueError):
    """Tiles that cannot be stitched at all: none given, mixed pixel sizes or rotations,
    or an output that would not fit in memory. Raised before any registration runs."""


@dataclass(frozen=True)
class StitchSettings:
    """Stitching parameters; lengths in um unless the name says px.

    ``max_stage_error_um`` bounds how far (per axis) any tile may lie from its nominal position,
    about three standard deviations of the stage error. Two tiles can then be off by twice
    that relative to each other, which is the search radius of every overlap. Where the tiles
    show nothing but a lattice, twice the bound must stay below half the lattice period (grid
    pitch 127 um at 200 mesh; R2/2 hole pitch 4 um), else pairs come out ``ambiguous``; with
    non-periodic content (cells, beads, debris) the lattice is told apart by its score. A tile
    whose correction exceeds 1.5 times the bound is flagged: it was most likely placed one lattice
    period off by a consistent set of wrong matches.

    ``min_anchor_ncc`` is the score an overview match needs (higher than an overlap's: an
    anchored tile may have no other edge to catch a chance match on a featureless tile);
    ``stage_rms_um`` (2D rms) is the expected error reported for tiles nothing placed.
    ``dark_fraction`` (EM): a tile whose mean is under this fraction of the median tile mean
    let (almost) no electrons through (a thick cell body, a bar) and is not registered at all:
    matches between a few stray counts score well by chance and drag tiles by microns.
    """

    max_stage_error_um: float = 5.0
    min_overlap_px: int = 16
    smoothing_sigma_px: float = 1.0
    min_ncc: float = 0.25
    min_z_score: float = 6.0
    corner_pairs: bool = False
    ambiguity_margin: float = 0.9
    reject_ambiguous: bool = True
    outlier_px: float = 3.0
    output_pixel_um: float | None = None
    blend: BlendMode = "feather"
    fill_value: float = 0.0
    max_output_pixels: int = 400_000_000
    min_anchor_ncc: float = 0.5
    stage_rms_um: float | None = None
    dark_fraction: float | None = None

    @property
    def stage_error_rms_um(self) -> float:
        """The stage's miss as a 2D rms: ``stage_rms_um``, else from the bound (3 sigma per
        axis). A bound set low to keep a lattice from aliasing understates it: set both."""
        if self.stage_rms_um is not None:
            return float(self.stage_rms_um)
        return float(self.max_stage_error_um / 3.0 * np.sqrt(2.0))

    def __post_init__(self) -> None:
        checks = {"max_stage_error_um": self.max_stage_error_um,
                  "smoothing_sigma_px": self.smoothing_sigma_px, "outlier_px": self.outlier_px}
        for name, value in checks.items():
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"stitching.{name}", f"must be a positive number, got {value!r}")
        if self.min_overlap_px < 4:
            raise ConfigError("stitching.min_overlap_px", f"must be >= 4, got {self.min_overlap_px}")
        if not 0 < self.ambiguity_margin <= 1:
            raise ConfigError("stitching.ambiguity_margin", "must lie in (0, 1]")
        if self.output_pixel_um is not None and not self.output_pixel_um > 0:
            raise ConfigError("stitching.output_pixel_um", "must be > 0 or None")
        if self.dark_fraction is not None and not 0 <= self.dark_fraction < 1:
            raise ConfigError("stitching.dark_fraction", "must lie in [0, 1) or be None")
        if self.blend not in ("feather", "nearest"):
            raise ConfigError("stitching.blend", f"{self.blend!r} not in ['feather', 'nearest']")


@dataclass(frozen=True)
class OverlapReport:
    """One overlapping pair; shifts are (x, y) of tile j relative to tile i.

    ``nominal_shift_px`` comes from the stage, ``measured_shift_px`` from registration,
    ``residual_px`` is the length of measured minus solved shift (for every pair, used or not:
    a refused pair with a small residual was a correct match refused out of caution), ``status``
    says whether the pair was used in the final solve or why not.
    """

    i: int
    j: int
    nominal_shift_px: tuple[float, float]
    measured_shift_px: tuple[float, float]
    ncc: float
    peak_ratio: float
    ambiguous: bool
    status: OverlapStatus
    residual_px: float
    pixel_size_um: float

    @property
    def correction_um(self) -> float:
        """How far the measured shift differs from the nominal one, in um."""
        d = np.subtract(self.measured_shift_px, self.nominal_shift_px)
        return float(np.hypot(*d) * self.pixel_size_um)

    @property
    def residual_um(self) -> float:
        return self.residual_px * self.pixel_size_um


@dataclass(frozen=True)
class TilePlacement:
    """Where one tile ended up: its corrected affine and how far it moved from nominal.

    ``n_anchors_used``: overview matches that placed it; ``expected_error_um``: how far from
    the truth it may be (the stage's repeatability when nothing placed it).
    """

    index: int
    pixel_to_stage: FloatArray
    correction_um: tuple[float, float]
    n_overlaps_used: int
    flagged: bool
    reason: str = ""
    n_anchors_used: int = 0
    expected_error_um: float = 0.0


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


@dataclass(frozen=True)
class AnchorReport:
    """One tile-to-overview match as the solve judged it (residual in um)."""

    tile: int
    status: OverlapStatus
    ncc: float
    z_score: float
    ambiguous: bool
    residual_um: float
    scale: float


@dataclass(frozen=True)
class Mosaic:
    """A stitched array with its pixel-to-stage affine and the evidence for it."""

    data: NDArray[np.float32]
    pixel_size_um: float
    pixel_to_stage: FloatArray
    tiles: tuple[TilePlacement, ...]
    overlaps: tuple[OverlapReport, ...]
    elapsed_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    anchors: tuple[AnchorReport, ...] = ()

    def as_image(self, template: Image) -> Image:
        """The mosaic as an ``Image`` with ``template``'s instrument metadata (e.g. tile 0)."""
        return template.with_data(self.data, pixel_size_um=self.pixel_size_um,
                                  pixel_to_stage=self.pixel_to_stage, index={},
                                  extra={**template.extra, "mosaic_tiles": len(self.tiles)})


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


def _filtered_crop(tile: Image, x0: int, x1: int, y0: int, y1: int, sigma_px: float
                   ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """``structure`` of a tile region, filtered with context from the tile around it.

    The mask excludes pixels next to the tile's own edges, where the filter had no context:
    across a narrow overlap those edges of the two tiles face each other and would otherwise
    pull the match towards the nominal shift.
    """
    h, w = tile.shape
    c = context_px(sigma_px)
    cx0, cy0 = max(0, x0 - c), max(0, y0 - c)
    filtered = structure(tile.data[cy0:min(h, y1 + c), cx0:min(w, x1 + c)], sigma_px)
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    mask = np.outer((ys >= c) & (ys < h - c), (xs >= c) & (xs < w - c))
    return filtered[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0], mask


def registration_settings(s: StitchSettings, pixel_um: float) -> RegistrationSettings:
    """Overlap registration as ``s`` asks: search twice the stage bound (both tiles miss)."""
    return RegistrationSettings(max_shift_px=2.0 * s.max_stage_error_um / pixel_um,
                                peak_sigma_px=s.smoothing_sigma_px,
                                ambiguity_margin=s.ambiguity_margin)


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
    a, mask_a = _filtered_crop(tile_i, ax0, ax1, ay0, ay1, s.smoothing_sigma_px)
    b, mask_b = _filtered_crop(tile_j, bx0, bx1, by0, by1, s.smoothing_sigma_px)
    match = register_overlap(a, b, (bx0 + dx - ax0, by0 + dy - ay0), reg, mask_a, mask_b)
    measured = np.array([dx + match.shift_px[0], dy + match.shift_px[1]])
    status: OverlapStatus = "used"
    if match.ncc < s.min_ncc or match.z_score < s.min_z_score:
        status = "low_score"
    elif match.ambiguous and s.reject_ambiguous:
        status = "ambiguous"
    return Edge(i, j, np.asarray(nominal, float), measured, match.ncc, match.peak_ratio,
                match.ambiguous, status, z_score=match.z_score)


def _measure_pairs(tiles: Sequence[Image], offsets: FloatArray, s: StitchSettings,
                   reg: RegistrationSettings) -> list[Edge]:
    pairs = []
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            edge = measure_pair(tiles[i], tiles[j], i, j, offsets[j] - offsets[i], s, reg)
            if edge is not None:
                pairs.append(edge)
    return pairs


def _dark_tiles(tiles: Sequence[Image], fraction: float | None) -> set[int]:
    if fraction is None or not tiles:
        return set()
    means = np.array([float(np.mean(t.data)) for t in tiles])
    return {k for k, m in enumerate(means) if m < fraction * float(np.median(means))}


def _anchor_edges(anchors: Sequence[AnchorMatch], linear: FloatArray, offsets: FloatArray,
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


def _expected_error_um(k: int, edges: Sequence[Edge], residuals: Sequence[float],
                       group_size: int, px_um: float, s: StitchSettings) -> float:
    """How far tile k may be from the truth: the stage repeatability when nothing placed
    it; otherwise the mosaic's common offset (stage / sqrt(group)) and its edges' residuals
    (at least half a pixel of the measurement)."""
    own = [(r, e.scale) for e, r in zip(edges, residuals, strict=True)
           if e.status == "used" and k in (e.i, e.j)]
    if not own:
        return s.stage_error_rms_um
    res = max(float(np.sqrt(np.mean([r * r for r, _ in own]))), 0.5 * min(sc for _, sc in own))
    return float(np.hypot(s.stage_error_rms_um / np.sqrt(max(group_size, 1)), res * px_um))


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
    dark = _dark_tiles(tiles, s.dark_fraction)
    measured = (_measure_pairs(tiles, offsets, s, registration_settings(s, px_um))
                if pairs is None else list(pairs))
    edges = [e for e in measured + _anchor_edges(anchors, linear, offsets, s)
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
    placements = []
    for k in range(n):
        translation = linear @ positions[k] + t0
        correction = linear @ (positions[k] - offsets[k])
        group = int((labels == labels[k]).sum())
        # a group not linked to the main mosaic is placed as a whole only by the stage, and
        # its inner matches had no overview to check them: the stage's error, undivided
        expected = (_expected_error_um(k, solved.edges, solved.residuals_px, group, px_um, s)
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
        elif np.abs(correction).max() > 1.5 * s.max_stage_error_um:
            # 1.5x: a correct tile moves by its own error plus the mosaic's common offset
            reason = (f"moved ({correction[0]:.2f}, {correction[1]:.2f}) um from nominal, more "
                      f"than 1.5 x stitching.max_stage_error_um {s.max_stage_error_um:g}: "
                      "possibly one lattice period off")
        placements.append(TilePlacement(
            k, np.hstack([linear, translation[:, None]]),
            (float(correction[0]), float(correction[1])), int(used_count[k]), bool(reason),
            reason, int(anchor_count[k]), expected))
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
