"""Configuration of the simulated light microscope (validated at the edge, frozen).

The defaults describe the AutoCLEM instrument: an inverted widefield microscope with a
20x/0.75 air objective for the grid atlas and a 100x/1.49 oil objective for inspection
and the live time-lapse, an sCMOS camera with 6.5 um pixels, and the channels DIC, BF,
405 (blue fiducial beads), 488 (virus) and 640 (cell tracker). Every number sits in one
place so that tests and benchmarks can change it and a TOML file can set it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.errors import config_error

Contrast = Literal["brightfield", "dic", "beads", "virus", "cell_tracker"]
TRANSMITTED: frozenset[str] = frozenset({"brightfield", "dic"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObjectiveConfig(_Frozen):
    """One objective and the camera geometry it gives.

    ``rotation_deg`` is the camera-to-stage rotation (the camera is never mounted exactly
    square to the stage); ``parfocal_offset_um`` is where this objective focuses relative
    to the focus drive reading, so switching objectives needs a refocus as on a real stand.
    """

    magnification: float = Field(gt=0)
    numerical_aperture: float = Field(gt=0, le=1.7)
    pixel_size_um: float = Field(gt=0)
    immersion_index: float = Field(1.0, ge=1.0, le=1.8)
    rotation_deg: float = Field(0.7, ge=-180, le=180)
    mirror: bool = False
    parfocal_offset_um: float = Field(0.0, ge=-50, le=50)

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.numerical_aperture > self.immersion_index:
            raise ValueError("numerical_aperture cannot exceed immersion_index; use an "
                             "immersion medium (e.g. oil 1.515) for NA > 1")
        return self


class ChannelConfig(_Frozen):
    """An illumination/filter preset and what it shows of the specimen.

    ``contrast`` says what is rendered: transmitted light ("brightfield", "dic") or one
    fluorophore ("beads" excited at 405, "virus" at 488, "cell_tracker" at 640).
    ``photons_per_s`` is, for transmitted light, photo-electrons per second in a pixel
    over clear glass; for point fluorophores, photo-electrons per second from one
    object of unit brightness at 100x/1.49; for the cell tracker, per um^2 of cell and um
    of thickness at 100x/1.49. ``bleach_tau_s`` is the exposure time at 100x irradiance
    after which the fluorophore is down to 1/e (None: no bleaching). ``section_um``
    (None: widefield) models a confocal's optical section for extended layers.
    """

    contrast: Contrast
    exposure_s: float = Field(gt=0, le=60)
    emission_nm: float = Field(gt=200, lt=1200)
    excitation_nm: float | None = Field(None, gt=200, lt=1200)
    photons_per_s: float = Field(gt=0)
    background_per_um2_s: float = Field(0.0, ge=0)
    bleach_tau_s: float | None = Field(None, gt=0)
    section_um: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ChannelConfig:
        fluorescent = self.contrast not in TRANSMITTED
        if fluorescent and self.excitation_nm is None:
            raise ValueError("excitation_nm is required for a fluorescence channel")
        if not fluorescent and self.excitation_nm is not None:
            raise ValueError("excitation_nm must be None for transmitted light")
        return self


class CameraConfig(_Frozen):
    """An sCMOS camera: geometry, gain, offset, read noise, saturation and readout speed."""

    shape: tuple[int, int] = (2048, 2048)          # (height, width)
    pixel_um: float = Field(6.5, gt=0)
    bit_depth: int = Field(16, ge=8, le=16)
    read_noise_e: float = Field(1.6, ge=0)
    e_per_adu: float = Field(0.46, gt=0)
    offset_adu: float = Field(100.0, ge=0)
    full_well_e: float = Field(30000.0, gt=0)
    line_time_s: float = Field(10e-6, ge=0)         # rolling readout: rows x line time
    vignetting: float = Field(0.08, ge=0, lt=1)     # relative illumination loss at corners

    @model_validator(mode="after")
    def _check(self) -> CameraConfig:
        if min(self.shape) < 8 or max(self.shape) > 8192:
            raise ValueError("shape must be (height, width) with each side in [8, 8192]")
        return self


class StageConfig(_Frozen):
    """Travel and positioning error of the XY stage and focus drive.

    Each XY move lands ``repeatability_um`` (rms per axis) away from the commanded
    position, plus half of ``backlash_um`` against the approach direction; the encoder
    reports the commanded position, so the error is invisible to the caller, as on a real
    stage. ``exact`` switches all errors off for geometry tests.
    """

    xy_limit_um: float = Field(5000.0, gt=0)
    z_limit_um: float = Field(500.0, gt=0)
    repeatability_um: float = Field(0.7, ge=0, le=50)
    backlash_um: float = Field(0.4, ge=0, le=50)
    z_repeatability_um: float = Field(0.02, ge=0, le=5)
    exact: bool = False


class TimingConfig(_Frozen):
    """How long things take on the virtual clock (seconds, um/s).

    Settle times are the low end of what a Nikon Ti2-class stand typically takes (XY stage
    settle 0.1-0.2 s, focus drive settle 20-50 ms), so protocol overheads measured against
    them are not flattered. ``channel_change_s`` is 0.15 s, a Ti2 filter turret's typical
    0.1-0.2 s (a DIC prism or emission wheel is of the same order). Not modelled: the ~20 ms
    of software and camera overhead per frame (a snap is its exposure plus the rolling
    readout).
    """

    xy_speed_um_s: float = Field(5000.0, gt=0)
    xy_settle_s: float = Field(0.1, ge=0)
    z_speed_um_s: float = Field(300.0, gt=0)
    z_settle_s: float = Field(0.02, ge=0)
    channel_change_s: float = Field(0.15, ge=0)
    objective_change_s: float = Field(2.0, ge=0)


def _default_objectives() -> dict[str, ObjectiveConfig]:
    return {name: ObjectiveConfig.model_validate(v) for name, v in {
        "20x": {"magnification": 20, "numerical_aperture": 0.75, "pixel_size_um": 0.325,
                "immersion_index": 1.0},
        "100x": {"magnification": 100, "numerical_aperture": 1.49, "pixel_size_um": 0.065,
                 "immersion_index": 1.515, "parfocal_offset_um": 1.2},
    }.items()}


def _default_channels() -> dict[str, ChannelConfig]:
    return {name: ChannelConfig.model_validate(v) for name, v in {
        "BF": {"contrast": "brightfield", "exposure_s": 0.01, "emission_nm": 550,
               "photons_per_s": 1.2e6},
        "DIC": {"contrast": "dic", "exposure_s": 0.02, "emission_nm": 550,
                "photons_per_s": 3.0e6},
        "405": {"contrast": "beads", "exposure_s": 0.1, "excitation_nm": 405,
                "emission_nm": 450, "photons_per_s": 2.0e5, "background_per_um2_s": 4.0e4,
                "bleach_tau_s": 300.0},
        "488": {"contrast": "virus", "exposure_s": 0.1, "excitation_nm": 488,
                "emission_nm": 520, "photons_per_s": 4.0e4, "background_per_um2_s": 2.0e4,
                "bleach_tau_s": 25.0},
        "640": {"contrast": "cell_tracker", "exposure_s": 0.05, "excitation_nm": 640,
                "emission_nm": 670, "photons_per_s": 2.4e6, "background_per_um2_s": 1.0e4,
                "bleach_tau_s": 60.0},
    }.items()}


class LightSimConfig(_Frozen):
    """Everything the simulated light microscope needs besides the specimen and the clock."""

    objectives: dict[str, ObjectiveConfig] = Field(default_factory=_default_objectives)
    channels: dict[str, ChannelConfig] = Field(default_factory=_default_channels)
    camera: CameraConfig = Field(default_factory=lambda: CameraConfig.model_validate({}))
    stage: StageConfig = Field(default_factory=lambda: StageConfig.model_validate({}))
    timing: TimingConfig = Field(default_factory=lambda: TimingConfig.model_validate({}))
    start_objective: str = "20x"
    start_channel: str = "BF"
    dic_shear_deg: float = Field(45.0, ge=-180, le=180)   # shear direction in camera axes

    @model_validator(mode="after")
    def _check(self) -> LightSimConfig:
        if not self.objectives:
            raise ValueError("objectives must hold at least one objective")
        if not self.channels:
            raise ValueError("channels must hold at least one channel")
        if self.start_objective not in self.objectives:
            raise ValueError(f"start_objective {self.start_objective!r} is not in objectives "
                             f"{sorted(self.objectives)}")
        if self.start_channel not in self.channels:
            raise ValueError(f"start_channel {self.start_channel!r} is not in channels "
                             f"{sorted(self.channels)}")
        return self

    @classmethod
    def build(cls, prefix: str = "lm", **values: Any) -> LightSimConfig:
        """Defaults deep-merged with ``values``; a bad value raises ConfigError naming it.

        Nested dicts merge into the defaults, so ``build(objectives={"100x":
        {"pixel_size_um": 0.1}})`` changes one field of one objective; a new objective or
        channel name must give all required fields.
        """
        merged = _deep_merge(cls.model_validate({}).model_dump(), values)
        try:
            return cls.model_validate(merged)
        except ValidationError as err:
            raise config_error(err, prefix) from err

    def replace(self, **values: Any) -> LightSimConfig:
        """A re-validated copy with ``values`` deep-merged in (validated means final)."""
        return LightSimConfig.build(**_deep_merge(self.model_dump(), values))


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


__all__ = [
    "TRANSMITTED",
    "CameraConfig",
    "ChannelConfig",
    "Contrast",
    "LightSimConfig",
    "ObjectiveConfig",
    "StageConfig",
    "TimingConfig",
]
