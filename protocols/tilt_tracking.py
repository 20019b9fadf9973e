"""Tracking during a tilt series: predict where the target goes, measure, re-centre.

Geometry (the tilt axis along unit vector u in the stage frame, v across it): a point whose
in-plane offset from the stage position is d and which sits dz above the tilt axis is seen at
image-plane offset ``(d.u) u + ((d.v) cos t + dz sin t) v``. The image shift that centres the
target therefore follows ``IS(t) = a u + (b cos t + c sin t) v`` with c the target's height
error: ``ShiftModel`` fits a, b, c (plus a small sin term along the axis for stage runout) to
the image shifts that centred the target at the tilts done so far, and predicts the next one.

Measuring: before each record, a Trial image (low-dose Trial area: beside the target on the
tilt axis, so the target is not exposed) is aligned to the Trial images of tilts already done,
each reference stretched across the axis by cos(t_new) / cos(t_ref) about the point where the
target was (protocols/em_align.py). The displacement found, plus the parallax of a target
``height_um`` above the film that the film features do not show, is added to the predicted
image shift.

Why more than one reference: aligning only to the previous tilt chains the alignments, so
their errors add up as a random walk (on one seed 9 nm at 0 deg grew to 56 nm at 60 deg). The
references are the nearest tilt in angle (most alike, best match) and an anchor on the same
side of zero, the tilt nearest to ``anchor_step_deg`` back towards 0 deg (0 deg itself for
the first ``anchor_step_deg``): the anchor's estimate does not carry the chain, so a weighted
mean of the two keeps the error bounded (each tilt inherits only a fraction of its
predecessor's error). Weights are the match scores squared; a match under the minimum score
counts for nothing, and two estimates that disagree by more than ``max_disagreement_um``
leave the anchor's (the chained one is the suspect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from drivers.base import Image
from protocols.em_align import Alignment, align_to_reference, stretch_across_axis

__all__ = ["DoneTilt", "Measurement", "ShiftModel", "axis_vectors", "combine", "nearest_done",
           "references", "track_to_reference"]

FloatArray = NDArray[np.float64]
#: Weight of the priors (um^2 per um^2 of parameter): enough to fix an unfitted parameter,
#: far too little to bend a fitted one.
PRIOR_WEIGHT = 1e-2


def axis_vectors(axis_deg: float) -> tuple[FloatArray, FloatArray]:
    """Unit vectors along (u) and across (v) the tilt axis, stage frame."""
    a = math.radians(axis_deg)
    return np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])


@dataclass(frozen=True)
class DoneTilt:
    """What tracking needs from a tilt already recorded (rebuilt from its committed result).

    ``image_shift_um``: the shift that centred the target (in the epoch the tilt was taken);
    ``trial_anchor_um``: stage point of the target's place in that tilt's trial image;
    ``epoch_offset_um``: image-shift offset of that epoch (a resumed series that had to
    realign again starts a new epoch).
    """

    angle_deg: float
    order: int
    image_shift_um: tuple[float, float]
    trial_anchor_um: tuple[float, float] | None
    epoch_offset_um: tuple[float, float]


@dataclass(frozen=True)
class ShiftModel:
    """IS(t) = (a + k sin t) u + (b cos t + c sin t) v, image shift in um, t the tilt."""

    axis_deg: float
    a: float
    k: float
    b: float
    c: float

    @classmethod
    def fit(cls, tilts_deg: Sequence[float], shifts_um: Sequence[Sequence[float]],
            axis_deg: float, height_prior_um: float = 0.0) -> ShiftModel:
        """Least squares with weak priors (k = 0, c = ``height_prior_um``), so one tilt
        already gives a usable model."""
        u, v = axis_vectors(axis_deg)
        t = np.radians(np.asarray(tilts_deg, float))
        s = np.asarray(shifts_um, float).reshape(-1, 2)
        su, sv = s @ u, s @ v
        w = math.sqrt(PRIOR_WEIGHT)
        if t.size == 0:
            return cls(axis_deg, 0.0, 0.0, 0.0, height_prior_um)
        # along: su = a + k sin t, prior k = 0
        a_mat = np.vstack([np.column_stack([np.ones_like(t), np.sin(t)]), [0.0, w]])
        (a, k), *_ = np.linalg.lstsq(a_mat, np.append(su, 0.0), rcond=None)
        # across: sv = b cos t + c sin t, prior c = height_prior
        b_mat = np.vstack([np.column_stack([np.cos(t), np.sin(t)]), [0.0, w]])
        (b, c), *_ = np.linalg.lstsq(b_mat, np.append(sv, w * height_prior_um), rcond=None)
        return cls(axis_deg, float(a), float(k), float(b), float(c))

    def predict(self, tilt_deg: float) -> FloatArray:
        u, v = axis_vectors(self.axis_deg)
        t = math.radians(tilt_deg)
        out: FloatArray = (self.a + self.k * math.sin(t)) * u + (
            self.b * math.cos(t) + self.c * math.sin(t)) * v
        return out

    @property
    def height_error_um(self) -> float:
        """The fitted height of the target above the tilt axis (um)."""
        return self.c


def nearest_done(done: Sequence[DoneTilt], angle_deg: float) -> DoneTilt | None:
    """The tilt already recorded closest in angle (ties: the most recent), or None."""
    usable = [d for d in done if d.trial_anchor_um is not None]
    if not usable:
        return None
    return min(usable, key=lambda d: (abs(d.angle_deg - angle_deg), -d.order))


def references(done: Sequence[DoneTilt], angle_deg: float,
               anchor_step_deg: float) -> list[DoneTilt]:
    """The tilts to align a new tilt to: the nearest done (first), then an anchor if it is a
    different tilt: on the same side of zero (0 deg belongs to both), the one nearest to
    ``|angle| - anchor_step_deg`` from zero (not past zero)."""
    nearest = nearest_done(done, angle_deg)
    if nearest is None:
        return []
    side = [d for d in done if d.trial_anchor_um is not None
            and (abs(d.angle_deg) < 1e-6 or d.angle_deg * angle_deg > 0)]
    aim = math.copysign(max(0.0, abs(angle_deg) - anchor_step_deg), angle_deg)
    if not side:
        return [nearest]
    anchor = min(side, key=lambda d: (abs(d.angle_deg - aim), d.order))
    return [nearest] if anchor.order == nearest.order else [nearest, anchor]


@dataclass(frozen=True)
class Measurement:
    """One reference's estimate of the image-shift change that centres the target (um)."""

    reference_deg: float
    delta_um: FloatArray
    score: float
    anchor: bool


