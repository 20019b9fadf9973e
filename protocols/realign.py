"""Realign to a target: cancel the stage error by imaging the neighbourhood and aligning it
to the square map.

Why: a TEM stage returns to a position only within ~1 um, while the record field at 39,000x
is ~1 um wide. AutoCLEM (docs/clem-workflow.md, "Positioning") images the neighbourhood, aligns
it to the map by cross-correlation and corrects with image shift before acquiring.

How: approach the target from the same side as the map's tiles were approached (same
backlash), image at the map's preset (View, 4,700x), align to the map rendered through both
affines (protocols/em_align.py), shift the beam by the measured offset (or move the stage when
the offset exceeds ``max_image_shift_um``), then repeat until the estimate changes by less
than ``tolerance_um``. Every image measures the whole offset (the affines include the image
shift), so the change between the last two estimates is the residual estimate (None after a
single iteration).

Why every iteration at the map's own preset by default: an image taken as the map's tiles were
(same magnification, defocus, binning) looks like the map, so the correlation has nothing to
explain but the shift. On the simulated TEM (benchmarks/protocols.py, em section, 5 seeds x 6
targets) that lands the target 3 nm (median) and 6 nm (worst) from the centre of a 39,000x
frame; later iterations at 11,500x aligned to the map gave 10 nm and 126 nm, and a 39,000x
or 11,500x shot aligned to the last View image was no better (tens to 200 nm: a 1 um field
holds little of what a 19 nm-pixel image shows). ``fine`` (another magnification for the
later iterations) remains for columns whose image-shift calibration is the larger error; it
needs a map-like image at that magnification to help, and should be measured before use.

Raises ``RealignError`` when the map and the image do not match well enough to trust
(score under ``min_score``): better no tilt series than one of the wrong place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from drivers.base import ElectronMicroscope, Image, LowDoseArea
from drivers.errors import ClemdError
from protocols.em_acquire import APPROACH_UM, approach
from protocols.em_align import align_to_reference
from protocols.em_params import FrozenParams, SettingsOverride

__all__ = ["RealignError", "RealignParams", "RealignResult", "realign"]


class RealignError(ClemdError):
    """The neighbourhood of a target could not be matched to its map with confidence."""


class RealignParams(FrozenParams):
    """How to realign (areas, search radii in um).

    ``coarse``/``fine`` override the area's settings for the first and the later iterations
    (None: the area as configured; keep ``fine`` None so that every image matches the map's
    imaging conditions, see the module docstring). ``search_um`` bounds the first search: keep it under half
    the hole pitch (2 um) so that the lattice cannot alias; ``fine_search_um`` the later ones,
    around the estimate so far. A later iteration scoring under ``min_fine_score`` (its field
    held too little of the map) is reported and ignored.
    """

    coarse_area: LowDoseArea = LowDoseArea.VIEW
    coarse: SettingsOverride | None = None
    fine_area: LowDoseArea = LowDoseArea.VIEW
    fine: SettingsOverride | None = None
    max_iterations: int = Field(default=3, ge=1, le=6)
    tolerance_um: float = Field(default=0.02, gt=0)
    search_um: float = Field(default=1.9, gt=0, le=20)
    fine_search_um: float = Field(default=0.2, gt=0, le=20)
    min_fine_score: float = Field(default=0.1, ge=0, lt=1)
    max_image_shift_um: float = Field(default=4.0, gt=0, le=20)
    min_score: float = Field(default=0.03, ge=0, lt=1)
    approach_um: float = Field(default=APPROACH_UM, ge=0, le=50)


@dataclass(frozen=True)
class RealignResult:
    """Where realign left the microscope, and what it measured (um, stage frame)."""

    target_um: tuple[float, float]
    stage_um: tuple[float, float, float]
    image_shift_um: tuple[float, float]
    residual_um: float | None
    iterations: list[dict[str, Any]] = field(default_factory=list)
    dose_e_per_a2: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"target_um": list(self.target_um), "stage_um": list(self.stage_um),
                "image_shift_um": list(self.image_shift_um), "residual_um": self.residual_um,
                "iterations": self.iterations, "dose_e_per_a2": self.dose_e_per_a2}


def realign(em: ElectronMicroscope, target_um: tuple[float, float], reference: Image,
            params: RealignParams, *, z_um: float | None = None, log: Any = None) -> RealignResult:
    """Bring ``target_um`` (stage frame of ``reference``) to the beam centre.

    Moves the stage (approach from -x, -y; ``z_um`` if given), resets and then sets the image
    shift. LimitViolation before moving if the target is out of reach.
    """
    x, y = target_um
    em.set_image_shift(0.0, 0.0)
    approach(em, x, y, from_um=params.approach_um, force=True)
    if z_um is not None:
        em.move_stage(x, y, z_um)
    shift = (0.0, 0.0)
    iterations: list[dict[str, Any]] = []
    dose = 0.0
    last: float | None = None
    for i in range(params.max_iterations):
        area, override = ((params.coarse_area, params.coarse) if i == 0
                          else (params.fine_area, params.fine))
        settings = override.apply(em, area) if override is not None else None
        img = em.acquire(area, settings)
        dose += img.dose_e_per_a2
        search = params.search_um if i == 0 else params.fine_search_um
        a = align_to_reference(reference, img, max_shift_um=search, expect_um=shift)
        widened = i > 0 and _on_window_edge(a.shift_um, shift, search, img.pixel_size_um)
        if widened:
            # the best match lies on the rim of the fine search: the peak is beyond it (the
            # first estimate was off by more than fine_search_um), and a search that small
            # only walks towards it by its own radius per iteration and never converges
            a = align_to_reference(reference, img, max_shift_um=params.search_um,
                                   expect_um=shift)
        if i > 0 and a.score < params.min_fine_score:
            # a finer field can hold too little of the map (all carbon, all hole): keep the
            # estimate we have rather than chase a weak peak
            iterations.append({"mag_index": img.mag_index, "pixel_size_um": img.pixel_size_um,
                               "offset_um": list(a.shift_um), "score": round(a.score, 4),
                               "rejected": True})
            if log is not None:
                log.warning("em.realign.weak_fine_match", score=round(a.score, 3),
                            min_fine_score=params.min_fine_score)
            break
        if a.score < params.min_score:
            raise RealignError(f"target ({x:.2f}, {y:.2f}) um: map match score {a.score:.3f} "
                               f"under realign.min_score {params.min_score} at mag index "
                               f"{img.mag_index}: the neighbourhood does not look like the map")
        # the affines include the image shift, so every image measures the *whole* offset
        # between the map's frame and where the stage really is: each estimate replaces the
        # previous one, and their difference says how much the last iteration changed
        change = math.hypot(a.shift_um[0] - shift[0], a.shift_um[1] - shift[1])
        shift = a.shift_um
        moved_stage = math.hypot(*shift) > params.max_image_shift_um
        if moved_stage:     # too far for image shift: move the stage and measure again
            sx, sy, _ = em.stage_position()
            em.set_image_shift(0.0, 0.0)
            approach(em, sx + shift[0], sy + shift[1], from_um=params.approach_um, force=True)
            shift = (0.0, 0.0)
        else:
            em.set_image_shift(*shift)
        if i > 0:
            last = change
        iterations.append({"mag_index": img.mag_index, "pixel_size_um": img.pixel_size_um,
                           "offset_um": list(a.shift_um), "change_um": round(change, 5),
                           "score": round(a.score, 4), "stage_moved": moved_stage,
                           "search_widened": widened})
        if log is not None:
            log.info("em.realign.iteration", iteration=i, mag_index=img.mag_index,
                     offset_um=[round(v, 4) for v in a.shift_um], score=round(a.score, 3))
        if last is not None and not moved_stage and last < params.tolerance_um:
            break
    return RealignResult(target_um=(float(x), float(y)), stage_um=em.stage_position(),
                         image_shift_um=(float(shift[0]), float(shift[1])), residual_um=last,
                         iterations=iterations, dose_e_per_a2=dose)


def _on_window_edge(found_um: tuple[float, float], expect_um: tuple[float, float],
                    search_um: float, pixel_um: float) -> bool:
    """Whether a match found within ``search_um`` of ``expect_um`` lies on the search's rim
    (within 1.5 pixels of it): then it is no peak but the highest point of a slope."""
    d = math.hypot(found_um[0] - expect_um[0], found_um[1] - expect_um[1])
    return d >= search_um - 1.5 * pixel_um
