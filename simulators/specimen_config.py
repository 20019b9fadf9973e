"""Configuration of the virtual specimen (validated at the edge, frozen)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.errors import config_error

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpecimenConfig(_Frozen):
    """Everything that makes one simulated grid; the same config and seed give the same grid.

    Defaults follow the AutoCLEM paper's grids: 3.05 mm Quantifoil R2/2 finder grids,
    200 mesh, 200 nm beads on the back side, 30% of beads lost at freezing.
    """

    seed: int = 0
    # grid
    grid_diameter_um: float = Field(3050.0, gt=0)
    rim_width_um: float = Field(200.0, ge=0)
    pitch_um: float = Field(125.0, gt=0)
    bar_width_um: float = Field(35.0, gt=0)
    hole_diameter_um: float = Field(2.0, gt=0)
    hole_pitch_um: float = Field(4.0, gt=0)
    broken_fraction: Fraction = 0.06
    thick_ice_fraction: Fraction = 0.10
    # biology
    cell_square_fraction: Fraction = 0.15
    cells_per_square: tuple[int, int] = (1, 3)
    beads_per_square: tuple[int, int] = (5, 20)
    bead_diameter_um: float = Field(0.2, gt=0)
    viruses_per_cell_square: tuple[int, int] = (4, 12)
    virus_motion: tuple[Fraction, Fraction, Fraction] = (0.6, 0.3, 0.1)  # static, diffusing, directed
    freeze_time_s: float = Field(3600.0, gt=0)
    # freezing and transfer
    bead_loss: Fraction = 0.30
    contamination: float = Field(0.20, ge=0.0, le=5.0)
    stretch: tuple[float, float] = (0.97, 1.03)
    distortion_um: float = Field(0.5, ge=0.0, le=5.0)
    flip_fraction: Fraction = 0.5
    # fixed overrides for tests (None = drawn from the seed)
    em_rotation_deg: float | None = None
    flipped: bool | None = None
    lm_rotation_deg: float | None = None

    @model_validator(mode="after")
    def _check(self) -> SpecimenConfig:
        if self.bar_width_um >= self.pitch_um:
            raise ValueError("bar_width_um must be smaller than pitch_um")
        if self.hole_diameter_um >= self.hole_pitch_um:
            raise ValueError("hole_diameter_um must be smaller than hole_pitch_um")
        if not 0 < self.stretch[0] <= self.stretch[1] < 2:
            raise ValueError("stretch must be an increasing pair within (0, 2)")
        for name in ("cells_per_square", "beads_per_square", "viruses_per_cell_square"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi < lo:
                raise ValueError(f"{name} must be a (min, max) pair with 0 <= min <= max")
        if abs(sum(self.virus_motion) - 1.0) > 1e-6:
            raise ValueError("virus_motion fractions (static, diffusing, directed) must sum to 1")
        if self.rim_width_um >= self.grid_diameter_um / 2:
            raise ValueError("rim_width_um must be smaller than the grid radius")
        return self

    @classmethod
    def build(cls, prefix: str = "specimen", **values: object) -> SpecimenConfig:
        """Validate ``values``; a bad one raises ConfigError naming ``prefix.field``."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise config_error(err, prefix) from err
