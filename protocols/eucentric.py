"""Rough eucentric height by tilting: bring the specimen onto the tilt axis before a series.

Why: a specimen ``dz`` above the tilt axis moves sideways by ``dz sin(tilt)`` when tilted
(5 um at 60 degrees for a typical 6 um error), which no 1 um record field survives. SerialEM's
"Eucentricity" measures that shift at two tilts and moves stage Z; the contract has no such
command, so this module does it with two images.

How: image at +t and -t (View preset; same foreshortening, so only the height shift differs),
align the two (protocols/em_align.py), and dz = shift across the axis / (2 sin t). The search
is bounded below half the hole pitch, so ``tilt_deg`` is kept small (5 degrees: up to 11 um of
height error). Stage runout while tilting limits the result to a few hundred nanometres; the
tilt series' tracking takes care of the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from drivers.base import ElectronMicroscope, LowDoseArea
from protocols.em_align import align_to_reference
from protocols.em_params import FrozenParams, SettingsOverride

__all__ = ["EucentricParams", "EucentricResult", "measure_and_set_eucentric"]


class EucentricParams(FrozenParams):
    """Rough eucentricity: area, tilt (deg), search bound (um), tilt-axis direction (deg)."""

    area: LowDoseArea = LowDoseArea.VIEW
    settings: SettingsOverride | None = None
    tilt_deg: float = Field(default=5.0, gt=0.5, le=20)
    search_um: float = Field(default=1.9, gt=0, le=20)
    min_score: float = Field(default=0.05, ge=0, lt=1)
    max_correction_um: float = Field(default=30.0, gt=0, le=100)


@dataclass(frozen=True)
class EucentricResult:
    """Height error found (um, positive: specimen above the axis) and the new stage Z."""

    dz_um: float
    z_before_um: float
    z_after_um: float
    score: float
    dose_e_per_a2: float
    applied: bool

    def to_json(self) -> dict[str, Any]:
        return {"dz_um": self.dz_um, "z_before_um": self.z_before_um,
                "z_after_um": self.z_after_um, "score": self.score,
                "dose_e_per_a2": self.dose_e_per_a2, "applied": self.applied}


def measure_and_set_eucentric(em: ElectronMicroscope, params: EucentricParams, *,
                              axis_deg: float = 0.0, log: Any = None) -> EucentricResult:
    """Measure the height error at the current stage position and move Z to cancel it.

    Leaves the stage at tilt 0. A weak match (score under ``min_score``) or a correction over
    ``max_correction_um`` is reported with ``applied`` False and Z left alone: a wrong Z is
    worse than none, since tracking copes with a moderate error.
    """
    settings = params.settings.apply(em, params.area) if params.settings is not None else None
    x, y, z = em.stage_position()
    t = params.tilt_deg
    em.tilt_to(-t)
    minus = em.acquire(params.area, settings)
    em.tilt_to(t)
    plus = em.acquire(params.area, settings)
    em.tilt_to(0.0)
    a = align_to_reference(minus, plus, max_shift_um=params.search_um)
    v = np.array([-math.sin(math.radians(axis_deg)), math.cos(math.radians(axis_deg))])
    dz = float(np.dot(a.shift_um, v) / (2 * math.sin(math.radians(t))))
    applied = a.score >= params.min_score and abs(dz) <= params.max_correction_um
    z_after = z + dz if applied else z
    if applied:
        em.move_stage(x, y, z_after)
    if log is not None:
        log.info("em.eucentric", dz_um=round(dz, 3), score=round(a.score, 3), applied=applied)
    return EucentricResult(dz, z, z_after, a.score,
                           minus.dose_e_per_a2 + plus.dose_e_per_a2, applied)
