"""Weighing transforms by leave-one-out error, their mean, and the predicted error of it.

Why a module of its own: fitting one kriging transform (transforms.py) is mechanics; which
mean (similarity or affine) and which residual field to trust, and how unsure that choice
leaves us at a target, is judgement made from the same few beads.

Targets go through the candidates' weighted mean (transform_average.py); the single best
candidate is kept as the centre of the predicted error (see
:meth:`ModelChoice.predicted_error`) and as what :func:`select_model` returns.

The predicted error at a target averages over the residual-field hyperparameters (length
scale, signal ratio, and no field at all) that the beads support, each weighted by its
leave-one-out predictive density (pseudo Bayesian model averaging). Why: with 5-20 beads the
hyperparameters are poorly determined, and the best one alone is over-confident exactly
where its choice matters most, far from the beads. Measured on 8 x 120 simulated squares
(benchmarks/correlation.py, seeds 6-13): with the best hyperparameters alone 63% / 94% of
true errors fell within 1x / 2x the predicted RMS error (57% / 93% for targets more than
30 um outside the matched beads); averaged, 73% / 97%. With the weaker noise prior of
transforms.py, the misfit term below and points.py's allowance beyond the beads' hull
(where the tail was still thin): 73% / 96% on 960 squares, every 10 um band of distance
outside the beads within 71-77% / 95-96%; on the simulated bead images 79% / 97% (median
true/predicted 0.55, was 0.46 with 79% / 96%). For a 2D Gaussian error the fractions
within 1x / 2x its RMS are 63% / 98%: the 2x tail, which the transfer gate relies on, is
right; the bulk is up to 1.5x pessimistic on images, whose errors are heavier-tailed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.transform_average import MIN_WEIGHT, AveragedTransform
from protocols.correlation.transforms import (
    MODEL_NAMES,
    ModelName,
    Transform2D,
    as_points,
    fit_transform,
)

FloatArray = NDArray[np.float64]
# Fewest pairs for which a model is *considered* during selection (its LOO must be defined
# and not pure extrapolation noise). Fitting itself needs 2 / 3.
# An affine of 4 pairs keeps 2 degrees of freedom for its noise estimate, which can then be
# 4x too small: on an independent image generator (seed 100059: 4 beads, 1.9% anisotropy)
# it predicted 80-300 nm for targets 190-660 nm off and was accepted. The similarity with
# its anisotropy allowance predicted 220-500 nm and refused. No benchmark square with >= 6
# shared beads changed; 2 of 22 accepted squares with fewer were then refused.
MIN_PAIRS: dict[str, int] = {"similarity": 3, "affine": 5}
MIN_PAIRS_FIELD = 6
# Below this many pairs the best candidate (the predicted error's centre) is the
# parametric mean without a field. Six or seven beads cannot pin down a field's length
# scale; on an independent image generator (benchmarks/correlation_independent_images.py,
# seed 100053: 6 beads, bend with 1-3% strain changes) the LOO-preferred field (60 um,
# ratio 1000) interpolated targets 90-310 nm off while predicting 25-55 nm; the affine was
# 56-148 nm off and its averaged prediction (100-200 nm) refused the square. On 960
# benchmark squares this changed no answer at the 0.15 um gate. (The targets' map, the
# weighted mean of every candidate, does weigh the fields from MIN_PAIRS_FIELD pairs.)
FIELD_BEST_FROM = 8
# Residual-field hyperparameters tried: length scales (um) and signal/noise variance ratios.
FIELD_LENGTHS_UM = (15.0, 30.0, 60.0)
FIELD_RATIOS = (1.0, 10.0, 100.0, 1000.0)
# A richer mean must lower the LOO RMS below this fraction of the simpler one's...
SELECTION_GAIN = 0.85
# ...except the affine from AFFINE_DEFAULT_FROM pairs, which only must not be much worse.
AFFINE_DEFAULT_FROM = 6
AFFINE_DEFAULT_GAIN = 1.15


def loo_rms(t: Transform2D) -> float:
    """RMS leave-one-out error (um); infinite when any point is undetermined without itself."""
    loo = t.loo_errors_um
    if loo.size == 0 or not np.all(np.isfinite(loo)):
        return float("inf")
    return float(np.sqrt(np.mean(np.sum(loo ** 2, axis=1))))


def loo_log_density(t: Transform2D) -> float:
    """Sum over beads of the LOO predictive log-density (nats); higher is better.

    Scores both the LOO errors and how well the predicted spread matches them, which is
    what choosing the residual field needs (an over-confident field loses here).
    """
    if not np.all(np.isfinite(t.loo_errors_um)):
        return float("-inf")
    return t.loo_lpd


@dataclass(frozen=True)
class ModelChoice:
    """The candidate transforms the beads support, their weights, and their mean.

    ``candidates`` share ``best``'s mirror state and differ in the residual field (none,
    or each one tried) and, when ``best`` is a similarity that an affine could replace, in
    the mean (from ``AFFINE_DEFAULT_FROM`` pairs); ``best`` is one of them. ``weights``
    (summing to 1) are their normalised LOO predictive densities. ``transform`` is their
    weighted mean (transform_average.py): the map targets go through. ``best`` is the
    single candidate :func:`select_model` returns.
    """

    best: Transform2D
    candidates: tuple[Transform2D, ...]
    weights: FloatArray
    transform: AveragedTransform = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "transform",
                           AveragedTransform.of(self.candidates, self.weights))

    def apply(self, points: ArrayLike) -> FloatArray:
        """Map (N, 2) source points (um) through the candidates' weighted mean."""
        return self.transform.apply(points)

    @property
    def anisotropy_allowance(self) -> bool:
        """Whether similarity candidates add their fixed anisotropy allowance.

        Only when no affine alternative is in the mixture (fewer than
        ``AFFINE_DEFAULT_FROM`` pairs): otherwise the spread between the similarity's and
        the affine's predictions measures the anisotropy from the beads themselves. With
        4-5 pairs the affine's LOO is too weak to weigh (a simulated square of 4 bunched
        beads gave the affine 1e-6 of the weight and targets 36 um out 0.3-1.2 um off).
        """
        return all(c.model == "similarity" for c in self.candidates)

    def predicted_error(self, points: ArrayLike) -> FloatArray:
        """Predicted RMS radial error (um) of :meth:`apply` at each point.

        The mixture's second moment about ``best``'s prediction: each candidate's own
        error plus the squared distance between its prediction and ``best``'s. About
        ``best`` rather than about the mean that :meth:`apply` returns, which would be
        smaller by the squared distance between the two: the weights come from the LOO
        errors of a handful of beads and are themselves unsure, and how far the single
        best-scoring candidate lies from the mean measures that. Measured on 641
        squares of an independent generator's geometry (>= 6 beads): about the mean,
        24 more squares passed the transfer gate and 4 were confidently wrong (2 on its
        image benchmark, seed 1); about ``best``, the same squares as with ``best``
        alone passed, 4 wrong against 6.

        Every candidate also counts its residual scatter (2 sigma^2) at the target. One
        without a residual field cannot tell localisation noise from distortion it does
        not follow, and distortion is as large at a target as at a bead (on the simulated
        bead images, where localisation is ~2 nm and the scatter is distortion, this term
        keeps 5-bead squares from being 2-4x over-confident). A field candidate cannot
        either: what its field leaves is distortion finer than it follows between the
        beads as well as localisation, and a target is itself localised in the LM as a
        bead is. Counted for candidates without a field only, an independent generator's
        square (benchmarks/correlation_independent_images.py --wide, 1100084: 8 beads,
        scatter 83-101 nm per axis) had its targets predicted at 94-100 nm and 111-355 nm
        off, and was accepted; counted for all, 152-155 nm, refused. Over 7 x 60 of those
        squares, >= 6 shared beads: correct 153 -> 149, confidently wrong 2 -> 1; on
        the point benchmark's 960 squares 442 -> 439 of 470 correct, 0 wrong either way.
        """
        p = as_points(points, "points", 0)
        if len(p) == 0:
            return np.zeros(0)
        centre = self.best.apply(p)
        allowance = self.anisotropy_allowance
        var = np.zeros(len(p))
        for w, c in zip(self.weights, self.candidates):
            if w < MIN_WEIGHT:
                continue
            own = (c.predicted_error(p, anisotropy_allowance=allowance) ** 2
                   + 2.0 * c.sigma_um ** 2)
            var += w * (own + np.sum((c.apply(p) - centre) ** 2, axis=1))
        return np.asarray(np.sqrt(var), np.float64)


