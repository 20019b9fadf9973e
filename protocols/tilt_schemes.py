"""Tilt schemes: the order of tilt angles in a tilt series and the dose each tilt receives.

Two schemes, as used in cryo-ET:

- bidirectional (the AutoCLEM paper): from a start angle up to one end, then back from
  ``start - step`` (or ``start + step``) to the other end: 0, 3, ..., 60, -3, ..., -60;
- dose-symmetric (Hagen, Wan & Briggs 2017): alternate sides in groups so that the low tilts,
  which carry most high-resolution information, are taken first with the least accumulated
  dose: 0, +3, -3, -6, +6, +9, -9, -12, ...

Schemes are frozen dataclasses (the inside); ``TiltSchemeConfig`` is the pydantic form for
config files and the API (the edge). ``check_limits`` refuses a scheme whose angles leave the
instrument's tilt range before anything moves, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from drivers.base import AxisLimits
from drivers.errors import ConfigError, LimitViolation

__all__ = ["BidirectionalConfig", "BidirectionalScheme", "DoseSymmetricConfig", "DoseSymmetricScheme",
           "DoseWeighting", "TiltPlan", "TiltScheme",
           "TiltSchemeConfig", "TiltStep", "check_limits", "plan_tilts"]

_EPS = 1e-9


class DoseWeighting(str, Enum):
    """How a total dose is split over the tilts.

    ``constant``: every tilt the same. ``inverse_cos``: proportional to 1/cos(tilt), which keeps
    the signal roughly constant as the specimen's projected thickness grows with tilt (SerialEM's
    "change exposure by 1/cosine").
    """

    CONSTANT = "constant"
    INVERSE_COS = "inverse_cos"


def _ramp(start: float, end: float, step: float) -> list[float]:
    """start, start +- step, ... up to ``end`` inclusive (within rounding), no float drift."""
    if abs(end - start) < _EPS:
        return [start]
    sign = 1.0 if end > start else -1.0
    n = math.floor(abs(end - start) / step + 1e-6)
    return [round(start + sign * k * step, 9) for k in range(n + 1)]


def _check_common(min_deg: float, max_deg: float, step_deg: float, start_deg: float,
                  prefix: str) -> None:
    for name, value in (("min_deg", min_deg), ("max_deg", max_deg), ("step_deg", step_deg),
                        ("start_deg", start_deg)):
        if not math.isfinite(value):
            raise ConfigError(f"{prefix}.{name}", f"must be finite, got {value!r}")
    if not step_deg > 0:
        raise ConfigError(f"{prefix}.step_deg", f"must be > 0, got {step_deg}")
    if not min_deg <= start_deg <= max_deg:
        raise ConfigError(f"{prefix}.start_deg",
                          f"{start_deg:g} outside [min_deg {min_deg:g}, max_deg {max_deg:g}]")
    if abs(min_deg) >= 90 or abs(max_deg) >= 90:
        raise ConfigError(prefix, f"tilt range [{min_deg:g}, {max_deg:g}] must lie inside (-90, 90)")


@dataclass(frozen=True)
class BidirectionalScheme:
    """Start at ``start_deg``, go to one end in ``step_deg`` steps, then cover the other side.

    ``first_direction`` +1 goes up to ``max_deg`` first (the paper: 0 -> +60, then -3 -> -60);
    -1 goes down to ``min_deg`` first.
    """

    min_deg: float = -60.0
    max_deg: float = 60.0
    step_deg: float = 3.0
    start_deg: float = 0.0
    first_direction: int = 1

    def __post_init__(self) -> None:
        _check_common(self.min_deg, self.max_deg, self.step_deg, self.start_deg,
                      "tilt_series.bidirectional")
        if self.first_direction not in (1, -1):
            raise ConfigError("tilt_series.bidirectional.first_direction",
                              f"must be +1 or -1, got {self.first_direction}")

    def angles(self) -> tuple[float, ...]:
        """Tilt angles in acquisition order, degrees."""
        up = _ramp(self.start_deg, self.max_deg, self.step_deg)
        down = _ramp(self.start_deg, self.min_deg, self.step_deg)
        first, second = (up, down) if self.first_direction == 1 else (down, up)
        return tuple(first + second[1:])


@dataclass(frozen=True)
class DoseSymmetricScheme:
    """Hagen's dose-symmetric scheme around ``start_deg``.

    After the start angle, one group of ``ceil(group_size / 2)`` tilts goes to the
    ``first_direction`` side, then groups of ``group_size`` alternate sides (Hagen: group size 2
    gives 0, +3, -3, -6, +6, +9, ...). When one side reaches its end the rest of the other side
    follows in order.
    """

    min_deg: float = -60.0
    max_deg: float = 60.0
    step_deg: float = 3.0
    start_deg: float = 0.0
    group_size: int = 2
    first_direction: int = 1

    def __post_init__(self) -> None:
        _check_common(self.min_deg, self.max_deg, self.step_deg, self.start_deg,
                      "tilt_series.dose_symmetric")
        if self.group_size < 1:
            raise ConfigError("tilt_series.dose_symmetric.group_size",
                              f"must be >= 1, got {self.group_size}")
        if self.first_direction not in (1, -1):
            raise ConfigError("tilt_series.dose_symmetric.first_direction",
                              f"must be +1 or -1, got {self.first_direction}")

    def angles(self) -> tuple[float, ...]:
        """Tilt angles in acquisition order, degrees."""
        up = _ramp(self.start_deg, self.max_deg, self.step_deg)[1:]
        down = _ramp(self.start_deg, self.min_deg, self.step_deg)[1:]
        sides = [up, down] if self.first_direction == 1 else [down, up]
        out = [self.start_deg]
        side, take = 0, math.ceil(self.group_size / 2)
        while sides[0] or sides[1]:
            if not sides[side]:
                side = 1 - side
            out.extend(sides[side][:take])
            del sides[side][:take]
            side, take = 1 - side, self.group_size
        return tuple(out)


TiltScheme = BidirectionalScheme | DoseSymmetricScheme


@dataclass(frozen=True)
class TiltStep:
    """One tilt of a planned series: angle, dose for this tilt, dose received before it."""

    index: int
    tilt_deg: float
    dose_e_per_a2: float
    prior_dose_e_per_a2: float


@dataclass(frozen=True)
class TiltPlan:
    """A scheme expanded for a total dose: what each tilt does, in acquisition order."""

    steps: tuple[TiltStep, ...]
    total_dose_e_per_a2: float

    @property
    def angles(self) -> tuple[float, ...]:
        return tuple(s.tilt_deg for s in self.steps)


def plan_tilts(scheme: TiltScheme, total_dose_e_per_a2: float,
               weighting: DoseWeighting = DoseWeighting.CONSTANT) -> TiltPlan:
    """Split ``total_dose_e_per_a2`` over the scheme's tilts (e.g. ~100 e/A^2 in the paper).

    Raises ConfigError for a negative or non-finite dose.
    """
    if not (math.isfinite(total_dose_e_per_a2) and total_dose_e_per_a2 >= 0):
        raise ConfigError("tilt_series.total_dose_e_per_a2",
                          f"must be a finite number >= 0, got {total_dose_e_per_a2!r}")
    angles = np.asarray(scheme.angles(), float)
    if weighting is DoseWeighting.CONSTANT:
        weights = np.ones_like(angles)
    else:
        weights = 1.0 / np.cos(np.deg2rad(angles))
    doses = total_dose_e_per_a2 * weights / weights.sum()
    prior = np.concatenate([[0.0], np.cumsum(doses)[:-1]])
    steps = tuple(TiltStep(k, float(a), float(d), float(p))
                  for k, (a, d, p) in enumerate(zip(angles, doses, prior, strict=True)))
    return TiltPlan(steps, float(total_dose_e_per_a2))


def check_limits(scheme: TiltScheme, tilt_limits: AxisLimits) -> None:
    """Refuse a scheme that would tilt outside ``tilt_limits``; call before anything moves.

    Raises LimitViolation naming the scheme, the offending angle, the limits and the setting,
    e.g. "bidirectional tilt series refused before moving: tilt 66 deg outside [-60, 60]
    (em.tilt_limits_deg)".
    """
    angles = scheme.angles()
    kind = "bidirectional" if isinstance(scheme, BidirectionalScheme) else "dose-symmetric"
    for angle in (min(angles), max(angles)):
        try:
            tilt_limits.check(angle)
        except LimitViolation as err:
            raise LimitViolation(f"{kind} tilt series refused before moving: {err}") from err


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BidirectionalConfig(_Frozen):
    """Config form of ``BidirectionalScheme`` (degrees)."""

    kind: Literal["bidirectional"] = "bidirectional"
    min_deg: float = Field(-60.0, gt=-90, lt=90)
    max_deg: float = Field(60.0, gt=-90, lt=90)
    step_deg: float = Field(3.0, gt=0, le=30)
    start_deg: float = Field(0.0, gt=-90, lt=90)
    first_direction: Literal[1, -1] = 1

    def to_scheme(self) -> BidirectionalScheme:
        return BidirectionalScheme(self.min_deg, self.max_deg, self.step_deg, self.start_deg,
                                   self.first_direction)


class DoseSymmetricConfig(_Frozen):
    """Config form of ``DoseSymmetricScheme`` (degrees)."""

    kind: Literal["dose_symmetric"] = "dose_symmetric"
    min_deg: float = Field(-60.0, gt=-90, lt=90)
    max_deg: float = Field(60.0, gt=-90, lt=90)
    step_deg: float = Field(3.0, gt=0, le=30)
    start_deg: float = Field(0.0, gt=-90, lt=90)
    group_size: int = Field(2, ge=1)
    first_direction: Literal[1, -1] = 1

    def to_scheme(self) -> DoseSymmetricScheme:
        return DoseSymmetricScheme(self.min_deg, self.max_deg, self.step_deg, self.start_deg,
                                   self.group_size, self.first_direction)


TiltSchemeConfig = Annotated[BidirectionalConfig | DoseSymmetricConfig, Field(discriminator="kind")]
