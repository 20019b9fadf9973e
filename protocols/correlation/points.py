"""Point-set correlation end to end: match beads, choose a model, transfer targets.

This is the one place that chains :func:`match_points` (which pairs) with
:func:`choose_model` (which transforms, weighted by leave-one-out error, their mean and its
predicted error) so that the CLI, the bead and atlas pipelines and the session protocol all
get the same answer from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import ConvexHull, QhullError, cKDTree

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.matching import MatchConfig, MatchResult, MatchStatus, match_points
from protocols.correlation.model_selection import choose_model
from protocols.correlation.transform_average import AveragedTransform
from protocols.correlation.transforms import as_points, fit_transform

FloatArray = NDArray[np.float64]
# A pair whose error under a fit of the others exceeds both this floor (um) and
# OUTLIER_SIGMAS times those others' RMS residual is dropped before the final fit: a
# contamination spot that sat inside the matching radius of a bead missing in EM.
OUTLIER_FLOOR_UM = 0.3
OUTLIER_SIGMAS = 5.0
# Dropping stops at this many pairs: an affine on 4 pairs has 2 residual degrees of freedom
# and cannot tell a bad pair from distortion, so its error estimate would not be honest.
MIN_FIT_PAIRS = 5
# A target whose predicted RMS error exceeds this (um) is flagged unreliable (250 nm is
# where a 39,000x field of ~1 um stops containing the target reliably after realign).
MAX_TARGET_ERROR_UM = 0.25
# Beyond the matched beads' hull the error also comes from how the distortion continues
# where no bead can check it. The averaged kriging error (model_selection.py) tracks it on
# average, but its tail was thin there: over 8 x 120 simulated squares (seeds 1-3, 6-9 and
# the benchmark's; 0.1-0.5 um of bend across a 90 um square) 90% of true errors 30-100 um
# outside fell within 2x the prediction, against 96% inside. Adding, in quadrature, this
# much per um outside the hull brings every 10 um band to 95-96% within 2x (71-77% within
# 1x). The former 1% per um made predictions there 2-3x pessimistic and refused squares
# whose targets were within 100 nm. Re-measured after the matching and model-choice
# changes of session 3 (same 960 squares, scale now 0.9-1.1): 10-25 / 25-60 um outside,
# 82% / 81% within 1x, 98.6% / 97.6% within 2x; 0.3% per um already let one confidently
# wrong square through the gate, so the allowance stays.
EXTRAPOLATION_SD_PER_UM = 0.004
# Between the beads, too, a bend can hide from them: 5-8 beads over 70 um fit an affine to
# 30 nm while a bend of a 40-80 um wavelength moves a target 15-25 um from the nearest
# bead by 0.2-0.4 um. With fewer than INTERPOLATION_BELOW_PAIRS pairs nothing in the data
# can show it (a residual field is only chosen from model_selection.FIELD_BEST_FROM pairs,
# and weakly at first). On an independent image generator (benchmarks/
# correlation_independent_images.py, seeds 1 and 2, 45 accepted squares) only 88% of true
# errors fell within 2x the prediction, 78% with fewer than 7 pairs, 100% with 9 or more.
# Below that many pairs, this much per um of the distance to the nearest matched bead
# that the hull excess does not already count (a target straight out from the beads is
# not charged twice), in quadrature: 95.6% within 2x, no square newly refused; on the
# point benchmark (seeds 20240611 and 1-7, 443 accepted squares with >= 6 shared beads)
# 96.7% -> 97.6% within 2x, one square newly refused. For every square alike, 0.004 per um
# refused 4 there and made the simulated bead images 4x pessimistic (their 10 nm errors
# among 10-20 beads were predicted at 40-50 nm).
INTERPOLATION_SD_PER_UM = 0.003
INTERPOLATION_BELOW_PAIRS = 9
# A square's answer is refused when its median target's predicted RMS radial error exceeds
# this (um). With calibrated predictions the chance that a target with an RMS error of
# 0.15 um misses by more than 250 nm is about exp(-(0.25/0.15)^2) = 6% (at the former
# 0.3 um it was 50%). On the same 960 squares: 1 confidently wrong answer (0.31 um off),
# against 9 at 0.3 um; refusing costs a manual pick, a wrong answer a tilt series in the
# wrong place.
SQUARE_MAX_ERROR_UM = 0.15


@dataclass(frozen=True)
class PointCorrelation:
    """Result of :func:`correlate_points`.

    ``transform``, ``targets_um``, ``target_errors_um`` and ``target_reliable`` are None
    unless the beads matched; ``status`` is "ok" only if, in addition, the median target's
    predicted error is within the limit (``target_reliable`` flags each target). ``pairs``
    are (lm_index, em_index) rows used by the final fit, in the order of the transform's
    residuals and leave-one-out errors.
    """

    status: MatchStatus
    reason: str
    match: MatchResult
    pairs: NDArray[np.intp]
    transform: AveragedTransform | None
    targets_um: FloatArray | None
    target_errors_um: FloatArray | None
    target_reliable: NDArray[np.bool_] | None = None


def _out_of_family(src: FloatArray, dst: FloatArray, point: FloatArray, target: FloatArray,
                   mirrored: bool) -> tuple[float, float]:
    """Error (um) of one pair under a fit of the others, and that error in standard deviations.

    The others are fitted with each mean model they identify and the one that fits them
    most tightly (smallest residual scatter per degree of freedom) judges the pair: with a
    few % of anisotropy a similarity of a handful of beads leaves residuals of 0.5-1 um
    that hide a false pair, which the affine of the same beads exposes. The standard
    deviation is the fit's predictive one at the pair (leverage included), so a true bead
    at the edge of the others' hull is not taken for an outlier because the fit
    extrapolates there.
    """
    best: tuple[float, float, float] | None = None  # (scatter, error, ratio)
    for model in ("similarity", "affine"):
        try:
            t = fit_transform(src, dst, model, mirrored=mirrored)
        except CorrelationInputError:
            continue  # not identifiable without this pair
        dof = 2 * len(src) - t.theta.size
        if dof < 1:
            continue
        var = float(np.sum(t.residuals_um ** 2)) / dof  # per axis
        err = float(np.linalg.norm(t.apply(point)[0] - target))
        pred = t.predicted_error(point, anisotropy_allowance=False)[0] / max(t.sigma_um, 1e-9)
        sd = float(np.sqrt(var * (2.0 + pred ** 2)))
        if best is None or var < best[0]:
            best = (var, err, err / max(sd, 1e-3))
    return (0.0, 0.0) if best is None else (best[1], best[2])


def _drop_outliers(lm: FloatArray, em: FloatArray, pairs: NDArray[np.intp], mirrored: bool,
                   min_pairs: int) -> NDArray[np.intp]:
    """Remove, one at a time, pairs the others disagree with (at most 3).

    A pair is out of family when its error under a fit of the others
    (:func:`_out_of_family`) exceeds both ``OUTLIER_FLOOR_UM`` and ``OUTLIER_SIGMAS``
    predictive standard deviations. A false pair drags a fit of a handful of pairs and
    inflates everyone's leave-one-out error, so judging each pair against a fit made
    without it, and against the scatter of that fit, is what exposes it.
    """
    for _ in range(3):
        if len(pairs) <= min_pairs:
            return pairs
        worst, worst_ratio = -1, 0.0
        for j in range(len(pairs)):
            keep = np.arange(len(pairs)) != j
            err, ratio = _out_of_family(lm[pairs[keep, 0]], em[pairs[keep, 1]],
                                        lm[pairs[j, 0]], em[pairs[j, 1]], mirrored)
            if err > OUTLIER_FLOOR_UM and ratio > OUTLIER_SIGMAS and ratio > worst_ratio:
                worst, worst_ratio = j, ratio
        if worst < 0:
            return pairs
        pairs = np.delete(pairs, worst, axis=0)
    return pairs


def nearest_um(points: FloatArray, of: FloatArray) -> FloatArray:
    """Distance (um) from each point to the nearest of ``of``."""
    if len(points) == 0 or len(of) == 0:
        return np.zeros(len(points))
    return np.asarray(cKDTree(of).query(points, k=1)[0], np.float64)


def hull_excess_um(points: FloatArray, hull_of: FloatArray) -> FloatArray:
    """How far (um) each point lies outside the convex hull of ``hull_of`` (0 inside).

    With fewer than 3 points, or collinear ones, the distance to the nearest one.
    """
    if len(points) == 0:
        return np.zeros(0)
    nearest = nearest_um(points, hull_of)
    if len(hull_of) < 3:
        return np.asarray(nearest, np.float64)
    try:
        eq = ConvexHull(hull_of).equations
    except QhullError:
        return np.asarray(nearest, np.float64)
    return np.asarray(np.maximum(0.0, np.max(points @ eq[:, :2].T + eq[:, 2], axis=1)),
                      np.float64)


def _transfer_refusal(errors: FloatArray, outside: FloatArray) -> str:
    """Why the targets' transfer cannot be trusted as a whole ("" if it can)."""
    if len(errors) == 0:
        return ""
    med_err = float(np.median(errors))
    if med_err > SQUARE_MAX_ERROR_UM:
        return (f"the targets lie too far from them for the fit: median predicted error {med_err:.2f} um "
                f"> {SQUARE_MAX_ERROR_UM:g} um (median target {np.median(outside):.0f} um "
                "outside the matched beads)")
    return ""


