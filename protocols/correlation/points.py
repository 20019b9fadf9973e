"""Point-set correlation end to end: match beads, choose a model, transfer targets.

This is the one place that chains :func:`match_points` (which pairs) with
:func:`select_model` (which transform, by leave-one-out error) so that the CLI, the bead
and atlas pipelines and the session protocol all get the same answer from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.matching import MatchConfig, MatchResult, MatchStatus, match_points
from protocols.correlation.transforms import Transform2D, as_points, select_model

FloatArray = NDArray[np.float64]
# A pair whose leave-one-out error exceeds both this floor (um) and OUTLIER_SIGMAS robust
# standard deviations is dropped once before the final fit: a contamination spot that sat
# inside the matching radius of a bead missing in EM.
OUTLIER_FLOOR_UM = 0.3
OUTLIER_SIGMAS = 5.0


@dataclass(frozen=True)
class PointCorrelation:
    """Result of :func:`correlate_points`.

    ``transform``, ``targets_um`` and ``target_errors_um`` are None unless ``status`` is
    "ok". ``pairs`` are (lm_index, em_index) rows used by the final fit, in the order of the
    transform's residuals and leave-one-out errors.
    """

    status: MatchStatus
    reason: str
    match: MatchResult
    pairs: NDArray[np.intp]
    transform: Transform2D | None
    targets_um: FloatArray | None
    target_errors_um: FloatArray | None


def _drop_outliers(lm: FloatArray, em: FloatArray, pairs: NDArray[np.intp], mirrored: bool,
                   min_pairs: int) -> NDArray[np.intp]:
    """Remove, one at a time, pairs whose LOO error is far out of family (at most 3)."""
    for _ in range(3):
        if len(pairs) <= min_pairs:
            return pairs
        t = select_model(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored=mirrored)
        loo = np.linalg.norm(t.loo_errors_um, axis=1)
        if not np.all(np.isfinite(loo)):
            return pairs
        scale = 1.4826 * float(np.median(loo))
        worst = int(np.argmax(loo))
        if loo[worst] <= max(OUTLIER_FLOOR_UM, OUTLIER_SIGMAS * scale):
            return pairs
        pairs = np.delete(pairs, worst, axis=0)
    return pairs


def correlate_points(lm_um: ArrayLike, em_um: ArrayLike, targets_lm_um: ArrayLike | None = None,
                     *, lm_weights: ArrayLike | None = None, em_weights: ArrayLike | None = None,
                     prior: ArrayLike | None = None, config: MatchConfig | None = None,
                     from_frame: str = "lm", to_frame: str = "em") -> PointCorrelation:
    """Match LM and EM bead positions (um), fit the LOO-chosen model, map the targets.

    Targets are (K, 2) LM positions in the same frame as ``lm_um``; the result gives their
    EM positions and predicted RMS errors (um). Raises CorrelationInputError for unusable
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
    pairs = _drop_outliers(lm, em, match.pairs, mirrored, cfg.min_inliers)
    transform = select_model(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored=mirrored,
                             from_frame=from_frame, to_frame=to_frame)
    mapped = transform.apply(targets) if len(targets) else np.zeros((0, 2))
    errors = transform.predicted_error(targets) if len(targets) else np.zeros(0)
    return PointCorrelation("ok", match.reason, match, pairs, transform, mapped, errors)
