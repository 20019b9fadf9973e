"""Configuration of the simulated electron microscope (validated at the edge, frozen).

The defaults describe a 300 kV cryo-TEM with a 4096 x 4096 counting camera as the AutoCLEM
workflow uses it (docs/clem-workflow.md): an EM atlas at ~200x, square maps at 4,700x
(binned, large defocus, so that 200 nm beads show) and tilt series at 39,000x (2.8 A
pixels). Every number that shapes an image or a timing lives here, so that a test can make
the instrument exact (``stage.repeatability_rms_um = 0``) or hostile.

A bad value raises ``ConfigError`` naming the field, e.g. ``em.magnifications.3.pixel_size_um``,
before a simulator exists (so nothing can have moved).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.base import AcquisitionSettings, LowDoseArea, Magnification, check_low_dose_presets
from drivers.errors import ConfigError, config_error

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]

#: Pixel size times magnification (um): 39,000x -> 0.28 nm, 4,700x -> 2.3 nm, 200x -> 55 nm.
PIXEL_TIMES_MAG_UM = 0.00028 * 39000.0
LM_MAGS = (62, 84, 110, 135, 165, 200, 265, 340, 440, 580)
SA_MAGS = (1250, 1600, 2000, 2500, 3600, 4700, 6500, 8700, 11500, 14500, 18000, 22500,
           29000, 39000, 50000, 64000, 81000, 105000)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MagEntry(_Frozen):
    """One row of the magnification table, indexed as SerialEM numbers them (LM first)."""

    index: int = Field(ge=0)
    magnification: PositiveFloat
    pixel_size_um: PositiveFloat
    rotation_deg: float = 0.0
    lm: bool = False

    def to_magnification(self) -> Magnification:
        return Magnification(index=self.index, magnification=self.magnification,
                             pixel_size_um=self.pixel_size_um, rotation_deg=self.rotation_deg)


def default_magnifications() -> tuple[MagEntry, ...]:
    """LM 62x..580x (indices 1-10) and SA 1,250x..105,000x (indices 11-28).

    Image-to-stage rotation differs by about 90 degrees between the LM and SA ranges and
    drifts by a few degrees within a range, as on real columns.
    """
    rows = [MagEntry(index=i + 1, magnification=m, pixel_size_um=PIXEL_TIMES_MAG_UM / m,
                     rotation_deg=round(93.0 - 0.4 * i, 2), lm=True)
            for i, m in enumerate(LM_MAGS)]
    base = len(LM_MAGS) + 1
    rows += [MagEntry(index=base + i, magnification=m, pixel_size_um=PIXEL_TIMES_MAG_UM / m,
                      rotation_deg=round(4.0 - 0.25 * i, 2))
             for i, m in enumerate(SA_MAGS)]
    return tuple(rows)


def mag_index_of(magnification: float) -> int:
    """Index of a magnification in the default table (e.g. 4700 -> 16)."""
    for row in default_magnifications():
        if row.magnification == magnification:
            return row.index
    raise ConfigError("em.magnifications", f"{magnification:g}x is not in the default table")


class LowDosePreset(_Frozen):
    """What one low-dose area does. ``axis_offset_um`` puts Focus/Trial beside the target
    along the tilt axis (image shift), as SerialEM's low-dose mode does, so that focusing
    does not expose the target."""

    mag_index: int
    exposure_s: PositiveFloat
    binning: int = Field(1, ge=1, le=16)
    dose_rate_e_per_a2_s: NonNegFloat = 1.0
    defocus_offset_um: float = 0.0
    axis_offset_um: float = 0.0

    def to_settings(self) -> AcquisitionSettings:
        return AcquisitionSettings(mag_index=self.mag_index, exposure_s=self.exposure_s,
                                   binning=self.binning,
                                   dose_rate_e_per_a2_s=self.dose_rate_e_per_a2_s,
                                   defocus_offset_um=self.defocus_offset_um)


def default_low_dose() -> dict[str, LowDosePreset]:
    """Search 200x bin 4; View 4,700x bin 8 at -50 um; Focus/Trial/Record 39,000x.

    Record gives 2.4 e/A^2 per image: 41 tilts (-60..60 by 3) make ~100 e/A^2.
    """
    return {
        "search": LowDosePreset(mag_index=mag_index_of(200), exposure_s=0.5, binning=4,
                                dose_rate_e_per_a2_s=0.002),
        "view": LowDosePreset(mag_index=mag_index_of(4700), exposure_s=1.0, binning=8,
                              dose_rate_e_per_a2_s=0.02, defocus_offset_um=-50.0),
        "focus": LowDosePreset(mag_index=mag_index_of(39000), exposure_s=0.5, binning=2,
                               dose_rate_e_per_a2_s=2.0, axis_offset_um=2.0),
        "trial": LowDosePreset(mag_index=mag_index_of(39000), exposure_s=0.5, binning=2,
                               dose_rate_e_per_a2_s=2.0, axis_offset_um=2.0),
        "record": LowDosePreset(mag_index=mag_index_of(39000), exposure_s=1.2, binning=1,
                                dose_rate_e_per_a2_s=2.0),
    }


class StageModel(_Frozen):
    """Travel, and how the stage misses: repeatability, backlash, tilt runout.

    ``repeatability_rms_um`` is the rms of the 2D landing error of a long move (per axis
    rms / sqrt(2)); moves shorter than ``repeatability_full_distance_um`` miss by less
    (scaled with sqrt of the distance). ``backlash_um`` is the lost motion when an axis
    reverses: the stage lands ``backlash_um / 2`` short of the target in the direction it
    came from, so approaching from one side is repeatable and reversing is not.
    """

    limits_xy_um: PositiveFloat = 1600.0
    limits_z_um: PositiveFloat = 100.0
    tilt_limit_deg: Annotated[float, Field(gt=0, lt=90)] = 70.0
    repeatability_rms_um: NonNegFloat = 1.0
    repeatability_full_distance_um: PositiveFloat = 10.0
    z_repeatability_rms_um: NonNegFloat = 0.2
    backlash_um: NonNegFloat = 0.5
    tilt_repeatability_rms_deg: NonNegFloat = 0.02
    tilt_axis_deg: float = 0.0
    tilt_runout_um: NonNegFloat = 0.3


class TimingModel(_Frozen):
    """How long things take on the clock (seconds; speeds per second)."""

    stage_settle_s: NonNegFloat = 1.5
    stage_speed_um_s: PositiveFloat = 150.0
    z_speed_um_s: PositiveFloat = 20.0
    tilt_speed_deg_s: PositiveFloat = 6.0
    tilt_settle_s: NonNegFloat = 1.0
    mag_change_s: NonNegFloat = 0.5
    lm_sa_switch_s: NonNegFloat = 3.0
    defocus_change_s: NonNegFloat = 0.05
    image_shift_settle_s: NonNegFloat = 0.1
    readout_base_s: NonNegFloat = 0.2
    readout_s_per_mpix: NonNegFloat = 0.02


class OpticsModel(_Frozen):
    """Image formation: mass-thickness, phase contrast (CTF), envelopes, camera, calibration.

    Mean free paths set amplitude contrast (``exp(-t / mfp)``); inner potentials relative to
    vitreous ice set phase shifts (``sigma * dV * t``). ``pixel_size_error_rms`` and
    ``rotation_error_rms_deg`` make the true pixel size and rotation at each magnification
    differ from the table (a calibration error drawn once from the seed).
    """

    high_voltage_kv: PositiveFloat = 300.0
    cs_mm: NonNegFloat = 2.7
    b_factor_nm2: NonNegFloat = 1.0
    illumination_aperture_mrad: NonNegFloat = 0.01
    ice_mfp_nm: PositiveFloat = 350.0
    carbon_mfp_nm: PositiveFloat = 150.0
    bead_mfp_nm: PositiveFloat = 350.0
    virus_mfp_nm: PositiveFloat = 2500.0
    carbon_nm: NonNegFloat = 12.0
    carbon_dv_v: float = 4.0
    ice_v: float = 4.5
    cell_dv_v: float = 1.5
    bead_dv_v: float = 3.5
    virus_dv_v: float = 2.5
    metal_phase_rad: float = 2.0
    max_phase_contrast: PositiveFloat = 0.9
    virus_diameter_um: PositiveFloat = 0.1
    virus_membrane_nm: PositiveFloat = 5.0
    contamination_height_um: float = 0.05
    camera_mtf_sigma_px: NonNegFloat = 0.4
    pixel_size_error_rms: Annotated[float, Field(ge=0, le=0.1)] = 0.005
    rotation_error_rms_deg: Annotated[float, Field(ge=0, le=5)] = 0.2


class AutofocusModel(_Frozen):
    """How the simulated autofocus (SerialEM's beam-tilt pair) measures and fails.

    Two shots at the Focus settings with the beam tilted +-``beam_tilt_mrad``; the defocus
    comes from their relative displacement, so its error grows as contrast falls:
    ``noise_rms_um`` on carbon and hole edges (SerialEM reaches 50-100 nm there), scaled by
    ``reference_contrast / contrast`` (square root) below that contrast. Contrast is the
    band-passed phase (rad rms) of what the beam crosses, weighted by the transmission
    (carbon film with hole edges at 39,000x: 0.014-0.021 rad; flat ice in a hole: 0): a
    field under ``min_contrast`` (empty hole, torn film) or with a mean transmission under
    ``min_transmission`` (grid bar) gives no measurement, as the correlation has no peak.
    """

    shots: Annotated[int, Field(ge=2, le=3)] = 2
    beam_tilt_settle_s: NonNegFloat = 0.15
    noise_rms_um: NonNegFloat = 0.07
    reference_contrast: PositiveFloat = 0.02
    min_contrast: NonNegFloat = 0.004
    min_transmission: NonNegFloat = 0.05
    max_noise_rms_um: PositiveFloat = 0.3


class ElectronFaults(_Frozen):
    """Typed fault options for tests: when the vacuum fails, when the dewar fills, when the
    stage stops answering."""

    vacuum_fault_after_s: NonNegFloat | None = None
    dewar_fill_period_s: PositiveFloat | None = None
    dewar_fill_duration_s: PositiveFloat = 120.0
    stage_fault_after_moves: Annotated[int, Field(ge=0)] | None = None


class ElectronSimConfig(_Frozen):
    """Everything that makes one simulated TEM; the same config, seed and calls give the
    same images."""

    seed: int = 0
    camera_shape: tuple[Annotated[int, Field(ge=16, le=16384)],
                        Annotated[int, Field(ge=16, le=16384)]] = (4096, 4096)
    magnifications: tuple[MagEntry, ...] = Field(default_factory=default_magnifications)
    low_dose: dict[str, LowDosePreset] = Field(default_factory=default_low_dose)
    initial_defocus_um: Annotated[float, Field(ge=-500, le=500)] = -6.0
    stage: StageModel = StageModel()
    timing: TimingModel = TimingModel()
    optics: OpticsModel = OpticsModel()
    autofocus: AutofocusModel = AutofocusModel()
    faults: ElectronFaults = ElectronFaults()

    @model_validator(mode="after")
    def _check(self) -> ElectronSimConfig:
        if not self.magnifications:
            raise ValueError("magnifications must hold at least one entry")
        indices = [m.index for m in self.magnifications]
        if len(set(indices)) != len(indices):
            raise ValueError(f"magnifications indices must be unique, got {indices}")
        check_low_dose_presets(self.low_dose, indices)
        for key, preset in self.low_dose.items():
            if preset.binning > min(self.camera_shape):
                raise ValueError(f"low_dose.{key}.binning {preset.binning} exceeds the camera "
                                 f"{self.camera_shape}")
        return self

    def mag_entry(self, index: int) -> MagEntry:
        return next(m for m in self.magnifications if m.index == index)

    def area_preset(self, area: LowDoseArea) -> LowDosePreset | None:
        return self.low_dose.get(area.name.lower())

    @classmethod
    def build(cls, prefix: str = "em", **values: Any) -> ElectronSimConfig:
        """Validate ``values``; a bad one raises ConfigError naming ``prefix.field``."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise config_error(err, prefix) from err

    def replace(self, **changes: Any) -> ElectronSimConfig:
        """A re-validated copy with ``changes`` (nested models may be given as dicts)."""
        merged = self.model_dump()
        for key, value in changes.items():
            old = merged.get(key)
            merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) \
                else value
        return ElectronSimConfig.build(**merged)
