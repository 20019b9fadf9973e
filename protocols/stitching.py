"""Stitch overlapping tiles into one mosaic that carries its pixel-to-stage affine.

Why not trust the stage: LM stages and TEM stages miss commanded positions by 0.5-5 um, which
is several to hundreds of pixels, so a mosaic placed on nominal positions has torn bars and
doubled beads and every coordinate read from it inherits the error. Instead:

1. pairs of tiles that overlap are found from the nominal affines;
2. each overlap is registered (protocols/overlap_registration.py: masked normalised
   cross-correlation of smoothed gradient images, searched only within twice ``max_stage_error_um`` of the nominal shift, scored by NCC,
   flagged when a lattice makes two shifts equally good);
3. a global weighted least-squares problem places every tile (one translation each) so that
   all accepted pairwise shifts agree; the gauge is fixed by keeping the *mean* of the
   nominal positions of each connected group, so the mosaic stays in the stage frame without
   favouring any one tile's stage error;
4. the worst pair is dropped and the problem re-solved while any residual exceeds
   ``outlier_px`` (a wrong match disagrees with the loops around it);
5. tiles without any accepted overlap keep their nominal position and are flagged;
6. tiles are blended (protocols/mosaic_blend.py), optionally to a coarser output pixel.

All tiles must share the linear part (pixel size, rotation, mirror) of the first tile's affine;
only the translations differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import structlog
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from drivers.errors import ClemdError, ConfigError
from drivers.imaging import Image
from protocols.mosaic_blend import BlendMode, Canvas, blend_tiles, plan_canvas
from protocols.overlap_registration import (
    RegistrationSettings,
    context_px,
    register_overlap,
    structure,
)

FloatArray = NDArray[np.float64]
log = structlog.get_logger(__name__)

__all__ = ["Mosaic", "OverlapReport", "StitchSettings", "StitchingError", "TilePlacement",
           "stitch"]

OverlapStatus = Literal["used", "low_score", "ambiguous", "outlier"]


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
    """Where one tile ended up: its corrected affine and how far it moved from nominal."""

    index: int
    pixel_to_stage: FloatArray
    correction_um: tuple[float, float]
    n_overlaps_used: int
    flagged: bool
    reason: str = ""


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

    def as_image(self, template: Image) -> Image:
        """The mosaic as an ``Image`` with ``template``'s instrument metadata (e.g. tile 0)."""
        return template.with_data(self.data, pixel_size_um=self.pixel_size_um,
                                  pixel_to_stage=self.pixel_to_stage, index={},
                                  extra={**template.extra, "mosaic_tiles": len(self.tiles)})


@dataclass(frozen=True)
class _Pair:
    i: int
    j: int
    nominal: FloatArray  # (x, y) px, float
    measured: FloatArray
    ncc: float
    peak_ratio: float
    ambiguous: bool
    status: OverlapStatus


def _common_frame(tiles: Sequence[Image]) -> tuple[FloatArray, FloatArray]:
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


def _measure_pairs(tiles: Sequence[Image], offsets: FloatArray, settings: StitchSettings,
                   reg: RegistrationSettings) -> list[_Pair]:
    pairs: list[_Pair] = []
    m = settings.min_overlap_px
    margin = int(np.ceil(reg.max_shift_px)) + 1
    for i in range(len(tiles)):
        hi, wi = tiles[i].shape
        for j in range(i + 1, len(tiles)):
            hj, wj = tiles[j].shape
            nominal = offsets[j] - offsets[i]
            dx, dy = (int(v) for v in np.round(nominal))
            x0, x1 = max(0, dx), min(wi, dx + wj)
            y0, y1 = max(0, dy), min(hi, dy + hj)
            if x1 - x0 < m or y1 - y0 < m:
                continue
            along = max((x1 - x0) / min(wi, wj), (y1 - y0) / min(hi, hj))
            if along < 0.5 and not settings.corner_pairs:
                continue  # diagonal neighbours share a corner: small, often bar-only, and redundant
            # tile i: the nominal overlap widened by the search radius; tile j: what the stage
            # says lies in that window
            ax0, ax1 = max(0, x0 - margin), min(wi, x1 + margin)
            ay0, ay1 = max(0, y0 - margin), min(hi, y1 + margin)
            bx0, bx1 = max(0, ax0 - dx), min(wj, ax1 - dx)
            by0, by1 = max(0, ay0 - dy), min(hj, ay1 - dy)
            a, mask_a = _filtered_crop(tiles[i], ax0, ax1, ay0, ay1, settings.smoothing_sigma_px)
            b, mask_b = _filtered_crop(tiles[j], bx0, bx1, by0, by1, settings.smoothing_sigma_px)
            match = register_overlap(a, b, (bx0 + dx - ax0, by0 + dy - ay0), reg, mask_a, mask_b)
            measured = np.array([dx + match.shift_px[0], dy + match.shift_px[1]])
            status: OverlapStatus = "used"
            if match.ncc < settings.min_ncc or match.z_score < settings.min_z_score:
                status = "low_score"
            elif match.ambiguous and settings.reject_ambiguous:
                status = "ambiguous"
            pairs.append(_Pair(i, j, nominal, measured, match.ncc, match.peak_ratio,
                               match.ambiguous, status))
    return pairs