def combine(measurements: Sequence[Measurement], *, min_score: float,
            max_disagreement_um: float) -> tuple[FloatArray | None, list[bool]]:
    """Score-squared weighted mean of the usable estimates, and which were used.

    None when no estimate reaches ``min_score`` (the prediction stands). When the nearest
    and the anchor both qualify but differ by more than ``max_disagreement_um``, only the
    anchor is used: the chained estimate carries every earlier error, the anchor's only the
    anchor's.
    """
    used = [m.score >= min_score for m in measurements]
    if sum(used) == 2:
        a, b = measurements
        if float(np.hypot(*(a.delta_um - b.delta_um))) > max_disagreement_um:
            used = [m.anchor for m in measurements]
    chosen = [m for m, u in zip(measurements, used, strict=True) if u]
    if not chosen:
        return None, used
    w = np.array([m.score ** 2 for m in chosen])
    out: FloatArray = np.sum([wi * m.delta_um for wi, m in zip(w, chosen, strict=True)],
                             axis=0) / float(w.sum())
    return out, used


def track_to_reference(reference: Image, ref: DoneTilt, trial: Image, angle_deg: float,
                       *, axis_deg: float, height_um: float, search_um: float,
                       epoch_offset_um: tuple[float, float]) -> tuple[Alignment, FloatArray]:
    """Align ``trial`` (taken at ``angle_deg``) to the reference tilt's trial image.

    Returns the alignment and the image-shift change (um) that centres the target: the
    measured displacement plus the parallax ``height_um (sin t - sin t_ref)`` across the axis.
    """
    factor = math.cos(math.radians(angle_deg)) / math.cos(math.radians(ref.angle_deg))
    h, w = trial.shape
    centre = trial.pixel_to_stage_xy(np.array([(w - 1) / 2.0, (h - 1) / 2.0]))
    assert ref.trial_anchor_um is not None
    # a new epoch moved every stage coordinate of the same specimen point by its offset change
    anchor = np.asarray(ref.trial_anchor_um) + (np.asarray(epoch_offset_um)
                                                 - np.asarray(ref.epoch_offset_um))
    a = align_to_reference(reference, trial, max_shift_um=search_um,
                           stretch=stretch_across_axis(axis_deg, factor), ref_anchor_um=anchor,
                           image_anchor_um=centre, smooth_px=2.0)
    _, v = axis_vectors(axis_deg)
    parallax = height_um * (math.sin(math.radians(angle_deg))
                            - math.sin(math.radians(ref.angle_deg))) * v
    return a, np.asarray(a.shift_um) + parallax
