"""Configuration of the Micro-Manager light microscope driver, validated at the edge.

clemd's config file names Micro-Manager things (config groups, presets, pixel-size configs,
devices) rather than copying their values, so the facility's Micro-Manager configuration
stays the one place where hardware settings live. This module only checks the *shape* of
that mapping; whether the named groups and presets exist is checked against the running
core when the driver connects (drivers/micromanager.py), because only the core knows.

Every validation failure becomes ``ConfigError`` naming the field, e.g.
``lm.objectives.20x.pixel_size_um``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.base import AxisLimits, Channel, StageLimits
from drivers.errors import config_error

__all__ = [
    "BridgeConnection", "ChannelConfig", "HeadlessConnection", "MicroManagerConfig",
    "ObjectiveConfig", "StageLimitsConfig", "demo_config",
]


class _Model(BaseModel):
    """Frozen, and misspelt keys are refused rather than dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class HeadlessConnection(_Model):
    """An in-process MMCore started by this driver (pycromanager ``start_headless``).

    ``config_file`` may be relative to ``mm_dir`` (the folder holding the device adapters),
    as Micro-Manager's own launcher allows.
    """

    kind: Literal["headless"]
    mm_dir: Path
    config_file: Path
    buffer_size_mb: int = Field(default=512, gt=0)

    @property
    def config_path(self) -> Path:
        return self.config_file if self.config_file.is_absolute() else self.mm_dir / self.config_file

    @model_validator(mode="after")
    def _paths_exist(self) -> HeadlessConnection:
        if not self.mm_dir.is_dir():
            raise ValueError(f"mm_dir {str(self.mm_dir)!r} is not a folder; point it at the "
                             f"folder holding the Micro-Manager device adapters")
        if not self.config_path.is_file():
            raise ValueError(f"config_file {str(self.config_path)!r} does not exist; give an "
                             f"absolute path or one relative to mm_dir")
        return self


class BridgeConnection(_Model):
    """A running Micro-Manager (the facility GUI) reached over pycromanager's Java bridge."""

    kind: Literal["bridge"]
    port: int = Field(default=4827, ge=1024, le=65535)
    timeout_s: float = Field(default=5.0, gt=0)


class ObjectiveConfig(_Model):
    """An objective: the preset that selects it and the geometry it gives.

    The pixel size comes either from a Micro-Manager pixel-size configuration
    (``pixel_size_config``, read from the core when connecting, and checked to be the active
    one after every switch) or is given here (``pixel_size_um``); exactly one of the two.
    """

    group: str = Field(min_length=1)
    preset: str = Field(min_length=1)
    magnification: float = Field(gt=0)
    numerical_aperture: float = Field(gt=0, le=1.7)
    pixel_size_config: str | None = Field(default=None, min_length=1)
    pixel_size_um: float | None = Field(default=None, gt=0)
    rotation_deg: float = Field(default=0.0, ge=-360.0, le=360.0)
    mirror: bool = False

    @model_validator(mode="after")
    def _one_pixel_size_source(self) -> ObjectiveConfig:
        if (self.pixel_size_config is None) == (self.pixel_size_um is None):
            raise ValueError("give exactly one of pixel_size_config (a Micro-Manager pixel-size "
                             "configuration) or pixel_size_um")
        return self


class ChannelConfig(_Model):
    """An illumination/filter preset; ``excitation_nm`` omitted means transmitted light."""

    group: str = Field(min_length=1)
    preset: str = Field(min_length=1)
    exposure_s: float = Field(gt=0, le=3600)
    excitation_nm: float | None = Field(default=None, gt=0)

    def to_channel(self, name: str) -> Channel:
        return Channel(name=name, exposure_s=self.exposure_s, excitation_nm=self.excitation_nm)


Range = Annotated[tuple[float, float], Field(description="[lower, upper] in micrometres")]


class StageLimitsConfig(_Model):
    """Travel clemd allows, usually tighter than the stage's own (the grid holder, the lens)."""

    x_um: Range
    y_um: Range
    z_um: Range

    @model_validator(mode="after")
    def _ordered(self) -> StageLimitsConfig:
        for axis in ("x_um", "y_um", "z_um"):
            lower, upper = getattr(self, axis)
            if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
                raise ValueError(f"{axis} [{lower}, {upper}] must be finite with lower < upper; "
                                 f"write [lower, upper]")
        return self

    def to_limits(self, prefix: str) -> StageLimits:
        def axis(name: str, key: str) -> AxisLimits:
            lower, upper = getattr(self, key)
            return AxisLimits(lower, upper, f"stage {name}",
                              setting=f"{prefix}.stage_limits.{key}")
        return StageLimits(x=axis("x", "x_um"), y=axis("y", "y_um"), z=axis("z", "z_um"))


