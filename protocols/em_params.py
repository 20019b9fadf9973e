"""Shared parameter models of the EM protocols (the edge: pydantic, frozen, extra="forbid").

Every EM plan takes one frozen params model tagged by ``kind`` (``em_atlas``, ``square_map``,
``tilt_series``, ``em_navigator``); the pieces several plans share live here so that a
misspelt key is refused the same way everywhere.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from drivers.base import AcquisitionSettings, ElectronMicroscope, LowDoseArea
from drivers.errors import LimitViolation

__all__ = ["FrozenParams", "SettingsOverride", "StitchParams"]

PositiveFloat = Annotated[float, Field(gt=0)]


class FrozenParams(BaseModel):
    """Base of every EM params model: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SettingsOverride(FrozenParams):
    """Acquire in a low-dose area with a magnification of our choosing.

    Why: realignment wants an intermediate magnification (e.g. 11,500x between the 4,700x
    map and the 39,000x record) and tracking a cheaper shot than any standard area holds.
    ``apply`` gives the settings for ``ElectronMicroscope.acquire(area, settings)``: one shot
    with them, the beam where the area puts it, the area's preset untouched (SerialEM: mag,
    exposure and binning pushed before the shot). Unset fields keep the area's values.
    """

    mag_index: int | None = Field(default=None, ge=0)
    exposure_s: PositiveFloat | None = None
    binning: int | None = Field(default=None, ge=1, le=32)
    dose_rate_e_per_a2_s: float | None = Field(default=None, ge=0)
    defocus_offset_um: float | None = Field(default=None, ge=-500, le=500)

    def apply(self, em: ElectronMicroscope, area: LowDoseArea) -> AcquisitionSettings:
        """The settings this override gives ``area`` on ``em``; refuses unknown mags."""
        base = em.low_dose.get(area)
        if base is None:
            raise LimitViolation(f"low-dose area {area.name} is not configured (em.low_dose)")
        mag = base.mag_index if self.mag_index is None else self.mag_index
        em.magnification(mag)  # raises LimitViolation naming the table
        return AcquisitionSettings(
            mag_index=mag,
            exposure_s=base.exposure_s if self.exposure_s is None else self.exposure_s,
            binning=base.binning if self.binning is None else self.binning,
            dose_rate_e_per_a2_s=(base.dose_rate_e_per_a2_s if self.dose_rate_e_per_a2_s is None
                                  else self.dose_rate_e_per_a2_s),
            defocus_offset_um=(base.defocus_offset_um if self.defocus_offset_um is None
                               else self.defocus_offset_um))


class StitchParams(FrozenParams):
    """The stitching knobs a montage plan exposes (protocols/stitching.py StitchSettings).

    ``max_stage_error_um`` bounds a tile's miss per axis. At 4,700x the R2/2 hole lattice
    (4 um pitch) makes every overlap periodic, so twice the bound must stay below 2 um: 1.0 um
    works because the montage approaches every tile from the same side (no backlash between
    neighbours). The atlas (bars 125 um apart) can use a wide bound. ``stage_rms_um`` (2D
    rms, ~1 um on a TEM stage) is the expected error reported for tiles nothing placed.
    """

    max_stage_error_um: PositiveFloat = 1.0
    stage_rms_um: PositiveFloat = 1.0
    smoothing_sigma_px: PositiveFloat = 1.5
    min_ncc: float = Field(default=0.25, gt=0, lt=1)
    output_pixel_um: PositiveFloat | None = None