def _solve(n: int, offsets: FloatArray, edges: list[_Pair]
           ) -> tuple[FloatArray, NDArray[np.int64]]:
    """Weighted least squares of tile offsets; returns (positions, component label per tile).

    Each component's gauge: the sum of its positions equals the sum of its nominal ones.
    """
    if edges:
        rows = np.array([e.i for e in edges]), np.array([e.j for e in edges])
        graph = coo_matrix((np.ones(len(edges)), rows), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
    else:
        labels = np.arange(n)
    n_comp = int(labels.max()) + 1
    a = np.zeros((len(edges) + n_comp, n))
    rhs = np.zeros((len(edges) + n_comp, 2))
    for r, e in enumerate(edges):
        w = np.sqrt(max(e.ncc, 1e-3))
        a[r, e.j], a[r, e.i] = w, -w
        rhs[r] = w * e.measured
    for c in range(n_comp):
        members = labels == c
        a[len(edges) + c, members] = 1.0
        rhs[len(edges) + c] = offsets[members].sum(axis=0)
    positions, *_ = np.linalg.lstsq(a, rhs, rcond=None)
    return np.asarray(positions, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def _robust_solve(n: int, offsets: FloatArray, pairs: list[_Pair], outlier_px: float
                  ) -> tuple[FloatArray, list[_Pair], NDArray[np.int64]]:
    """Solve, drop the worst pair while its residual exceeds ``outlier_px``, re-solve."""
    pairs = list(pairs)
    while True:
        used = [p for p in pairs if p.status == "used"]
        positions, labels = _solve(n, offsets, used)
        if not used:
            return positions, pairs, labels
        res = [float(np.hypot(*(positions[p.j] - positions[p.i] - p.measured))) for p in used]
        worst = int(np.argmax(res))
        if res[worst] <= outlier_px:
            return positions, pairs, labels
        bad = used[worst]
        pairs[pairs.index(bad)] = _Pair(bad.i, bad.j, bad.nominal, bad.measured, bad.ncc,
                                        bad.peak_ratio, bad.ambiguous, "outlier")


def stitch(tiles: Sequence[Image], settings: StitchSettings | None = None) -> Mosaic:
    """Register overlaps, solve a global placement and blend ``tiles`` into one ``Mosaic``.

    Pure computation, no hardware. Raises StitchingError for unusable input (no tiles, mixed
    camera geometry, output too large for ``max_output_pixels``: set ``output_pixel_um``).
    """
    s = settings or StitchSettings()
    start = time.perf_counter()
    linear, offsets = _common_frame(tiles)
    px_um = float(tiles[0].pixel_size_um)
    reg = RegistrationSettings(max_shift_px=2.0 * s.max_stage_error_um / px_um,
                               peak_sigma_px=s.smoothing_sigma_px,
                               ambiguity_margin=s.ambiguity_margin)
    factor = 1.0 if s.output_pixel_um is None else s.output_pixel_um / px_um
    n = len(tiles)
    canvas_guess = plan_canvas(offsets, [t.shape for t in tiles], factor)
    if canvas_guess.shape[0] * canvas_guess.shape[1] > s.max_output_pixels:
        raise StitchingError(f"mosaic of {canvas_guess.shape} pixels exceeds max_output_pixels "
                             f"{s.max_output_pixels}; set stitching.output_pixel_um")
    pairs = _measure_pairs(tiles, offsets, s, reg)
    positions, pairs, labels = _robust_solve(n, offsets, pairs, s.outlier_px)
    used_count = np.zeros(n, int)
    for p in pairs:
        if p.status == "used":
            used_count[p.i] += 1
            used_count[p.j] += 1
    positions[used_count == 0] = offsets[used_count == 0]
    main = int(np.bincount(labels[used_count > 0]).argmax()) if used_count.any() else -1
    t0 = np.asarray(tiles[0].pixel_to_stage, float)[:, 2]
    placements = []
    for k in range(n):
        translation = linear @ positions[k] + t0
        correction = linear @ (positions[k] - offsets[k])
        reason = ""
        if used_count[k] == 0:
            reason = "no usable overlap: kept at its nominal position"
        elif labels[k] != main:
            size = int((labels == labels[k]).sum())
            reason = (f"not linked to the main mosaic: placed within its own group of {size} "
                      "tiles, whose absolute position is only as good as the stage")
        elif np.abs(correction).max() > 1.5 * s.max_stage_error_um:
            # 1.5x: a correct tile moves by its own error plus the mosaic's common offset
            reason = (f"moved ({correction[0]:.2f}, {correction[1]:.2f}) um from nominal, more "
                      f"than 1.5 x stitching.max_stage_error_um {s.max_stage_error_um:g}: "
                      "possibly one lattice period off")
        placements.append(TilePlacement(
            k, np.hstack([linear, translation[:, None]]),
            (float(correction[0]), float(correction[1])), int(used_count[k]), bool(reason),
            reason))
    reports = tuple(
        OverlapReport(p.i, p.j, (float(p.nominal[0]), float(p.nominal[1])),
                      (float(p.measured[0]), float(p.measured[1])),
                      p.ncc, p.peak_ratio, p.ambiguous, p.status,
                      float(np.hypot(*(positions[p.j] - positions[p.i] - p.measured))), px_um)
        for p in pairs)
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
    elapsed = time.perf_counter() - start
    log.info("stitched", elapsed_s=round(elapsed, 3), **stats)
    return Mosaic(data, px_um * factor, affine, tuple(placements), reports, elapsed, stats)