Connection = Annotated[HeadlessConnection | BridgeConnection, Field(discriminator="kind")]


class MicroManagerConfig(_Model):
    """Everything the Micro-Manager driver needs; the first objective and channel are applied
    when the driver connects, so its state is known from the start.

    Device names left as None keep the core's defaults (Core-Camera, Core-XYStage,
    Core-Focus). ``autofocus_device`` set means ``autofocus()`` runs that device's
    full focus instead of clemd's image-sharpness search. ``frame_timeout_s`` bounds the wait
    for each frame beyond its exposure during a streamed acquisition.
    """

    connection: Connection
    objectives: dict[str, ObjectiveConfig] = Field(min_length=1)
    channels: dict[str, ChannelConfig] = Field(min_length=1)
    stage_limits: StageLimitsConfig
    camera_device: str | None = Field(default=None, min_length=1)
    xy_stage_device: str | None = Field(default=None, min_length=1)
    focus_device: str | None = Field(default=None, min_length=1)
    autofocus_device: str | None = Field(default=None, min_length=1)
    frame_timeout_s: float = Field(default=30.0, gt=0)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], prefix: str = "lm") -> MicroManagerConfig:
        """Validate parsed TOML; errors become ``ConfigError`` named ``{prefix}.{field}``."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise config_error(err, prefix) from err

    def replace(self, prefix: str = "lm", **changes: Any) -> MicroManagerConfig:
        """A re-validated copy with ``changes`` applied (validated means final)."""
        return type(self).from_mapping({**self.model_dump(), **changes}, prefix)


def demo_config(mm_dir: Path | None = None) -> MicroManagerConfig:
    """A config for Micro-Manager's demo devices (MMConfig_demo.cfg), for tests and to copy.

    Objectives are the demo 'Objective' group with its pixel-size configurations Res10x,
    Res20x and Res40x. Fluorescence channels map to the demo 'Channel' group (DAPI, FITC,
    Rhodamine, Cy5). The demo has no transmitted-light preset, so "DIC" selects the
    'LightPath' group's Camera-left preset to stand in for one. Travel: +-10 mm in XY, and
    the demo focus drive's own +-300 um in Z. ``mm_dir`` defaults to the device adapters of
    the mm-test-adapters package (a test dependency).
    """
    if mm_dir is None:
        import mm_test_adapters  # test dependency: only the demo needs it

        mm_dir = Path(mm_test_adapters.device_adapter_path())
    objective = {"group": "Objective", "rotation_deg": 0.0, "mirror": False}
    channel = {"group": "Channel"}
    return MicroManagerConfig.from_mapping({
        "connection": {"kind": "headless", "mm_dir": mm_dir, "config_file": "MMConfig_demo.cfg"},
        "objectives": {
            "10x": {**objective, "preset": "10X", "magnification": 10, "numerical_aperture": 0.3,
                    "pixel_size_config": "Res10x"},
            "20x": {**objective, "preset": "20X", "magnification": 20, "numerical_aperture": 0.5,
                    "pixel_size_config": "Res20x"},
            "40x": {**objective, "preset": "40X", "magnification": 40,
                    "numerical_aperture": 0.75, "pixel_size_config": "Res40x"},
        },
        "channels": {
            "DIC": {"group": "LightPath", "preset": "Camera-left", "exposure_s": 0.005},
            "405": {**channel, "preset": "DAPI", "exposure_s": 0.01, "excitation_nm": 405},
            "488": {**channel, "preset": "FITC", "exposure_s": 0.01, "excitation_nm": 488},
            "561": {**channel, "preset": "Rhodamine", "exposure_s": 0.01, "excitation_nm": 561},
            "640": {**channel, "preset": "Cy5", "exposure_s": 0.01, "excitation_nm": 640},
        },
        "stage_limits": {"x_um": (-10000.0, 10000.0), "y_um": (-10000.0, 10000.0),
                         "z_um": (-300.0, 300.0)},
        "xy_stage_device": "XY",
        "focus_device": "Z",
        "camera_device": "Camera",
        "autofocus_device": "Autofocus",
    })