def _field_candidates(t: Transform2D, src: FloatArray, dst: FloatArray) -> list[Transform2D]:
    """``t``'s mean with every residual field tried, and without one (first)."""
    out = [t]
    if len(src) < MIN_PAIRS_FIELD:
        return out
    for length in FIELD_LENGTHS_UM:
        for ratio in FIELD_RATIOS:
            out.append(fit_transform(src, dst, t.model, mirrored=t.mirrored,
                                     field_length_um=length, field_ratio=ratio,
                                     from_frame=t.from_frame, to_frame=t.to_frame))
    return out


def _choose_mean(s: FloatArray, d: FloatArray, mirrored: bool | None,
                 models: tuple[ModelName, ...], from_frame: str, to_frame: str) -> Transform2D:
    """The parametric mean LOO error supports (see :func:`select_model`)."""
    fits: dict[str, Transform2D] = {}
    for model in MODEL_NAMES:
        if model not in models or len(s) < MIN_PAIRS[model]:
            continue
        try:
            fits[model] = fit_transform(s, d, model, mirrored=mirrored,
                                        from_frame=from_frame, to_frame=to_frame)
        except CorrelationInputError:
            continue  # e.g. collinear points: this model is not identifiable here
    best: Transform2D | None = fits.get("similarity")
    aff = fits.get("affine")
    if aff is not None:
        gain = AFFINE_DEFAULT_GAIN if len(s) >= AFFINE_DEFAULT_FROM else SELECTION_GAIN
        if best is None or loo_rms(aff) < gain * loo_rms(best):
            best = aff
    if best is None:
        return fit_transform(s, d, "similarity", mirrored=mirrored,
                             from_frame=from_frame, to_frame=to_frame)
    return best


