"""What stitching may assume and how hard it searches: ``StitchSettings``.

Why a module of its own: the settings are shared by everyone who stitches (the EM atlas,
square maps, the LM atlas, which registers its overlaps in its tile steps) and by the
registration of each overlap; keeping them apart from the algorithm lets a plan build them
without importing the solver. See protocols/stitching.py for what stitching does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drivers.errors import ClemdError, ConfigError
from protocols.mosaic_blend import BlendMode
from protocols.overlap_registration import RegistrationSettings

__all__ = ["StitchSettings", "StitchingError", "registration_settings"]


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
    ``log_gradient``: register log-compressed gradients (protocols/overlap_registration.py
    ``structure``), so that a bar or cell edge does not drown the holes and beads that fix
    the shift along it (EM square maps; the overview matches of a montage follow it).
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
    log_gradient: bool = False

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



def registration_settings(s: StitchSettings, pixel_um: float) -> RegistrationSettings:
    """Overlap registration as ``s`` asks: search twice the stage bound (both tiles miss)."""
    return RegistrationSettings(max_shift_px=2.0 * s.max_stage_error_um / pixel_um,
                                peak_sigma_px=s.smoothing_sigma_px,
                                ambiguity_margin=s.ambiguity_margin)

