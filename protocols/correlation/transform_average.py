"""A weighted mean of transforms fitted to the same bead pairs: the map targets go through.

Why: with 5-20 beads, which mean (similarity or affine) and which residual field (length
scale, strength, or none) describe a square is poorly determined, and committing to the
one with the best leave-one-out score throws away what the others know. Their mean,
weighted by how well each predicted the left-out beads (model_selection.py), is the
prediction with the smallest expected squared error under those weights. Measured on the
geometry of an independent image generator (benchmarks/correlation_independent_images.py:
128 squares with >= 6 shared beads, true positions with 4-5 nm of localisation noise),
the median target error fell from 57 nm (best candidate alone) to 46 nm, the 95th
percentile from 235 to 215 nm, and the squares whose median target missed by over 150 nm
from 14 to 5; on this project's own point simulator (201 squares) it was unchanged
(35 nm, p95 148 nm).

Every candidate is a linear smoother of the destination coordinates fitted on the same
normalised source points, so the mean is exact and serialisable: a parametric part (the
weighted mean of the candidates' 2x3 matrices) plus each candidate's residual field with
its weight. The predicted error needs each candidate's kriging covariance and stays with
:class:`~protocols.correlation.model_selection.ModelChoice`; a transform read back from
JSON maps points but does not predict their error (OUT.json carries the targets' errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.transforms import (
    MODEL_NAMES,
    Transform2D,
    as_points,
    features,
    fit_transform,
    none_for_nan,
    parametric_matrix,
    rms_errors,
)

FloatArray = NDArray[np.float64]
# Candidates below this weight are left out of the mean (their share of any prediction
# is below a nanometre for maps that differ by less than a millimetre).
MIN_WEIGHT = 1e-6


@dataclass(frozen=True)
class AveragedPart:
    """One candidate of the mean: its model, coefficients, residual field and weight."""

    model: str
    mirrored: bool
    theta: FloatArray
    length: float          # normalised units (0 without a field)
    signal_ratio: float    # field variance over noise variance (0 without a field)
    weight: float
    length_um: float = 0.0
    field_sd_um: float = 0.0


@dataclass(frozen=True)
class AveragedTransform:
    """The weighted mean of candidate transforms sharing one source normalisation.

    ``residuals_um`` and ``loo_errors_um`` are the mean's (destination minus prediction,
    (n, 2), in the fitted pairs' order); a bead's LOO error is undefined (NaN) when any
    candidate's is. ``matrix`` is the parametric part in original micrometres.
    """

    from_frame: str
    to_frame: str
    mirrored: bool
    origin: FloatArray
    scale: float
    centres: FloatArray
    parts: tuple[AveragedPart, ...]
    residuals_um: FloatArray
    loo_errors_um: FloatArray
    matrix: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise CorrelationInputError("averaged transform: no candidates")
        m = sum(p.weight * parametric_matrix(p.model, p.mirrored, p.theta, self.origin,
                                              self.scale) for p in self.parts)
        object.__setattr__(self, "matrix", np.asarray(m, np.float64))

    @classmethod
    def of(cls, transforms: Sequence[Transform2D], weights: ArrayLike) -> AveragedTransform:
        """The mean of ``transforms`` (fitted to the same pairs) with ``weights``.

        Weights below ``MIN_WEIGHT`` of the total drop out; the rest are renormalised.
        Raises CorrelationInputError when the transforms were not fitted to the same
        source points or the weights do not fit them.
        """
        w = np.asarray(weights, np.float64).reshape(-1)
        if len(w) != len(transforms) or len(w) == 0 or not np.all(np.isfinite(w)) \
                or np.any(w < 0) or w.sum() <= 0:
            raise CorrelationInputError("averaged transform: need one finite, non-negative "
                                        "weight per transform, not all zero")
        w = w / w.sum()
        keep = [k for k in range(len(w)) if w[k] >= MIN_WEIGHT]
        ts = [transforms[k] for k in keep]
        w = w[keep] / w[keep].sum()
        first = ts[0]
        for t in ts[1:]:
            if (t.n_pairs != first.n_pairs or not np.allclose(t.origin, first.origin)
                    or not np.isclose(t.scale, first.scale)
                    or (t.from_frame, t.to_frame) != (first.from_frame, first.to_frame)):
                raise CorrelationInputError("averaged transform: candidates were fitted to "
                                            "different points")
        with_field = [t for t in ts if t.signal_ratio > 0]
        centres = with_field[0].centres if with_field else np.zeros((0, 2))
        parts = tuple(AveragedPart(t.model, t.mirrored, t.theta, t.length, t.signal_ratio,
                                   float(wk), t.length_um, t.field_sd_um)
                      for t, wk in zip(ts, w))
        resid = sum(wk * t.residuals_um for t, wk in zip(ts, w))
        loo = sum(wk * t.loo_errors_um for t, wk in zip(ts, w))
        return cls(first.from_frame, first.to_frame, first.mirrored, first.origin,
                   first.scale, centres, parts, np.asarray(resid, np.float64),
                   np.asarray(loo, np.float64))

    @property
    def n_pairs(self) -> int:
        """Number of point pairs the candidates were fitted to."""
        return int(self.residuals_um.shape[0])

    @property
    def field_weight(self) -> float:
        """Total weight of the candidates with a residual field."""
        return float(sum(p.weight for p in self.parts if p.signal_ratio > 0))

    @property
    def affine_weight(self) -> float:
        """Total weight of the candidates whose mean is an affine."""
        return float(sum(p.weight for p in self.parts if p.model == "affine"))

    def apply(self, points: ArrayLike) -> FloatArray:
        """Map (N, 2) source points (um) into the destination frame (um)."""
        u = (as_points(points, "points", 0) - self.origin) / self.scale
        out = np.zeros((len(u), 2))
        none = np.zeros((0, 2))
        for p in self.parts:
            centres = self.centres if p.signal_ratio > 0 else none
            out += p.weight * (features(p.model, u, p.mirrored, centres, p.length,
                                       p.signal_ratio) @ p.theta)
        return out

    def refit(self, src: ArrayLike, dst: ArrayLike) -> AveragedTransform:
        """The same candidates (models, fields, weights) fitted to other pairs.

        What the benchmarks' oracle needs: this model with the true correspondences.
        """
        fits = [fit_transform(src, dst, p.model, mirrored=p.mirrored,  # type: ignore[arg-type]
                              field_length_um=p.length_um or 30.0,
                              field_ratio=p.signal_ratio, from_frame=self.from_frame,
                              to_frame=self.to_frame) for p in self.parts]
        return AveragedTransform.of(fits, [p.weight for p in self.parts])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; :meth:`from_dict` restores a transform that maps alike."""
        return {
            "model": "averaged", "from_frame": self.from_frame, "to_frame": self.to_frame,
            "mirrored": self.mirrored, "matrix": self.matrix.tolist(),
            "affine_weight": self.affine_weight, "field_weight": self.field_weight,
            "parameters": {"origin": self.origin.tolist(), "scale": self.scale,
                           "centres": self.centres.tolist()},
            "components": [{"weight": p.weight, "model": p.model, "mirrored": p.mirrored,
                            "theta": p.theta.tolist(), "length": p.length,
                            "signal_ratio": p.signal_ratio,
                            "residual_field": {"length_um": p.length_um,
                                               "sd_um": p.field_sd_um}}
                           for p in self.parts],
            "residuals_um": self.residuals_um.tolist(),
            "loo_errors_um": none_for_nan(self.loo_errors_um),
            **rms_errors(self.residuals_um, self.loo_errors_um),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AveragedTransform:
        """Rebuild a transform written by :meth:`to_dict`."""
        try:
            if data["model"] != "averaged":
                raise CorrelationInputError(f"transform: model {data['model']!r} is not "
                                            "'averaged'")
            par = data["parameters"]
            parts = []
            for c in data["components"]:
                if c["model"] not in MODEL_NAMES:
                    raise CorrelationInputError(f"transform: unknown model {c['model']!r}")
                fld = c.get("residual_field") or {}
                parts.append(AveragedPart(
                    str(c["model"]), bool(c["mirrored"]), np.asarray(c["theta"], float),
                    float(c["length"]), float(c["signal_ratio"]), float(c["weight"]),
                    float(fld.get("length_um", 0.0)), float(fld.get("sd_um", 0.0))))
            loo = np.array(data["loo_errors_um"], dtype=object).astype(float)
            return cls(str(data["from_frame"]), str(data["to_frame"]),
                       bool(data["mirrored"]), np.asarray(par["origin"], float),
                       float(par["scale"]), np.asarray(par["centres"], float).reshape(-1, 2),
                       tuple(parts), np.asarray(data["residuals_um"], float).reshape(-1, 2),
                       loo.reshape(-1, 2))
        except (KeyError, TypeError, ValueError) as err:
            raise CorrelationInputError(f"transform: malformed JSON ({err})") from err