def correlate_points(lm_um: ArrayLike, em_um: ArrayLike, targets_lm_um: ArrayLike | None = None,
                     *, lm_weights: ArrayLike | None = None, em_weights: ArrayLike | None = None,
                     prior: ArrayLike | None = None, config: MatchConfig | None = None,
                     max_target_error_um: float = MAX_TARGET_ERROR_UM,
                     from_frame: str = "lm", to_frame: str = "em") -> PointCorrelation:
    """Match LM and EM bead positions (um), fit the LOO-chosen model, map the targets.

    Targets are (K, 2) LM positions in the same frame as ``lm_um``; the result gives their
    EM positions and predicted RMS errors (um: averaged over the residual fields the beads
    support, plus the allowances for distortion between and beyond the matched beads), each flagged
    reliable when within ``max_target_error_um``. Raises CorrelationInputError for unusable
    input (see :func:`match_points`); an unmatchable pair of sets is a result, not an error.
    """
    lm = as_points(lm_um, "LM points", 2)
    em = as_points(em_um, "EM points", 2)
    targets = (np.zeros((0, 2)) if targets_lm_um is None
               else as_points(targets_lm_um, "targets", 0))
    cfg = config or MatchConfig()
    match = match_points(lm, em, lm_weights=lm_weights, em_weights=em_weights, prior=prior,
                         config=cfg)
    if match.status != "ok" or match.best is None:
        return PointCorrelation(match.status, match.reason, match, np.zeros((0, 2), np.intp),
                                None, None, None)
    mirrored = match.best.mirrored
    pairs = _drop_outliers(lm, em, match.pairs, mirrored, MIN_FIT_PAIRS)
    choice = choose_model(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored=mirrored,
                          from_frame=from_frame, to_frame=to_frame)
    transform = choice.transform
    mapped = transform.apply(targets) if len(targets) else np.zeros((0, 2))
    outside = hull_excess_um(targets, lm[pairs[:, 0]])
    between = (np.maximum(nearest_um(targets, lm[pairs[:, 0]]) - outside, 0.0)
               if len(pairs) < INTERPOLATION_BELOW_PAIRS else np.zeros(len(targets)))
    errors = np.sqrt(choice.predicted_error(targets) ** 2
                     + (EXTRAPOLATION_SD_PER_UM * outside) ** 2
                     + (INTERPOLATION_SD_PER_UM * between) ** 2)
    reliable = errors <= max_target_error_um
    refusal = _transfer_refusal(errors, outside)
    if refusal:
        return PointCorrelation("no_confident_match", f"beads matched ({match.reason}) but "
                                f"{refusal}", match, pairs, transform, mapped, errors, reliable)
    return PointCorrelation("ok", match.reason, match, pairs, transform, mapped, errors,
                            reliable)
