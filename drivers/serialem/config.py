"""The ``[em.settings]`` table of an electron microscope driven through SerialEM.

SerialEM knows its own calibrations, but clemd checks limits and computes pixel-to-stage
affines before anything is sent (drivers/base.py), so the magnification table, the stage and
tilt travel and the low-dose presets are stated here once and validated at start. Connection
fields (host, port, timeouts, backend) come from ``SerialEMSettings``; the environment is
read only by ``open_serialem``.

A bad value raises ``ConfigError`` naming the field (``em.settings.low_dose.record.mag_index``)
before a socket is opened.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.base import (
    AcquisitionSettings,
    AxisLimits,
    LowDoseArea,
    Magnification,
    StageLimits,
    check_low_dose_presets,
)
from drivers.errors import config_error
from drivers.serialem.client import SerialEMSettings

PREFIX = "em.settings"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MagRow(_Frozen):
    """One magnification as SerialEM indexes it; pixel size unbinned, at the specimen."""

    index: int = Field(ge=0)
    magnification: float = Field(gt=0)
    pixel_size_um: float = Field(gt=0)
    rotation_deg: float = 0.0

    def to_magnification(self) -> Magnification:
        return Magnification(index=self.index, magnification=self.magnification,
                             pixel_size_um=self.pixel_size_um, rotation_deg=self.rotation_deg)


class AreaPreset(_Frozen):
    """What one low-dose area does; the driver pushes mag, exposure and binning to SerialEM
    before each acquisition, so SerialEM and the image metadata cannot disagree."""

    mag_index: int = Field(ge=0)
    exposure_s: float = Field(gt=0)
    binning: int = Field(1, ge=1, le=16)
    dose_rate_e_per_a2_s: float = Field(1.0, ge=0)
    defocus_offset_um: float = 0.0

    def to_settings(self) -> AcquisitionSettings:
        return AcquisitionSettings(mag_index=self.mag_index, exposure_s=self.exposure_s,
                                   binning=self.binning,
                                   dose_rate_e_per_a2_s=self.dose_rate_e_per_a2_s,
                                   defocus_offset_um=self.defocus_offset_um)


Range = tuple[float, float]


class SerialEMConfig(SerialEMSettings):
    """Connection plus the instrument facts the contract checks before sending.

    ``camera_shape`` (height, width, unbinned) is asked of SerialEM (CameraProperties) when
    omitted. ``vacuum_gauge`` names the gauge ReportVacuumGauge reads (site specific; the
    column gauge on most Thermo Fisher scopes is IGPco; a JEOL wants "Pir" or "Pen" and a
    digit). SerialEM passes that gauge's status straight from the scope plugin, and what the
    numbers mean is not in SerialEM's source, so which statuses count as good
    (``vacuum_ok_statuses``) and an optional pressure ceiling (``vacuum_max_pressure``, in
    the unit the plugin reports) are site settings to check on the instrument.

    ``montage_dir`` is a folder on the SerialEM PC (a Windows path there, e.g.
    ``D:\\clemd\\montages``) where SerialEM's own montages are written, one new file per
    montage. Set, ``montage`` runs SerialEM's ``Montage`` (``native_montage``); unset, it
    falls back to the contract's tile loop. Pieces are read back into buffer
    ``montage_read_buffer`` (default P: pick one of A-T that nothing else at the site uses;
    A-C roll with every new image).
    """

    magnifications: tuple[MagRow, ...] = Field(min_length=1)
    low_dose: dict[str, AreaPreset] = Field(default_factory=dict)
    stage_limits_um: Range = (-990.0, 990.0)
    z_limits_um: Range = (-300.0, 300.0)
    tilt_limits_deg: Range = (-60.0, 60.0)
    camera_shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    vacuum_gauge: str = Field("IGPco", min_length=1)
    vacuum_ok_statuses: tuple[int, ...] = Field((0,), min_length=1)
    vacuum_max_pressure: float | None = Field(None, gt=0)
    montage_dir: str | None = Field(None, min_length=1)
    montage_read_buffer: str = Field("P", pattern="^[A-T]$")

    @model_validator(mode="after")
    def _check(self) -> SerialEMConfig:
        indices = [m.index for m in self.magnifications]
        if len(set(indices)) != len(indices):
            raise ValueError(f"magnifications indices must be unique, got {indices}")
        for name, rng in (("stage_limits_um", self.stage_limits_um),
                          ("z_limits_um", self.z_limits_um),
                          ("tilt_limits_deg", self.tilt_limits_deg)):
            if not rng[0] < rng[1]:
                raise ValueError(f"{name} {list(rng)} must be [lower, upper] with lower < upper")
        check_low_dose_presets(self.low_dose, indices)
        return self

    @classmethod
    def build(cls, prefix: str = PREFIX, **values: Any) -> SerialEMConfig:
        """Validate ``values``; a bad one raises ConfigError naming ``prefix.field``."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise config_error(err, prefix) from err

    def vacuum_is_ok(self, status: int, pressure: float) -> bool:
        """ReportVacuumGauge's status and pressure judged by this site's settings."""
        if status not in self.vacuum_ok_statuses:
            return False
        return self.vacuum_max_pressure is None or pressure <= self.vacuum_max_pressure

    # -- what drivers/base.py wants -----------------------------------------------------------

    def magnification_list(self) -> list[Magnification]:
        return [m.to_magnification() for m in self.magnifications]

    def low_dose_settings(self) -> dict[LowDoseArea, AcquisitionSettings]:
        return {LowDoseArea[k.upper()]: p.to_settings() for k, p in self.low_dose.items()}

    def stage_limits(self) -> StageLimits:
        xy = f"{PREFIX}.stage_limits_um"
        lo, hi = self.stage_limits_um
        return StageLimits(x=AxisLimits(lo, hi, "stage x", setting=xy),
                           y=AxisLimits(lo, hi, "stage y", setting=xy),
                           z=AxisLimits(*self.z_limits_um, "stage z",
                                        setting=f"{PREFIX}.z_limits_um"))

    def tilt_limits(self) -> AxisLimits:
        return AxisLimits(*self.tilt_limits_deg, "tilt", unit="deg",
                          setting=f"{PREFIX}.tilt_limits_deg")