def choose_model(src: ArrayLike, dst: ArrayLike, *, mirrored: bool | None = None,
                 models: tuple[ModelName, ...] = MODEL_NAMES, use_field: bool = True,
                 from_frame: str = "lm", to_frame: str = "em") -> ModelChoice:
    """:func:`select_model`, keeping the alternatives, their weights and their mean.

    From ``FIELD_BEST_FROM`` pairs the best transform is the mean plus the residual field
    with the highest LOO log-density (always a field: the LOO density cannot rule one out
    reliably, and a weak field costs little); from ``MIN_PAIRS_FIELD`` pairs the
    candidates are all fields tried and none, and the affine's too when the similarity
    was chosen (see the module docstring). ``transform`` of the result, their weighted
    mean, is the map targets go through.
    """
    s = as_points(src, "source points", 2)
    d = as_points(dst, "destination points", 2)
    mean = _choose_mean(s, d, mirrored, models, from_frame, to_frame)
    if not use_field:
        return ModelChoice(mean, (mean,), np.ones(1))
    cands = _field_candidates(mean, s, d)
    scores = np.array([loo_log_density(c) for c in cands])
    best = mean
    if len(s) >= FIELD_BEST_FROM and len(cands) > 1 and np.any(np.isfinite(scores[1:])):
        best = cands[1 + int(np.argmax(scores[1:]))]
    if mean.model == "similarity" and "affine" in models and len(s) >= AFFINE_DEFAULT_FROM:
        try:
            alt = fit_transform(s, d, "affine", from_frame=from_frame, to_frame=to_frame)
        except CorrelationInputError:
            alt = None  # collinear: no affine alternative to weigh
        if alt is not None and alt.mirrored == mean.mirrored:
            more = _field_candidates(alt, s, d)
            cands += more
            scores = np.concatenate([scores, [loo_log_density(c) for c in more]])
    finite = np.isfinite(scores)
    if not np.any(finite):
        return ModelChoice(best, (best,), np.ones(1))
    w = np.where(finite, np.exp(np.where(finite, scores, 0.0) - np.max(scores[finite])), 0.0)
    return ModelChoice(best, tuple(cands), np.asarray(w / w.sum(), np.float64))


def select_model(src: ArrayLike, dst: ArrayLike, *, mirrored: bool | None = None,
                 models: tuple[ModelName, ...] = MODEL_NAMES, use_field: bool = True,
                 from_frame: str = "lm", to_frame: str = "em") -> Transform2D:
    """Fit the candidate models and keep the one leave-one-out error supports.

    The mean: the affine replaces the similarity only if its LOO RMS is below
    ``SELECTION_GAIN`` times the similarity's; from ``AFFINE_DEFAULT_FROM`` pairs the affine
    is the default unless the similarity's LOO is clearly better (anisotropic scale is the
    rule between two microscopes). Then, from ``FIELD_BEST_FROM`` pairs, the residual field
    with the best LOO log-density is added. Models with fewer pairs than ``MIN_PAIRS`` are
    skipped; with fewer than 3 pairs the similarity is returned without a LOO check.
    Raises CorrelationInputError for fewer than 2 pairs or bad coordinates.
    """
    return choose_model(src, dst, mirrored=mirrored, models=models, use_field=use_field,
                        from_frame=from_frame, to_frame=to_frame).best
