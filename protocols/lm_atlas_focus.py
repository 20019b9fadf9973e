"""Focus for the LM atlas: the focus map's points and plane, and an autofocus whose frame
scores are computed while the focus drive moves to the next plane.

Why a plane: the grid's film is flat on the scale of the grid but the dish is tilted by a few
um over 3 mm, more than the ~1 um depth of field of a 20x/0.75, so a few autofocus points
(centre and a ring) are fitted with a plane and tiles are imaged at the plane's z.

Why a pipelined autofocus: the contract's software autofocus (``LightMicroscope.autofocus``)
scores each frame (variance of the Laplacian, ~15 ms for a 1024 x 1024 frame) between the
frame and the next focus move, which over the focus map's ~50 frames is as long as the
atlas's whole compute budget. ``autofocus`` here runs the same search (same planes, the same
score to rounding, same refinement) with the scores computed in the atlas's compute lane; a
backend with its own autofocus (a hardware focus device) is called as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import cv2
import numpy as np
from numpy.typing import NDArray

from drivers.base import LightMicroscope, focus_peak
from protocols.compute_lane import ComputeLane

if TYPE_CHECKING:
    from protocols.lm_atlas import LMAtlasParams

__all__ = ["FocusPlaneFit", "autofocus", "fit_focus_plane", "focus_points", "focus_score",
           "focus_search"]


@dataclass(frozen=True)
class FocusPlaneFit:
    """Focus z = z0 + sx * x + sy * y (stage um); points used and their worst residual."""

    z0_um: float
    slope: tuple[float, float]
    used: tuple[int, ...]
    max_residual_um: float

    def z_at(self, x_um: float, y_um: float) -> float:
        return self.z0_um + self.slope[0] * x_um + self.slope[1] * y_um


def focus_points(centre_um: tuple[float, float], diameter_um: float, n: int,
                 ring_fraction: float) -> list[tuple[float, float]]:
    """The centre and ``n - 1`` points on a ring at ``ring_fraction`` of the radius."""
    r = ring_fraction * diameter_um / 2
    pts = [(float(centre_um[0]), float(centre_um[1]))]
    for k in range(n - 1):
        a = 2 * math.pi * k / (n - 1) + math.pi / 4
        pts.append((float(centre_um[0] + r * math.cos(a)), float(centre_um[1] + r * math.sin(a))))
    return pts


def fit_focus_plane(xyz: NDArray[np.float64], max_residual_um: float) -> FocusPlaneFit:
    """Least-squares plane through (x, y, z) focus points, dropping the worst point while
    its residual exceeds ``max_residual_um`` and more than three points remain (an autofocus
    that locked onto dirt or a bar edge far from the film)."""
    keep = list(range(len(xyz)))
    while True:
        p = xyz[keep]
        a = np.column_stack([np.ones(len(p)), p[:, 0], p[:, 1]])
        coef, *_ = np.linalg.lstsq(a, p[:, 2], rcond=None)
        res = np.abs(a @ coef - p[:, 2])
        worst = int(np.argmax(res))
        if res[worst] <= max_residual_um or len(keep) <= 3:
            return FocusPlaneFit(float(coef[0]), (float(coef[1]), float(coef[2])),
                                 tuple(keep), float(res.max()))
        keep.pop(worst)


def focus_score(data: NDArray[np.generic]) -> float:
    """``drivers.base.sharpness`` (variance of the 4-neighbour Laplacian over the interior,
    over the squared mean), computed with OpenCV: equal to it up to rounding, three times
    faster on a 1024 x 1024 frame and without holding the GIL, so the last frame's score, which
    the search waits for, is short."""
    a = np.asarray(data, dtype=np.float64)
    lap = cv2.Laplacian(a, cv2.CV_64F, ksize=1)[1:-1, 1:-1]
    _, std = cv2.meanStdDev(lap)
    mean = float(cv2.mean(a)[0]) or 1.0
    return float(std[0, 0] ** 2 / (mean * mean))


def autofocus(lm: LightMicroscope, range_um: float, step_um: float, lane: ComputeLane) -> float:
    """``lm.autofocus(range_um, step_um)`` with frame scores computed in ``lane``.

    The search is the contract's (LightMicroscope.autofocus): planes over +-range/2 around
    the current z within the z limits, the sharpest one refined by a parabola through it and
    its neighbours, focus left there. A backend that overrides ``autofocus`` (a hardware
    focus device) is called instead. Raises LimitViolation when no plane lies within limits.
    """
    if type(lm).autofocus is not LightMicroscope.autofocus:
        return lm.autofocus(range_um, step_um)
    zs = lm.focus_planes(range_um, step_um)
    jobs = []
    for z in zs:
        lm.move_z(float(z))
        jobs.append(lane.submit(partial(focus_score, lm.snap().data), "focus score"))
    best = focus_peak(zs, [job.result() for job in jobs], step_um)
    lm.move_z(best)
    return best


def focus_search(lm: LightMicroscope, p: LMAtlasParams, start_z: float, wide: bool,
                 lane: ComputeLane) -> float:
    """The atlas's focus at the current place: a coarse search (if ``wide``) then a fine one,
    both on ``p.focus_channel``, starting at ``start_z``."""
    lm.set_channel(p.focus_channel)
    lm.move_z(start_z)
    if wide:
        autofocus(lm, p.search_range_um, p.search_step_um, lane)
    return autofocus(lm, p.refine_range_um, p.refine_step_um, lane)
