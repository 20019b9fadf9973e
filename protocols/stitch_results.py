"""What stitching reports: where each tile went, how each overlap and overview match was
judged, and the mosaic itself.

Why apart from the algorithm (protocols/stitching.py): these frozen records are what
callers keep (square maps write them into their sidecar, the session reads the flagged
tiles' expected errors), and they should not change when the algorithm does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from drivers.imaging import Image
from protocols.mosaic_solve import EdgeStatus

FloatArray = NDArray[np.float64]

__all__ = ["AnchorReport", "Mosaic", "OverlapReport", "OverlapStatus", "TilePlacement"]

OverlapStatus = EdgeStatus


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
    the truth it may be (the stage's repeatability when nothing placed it);
    ``local_error_um``: how far it may be from where the rest of the mosaic says it is (its
    own edges' residuals, at least half a pixel of the measurement; for a flagged tile, its
    expected error). The mosaic's common offset, which ``expected_error_um`` adds, is left out:
    a correlation to the mosaic as a whole (beads) absorbs it, not a tile's own misplacement.
    """

    index: int
    pixel_to_stage: FloatArray
    correction_um: tuple[float, float]
    n_overlaps_used: int
    flagged: bool
    reason: str = ""
    n_anchors_used: int = 0
    expected_error_um: float = 0.0
    local_error_um: float = 0.0


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

