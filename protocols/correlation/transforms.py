"""Transform models between two 2D frames, their leave-one-out error and predicted error.

Every transform here is a parametric mean (``similarity`` or ``affine``) plus, optionally,
a smooth residual field modelled as a Gaussian process (universal kriging). Why: freezing
and transfer bend a grid square by a few hundred nanometres, smoothly. A parametric model
alone cannot follow that, and worse, its error estimate does not know that the unmodelled
bend grows with the distance from the nearest bead. The kriging predictor

- follows the bend between beads and relaxes to the parametric model far from them,
- has a predicted variance that is small next to a bead and grows with the distance from
  the beads (and with extrapolation of the parametric part): the honest error at a target,
- is a *linear smoother* of the destination coordinates, ``theta = M @ y``, so the exact
  leave-one-out (LOO) residual and LOO predictive variance of every bead come in closed
  form from the bordered kriging matrix, without refitting.

The residual field's length scale and signal-to-noise ratio are chosen from the data by
LOO predictive log-density in model_selection.py (``signal_ratio`` = 0 is the plain
parametric model); the noise level is estimated here from the LOO residuals.
Coordinates are micrometres; internally they are centred and scaled for conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.errors import CorrelationInputError

ModelName = Literal["similarity", "affine"]
MODEL_NAMES: tuple[ModelName, ...] = ("similarity", "affine")
# Prior on the per-axis noise (um) with PRIOR_DOF pseudo-observations per axis: keeps sigma
# from collapsing to zero when a 3-bead similarity fit happens to be perfect. Weak, so that
# the residuals set the noise: 50 nm with 2 pseudo-observations made bead-image squares
# (localisation ~2 nm, residual scatter ~5-10 nm) predict 2x their true error, and changed
# which residual field won (median target error 17 nm against 12 nm now).
PRIOR_SIGMA_UM = 0.02
PRIOR_DOF = 1.0
# Similarity fits cannot see anisotropic scale when the beads are few or bunched; its
# predicted error adds this much error per um of distance from the beads' centroid.
SIMILARITY_MODEL_SD = 0.01

FloatArray = NDArray[np.float64]


def as_points(points: ArrayLike, name: str, min_count: int = 1) -> FloatArray:
    """Validate an (N, 2) array of finite coordinates; raise CorrelationInputError if not."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr.reshape(1, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CorrelationInputError(f"{name}: expected an (N, 2) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CorrelationInputError(f"{name}: contains NaN or infinite coordinates")
    if arr.shape[0] < min_count:
        raise CorrelationInputError(f"{name}: {arr.shape[0]} point(s), need at least {min_count}")
    return arr


def none_for_nan(values: FloatArray) -> list[Any]:
    """Nested list with None where a value is undefined (JSON has no NaN)."""
    out = np.asarray(values, dtype=object)
    out[~np.isfinite(np.asarray(values, dtype=np.float64))] = None
    result: list[Any] = out.tolist()
    return result


def _kernel(a: FloatArray, b: FloatArray, length: float) -> FloatArray:
    """Unit-variance squared-exponential covariance between rows of a and b."""
    r2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=2)
    return np.asarray(np.exp(-0.5 * r2 / length ** 2), np.float64)


def _mean_design(model: str, u: FloatArray, mirrored: bool) -> FloatArray:
    """Mean features with shape (n, 2, p) so that mapped point i = Phi[i] @ beta."""
    n = u.shape[0]
    x, y = u[:, 0], u[:, 1]
    one, zero = np.ones(n), np.zeros(n)
    if model == "similarity":
        if mirrored:  # [[a, b], [b, -a]]
            rows = ([x, y, one, zero], [-y, x, zero, one])
        else:  # [[a, -b], [b, a]]
            rows = ([x, -y, one, zero], [y, x, zero, one])
        return np.stack([np.stack(r, axis=1) for r in rows], axis=1)
    if model != "affine":
        raise CorrelationInputError(f"unknown transform model {model!r}; use one of {MODEL_NAMES}")
    phi = np.stack([x, y, one], axis=1)
    z = np.zeros_like(phi)
    return np.stack([np.concatenate([phi, z], 1), np.concatenate([z, phi], 1)], axis=1)


def features(model: str, u: FloatArray, mirrored: bool, centres: FloatArray, length: float,
            ratio: float) -> FloatArray:
    """Features (n, 2, p + 2k): mean part, then ``ratio * k(u, centre_j)`` per axis."""
    mean = _mean_design(model, u, mirrored)
    k = len(centres)
    if k == 0:
        return mean
    kern = ratio * _kernel(u, centres, length)  # (n, k)
    field_part = np.zeros((len(u), 2, 2 * k))
    field_part[:, 0, 0::2] = kern
    field_part[:, 1, 1::2] = kern
    return np.concatenate([mean, field_part], axis=2)


def rms_errors(residuals_um: FloatArray, loo_errors_um: FloatArray) -> dict[str, Any]:
    """RMS radial residual and LOO error (um) of a fit, as written to JSON (the LOO one
    over the beads where it is defined, None where it is nowhere)."""
    res = np.linalg.norm(residuals_um, axis=1)
    loo = np.linalg.norm(loo_errors_um, axis=1)
    finite = loo[np.isfinite(loo)]
    return {"rms_residual_um": float(np.sqrt(np.mean(res ** 2))) if res.size else 0.0,
            "rms_loo_error_um": float(np.sqrt(np.mean(finite ** 2))) if finite.size else None}


def parametric_matrix(model: str, mirrored: bool, theta: FloatArray, origin: FloatArray,
                       scale: float) -> FloatArray:
    """The mean part as a 2x3 affine matrix in original units.

    dst = A (p - o) / s + t  ->  (A / s) p + (t - A o / s).
    """
    feats = _mean_design(model, np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), mirrored)
    img = feats @ theta[:feats.shape[2]]
    lin = np.stack([img[1] - img[0], img[2] - img[0]], axis=1) / scale
    t = img[0] - lin @ origin
    return np.concatenate([lin, t[:, None]], axis=1)


@dataclass(frozen=True)
class Transform2D:
    """A fitted mapping from ``from_frame`` to ``to_frame`` with its error statistics.

    ``theta`` acts on source coordinates normalised as ``(p - origin) / scale``; ``matrix``
    is the parametric (affine) part in original micrometres, so a reader without this class
    still gets a usable first-order transform from the JSON. With ``signal_ratio`` > 0 a
    smooth residual field (Gaussian kernel of ``length`` normalised units centred on the
    fitted source points ``centres``) is added. ``pred_cov`` maps features to the predicted
    error covariance (in units of ``sigma_um^2``); ``sigma_um`` is the per-axis noise.
    Residuals and LOO errors are (n, 2) vectors in the destination frame, destination minus
    prediction; ``loo_sd_um`` is the LOO predictive RMS radial error of each bead.
    """

    model: ModelName
    from_frame: str
    to_frame: str
    mirrored: bool
    origin: FloatArray
    scale: float
    theta: FloatArray
    centres: FloatArray
    length: float
    signal_ratio: float
    pred_cov: FloatArray
    sigma_um: float
    residuals_um: FloatArray
    loo_errors_um: FloatArray
    loo_sd_um: FloatArray
    loo_lpd: float = float("-inf")
    matrix: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        matrix = parametric_matrix(self.model, self.mirrored, self.theta, self.origin,
                                    self.scale)
        object.__setattr__(self, "matrix", matrix)
        if self.model != "similarity":  # the mirror state is the sign of the linear part
            object.__setattr__(self, "mirrored", bool(np.linalg.det(matrix[:, :2]) < 0))

    @property
    def n_pairs(self) -> int:
        """Number of point pairs the fit used."""
        return int(self.residuals_um.shape[0])

    @property
    def length_um(self) -> float:
        """Length scale of the residual field in micrometres (0 without a field)."""
        return self.length * self.scale if self.signal_ratio > 0 else 0.0

    @property
    def field_sd_um(self) -> float:
        """Per-axis standard deviation of the residual field (um) far from any bead."""
        return float(self.sigma_um * np.sqrt(self.signal_ratio))

    def _features(self, points: ArrayLike) -> FloatArray:
        p = as_points(points, "points")
        return features(self.model, (p - self.origin) / self.scale, self.mirrored,
                       self.centres, self.length, self.signal_ratio)

    def apply(self, points: ArrayLike) -> FloatArray:
        """Map (N, 2) source points (um) into the destination frame (um)."""
        return self._features(points) @ self.theta

    def predicted_error(self, points: ArrayLike, *,
                        anisotropy_allowance: bool = True) -> FloatArray:
        """Predicted RMS radial error (um) of :meth:`apply` at each point.

        The kriging variance ``sigma^2 (2 ratio + trace(Phi C Phi^T))``: the uncertainty of
        the parametric part (grows outside the beads' hull) plus that of the residual
        field (near zero next to a bead, growing to the field's variance one length scale
        away), and for the similarity an allowance for anisotropic scale it cannot
        represent (``anisotropy_allowance``). It does not include the localisation error
        of the target itself, nor
        the uncertainty of the field's hyperparameters: model_selection.ModelChoice adds
        that, and it is what the correlation reports.
        """
        f = self._features(points)
        var = np.einsum("nip,pq,niq->n", f, self.pred_cov, f) + 2.0 * self.signal_ratio
        var = self.sigma_um ** 2 * np.maximum(var, 0.0)
        if self.model == "similarity" and anisotropy_allowance:
            dist = np.linalg.norm(np.asarray(points, float).reshape(-1, 2) - self.origin, axis=1)
            var = var + (SIMILARITY_MODEL_SD * dist) ** 2
        return np.asarray(np.sqrt(var), np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; :meth:`from_dict` restores an identical transform."""
        return {
            "model": self.model, "from_frame": self.from_frame, "to_frame": self.to_frame,
            "mirrored": self.mirrored, "matrix": self.matrix.tolist(),
            "residual_field": {"length_um": self.length_um, "sd_um": self.field_sd_um},
            "parameters": {"origin": self.origin.tolist(), "scale": self.scale,
                           "theta": self.theta.tolist(), "centres": self.centres.tolist(),
                           "length": self.length, "signal_ratio": self.signal_ratio},
            "pred_cov": self.pred_cov.tolist(), "sigma_um": self.sigma_um,
            "residuals_um": self.residuals_um.tolist(),
            "loo_errors_um": none_for_nan(self.loo_errors_um),
            "loo_sd_um": none_for_nan(self.loo_sd_um),
            "loo_log_density": self.loo_lpd if np.isfinite(self.loo_lpd) else None,
            **rms_errors(self.residuals_um, self.loo_errors_um),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transform2D:
        """Rebuild a transform written by :meth:`to_dict`."""
        def arr(v: Any) -> FloatArray:
            return np.array(v, dtype=object).astype(float)  # None (undefined LOO) -> nan

        try:
            par = data["parameters"]
            model = data["model"]
            if model not in MODEL_NAMES:
                raise CorrelationInputError(f"transform: unknown model {model!r}")
            return cls(
                model=model, from_frame=str(data["from_frame"]), to_frame=str(data["to_frame"]),
                mirrored=bool(data["mirrored"]), origin=np.asarray(par["origin"], float),
                scale=float(par["scale"]), theta=np.asarray(par["theta"], float),
                centres=np.asarray(par["centres"], float).reshape(-1, 2),
                length=float(par["length"]), signal_ratio=float(par["signal_ratio"]),
                pred_cov=np.asarray(data["pred_cov"], float), sigma_um=float(data["sigma_um"]),
                residuals_um=np.asarray(data["residuals_um"], float).reshape(-1, 2),
                loo_errors_um=arr(data["loo_errors_um"]).reshape(-1, 2),
                loo_sd_um=arr(data["loo_sd_um"]).reshape(-1),
                loo_lpd=float("-inf") if data.get("loo_log_density") is None
                else float(data["loo_log_density"]))
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CorrelationInputError):
                raise
            raise CorrelationInputError(f"transform: malformed JSON ({err})") from err


def _normalise(src: ArrayLike, dst: ArrayLike, model: str, need: int
               ) -> tuple[FloatArray, FloatArray, FloatArray, float, FloatArray]:
    s = as_points(src, "source points", 2)
    d = as_points(dst, "destination points", 2)
    if s.shape != d.shape:
        raise CorrelationInputError(f"source and destination differ in length: {len(s)} vs {len(d)}")
    if model not in MODEL_NAMES:
        raise CorrelationInputError(f"unknown transform model {model!r}; use one of {MODEL_NAMES}")
    if len(s) < need:
        raise CorrelationInputError(f"{model}: {len(s)} pair(s), need at least {need}")
    origin = s.mean(axis=0)
    scale = float(np.sqrt(np.mean(np.sum((s - origin) ** 2, axis=1))))
    if scale < 1e-9:
        raise CorrelationInputError("source points all coincide")
    u = (s - origin) / scale
    if model == "affine" and np.linalg.matrix_rank(
            np.concatenate([u, np.ones((len(u), 1))], 1), tol=1e-6) < 3:
        raise CorrelationInputError(f"{model}: source points are collinear")
    return s, d, origin, scale, u


def fit_transform(src: ArrayLike, dst: ArrayLike, model: ModelName, *,
                  mirrored: bool | None = None, field_length_um: float = 30.0,
                  field_ratio: float = 0.0, from_frame: str = "lm",
                  to_frame: str = "em") -> Transform2D:
    """Fit ``model`` (plus a residual field if ``field_ratio`` > 0) mapping src onto dst.

    Pairs are in row order. ``mirrored`` only matters for the similarity: None tries both
    and keeps the smaller residual. ``field_ratio`` is the field's variance over the noise
    variance (0: plain least squares); ``field_length_um`` its length scale. Raises
    CorrelationInputError for too few or degenerate points.
    """
    need = {"similarity": 2, "affine": 3}.get(model, 2)
    s, d, origin, scale, u = _normalise(src, dst, model, need)
    if model == "similarity" and mirrored is None:
        fits = [fit_transform(s, d, model, mirrored=mir, field_length_um=field_length_um,
                              field_ratio=field_ratio, from_frame=from_frame,
                              to_frame=to_frame) for mir in (False, True)]
        return min(fits, key=lambda t: float(np.sum(t.residuals_um ** 2)))
    mir = bool(mirrored) if model == "similarity" else False
    n = len(s)
    ratio = float(field_ratio)
    length = field_length_um / scale
    x = _mean_design(model, u, mir).reshape(2 * n, -1)
    p = x.shape[1]
    # Bordered kriging system [[ratio K (x) I2 + I, X], [X^T, 0]] in noise units.
    big = np.zeros((2 * n + p, 2 * n + p))
    big[:2 * n, :2 * n] = np.eye(2 * n)
    if ratio > 0:
        big[:2 * n, :2 * n] += ratio * np.kron(_kernel(u, u, length), np.eye(2))
    big[:2 * n, 2 * n:] = x
    big[2 * n:, :2 * n] = x.T
    try:
        inv = np.linalg.inv(big)
    except np.linalg.LinAlgError as err:
        raise CorrelationInputError(f"{model}: degenerate point configuration") from err
    y = d.reshape(-1)
    alpha = inv[:2 * n, :2 * n] @ y     # residuals in noise units: y - fit = alpha
    beta = inv[2 * n:, :2 * n] @ y
    # theta ordered as the features: [beta, ratio-weighted field coefficients].
    theta = np.concatenate([beta, alpha]) if ratio > 0 else beta
    resid = alpha.reshape(-1, 2)
    q = inv[:2 * n, :2 * n]
    loo = np.full((n, 2), np.nan)
    loo_cov = np.full((n, 2, 2), np.nan)
    quad, logdet, used = 0.0, 0.0, 0
    for i in range(n):
        sl = slice(2 * i, 2 * i + 2)
        qi = q[sl, sl]
        if np.linalg.cond(qi) > 1e9:  # the point fully determines its own fit
            continue
        cov_i = np.linalg.inv(qi)      # LOO predictive covariance, noise units
        loo[i] = cov_i @ alpha[sl]
        loo_cov[i] = cov_i
        quad += float(alpha[sl] @ loo[i])
        logdet += float(np.log(np.linalg.det(cov_i)))
        used += 1
    sigma2 = (quad + 2 * PRIOR_DOF * PRIOR_SIGMA_UM ** 2) / (2 * used + 2 * PRIOR_DOF)
    # Prediction covariance in noise units: -(A^-1) reordered as theta (beta first).
    order = np.concatenate([np.arange(2 * n, 2 * n + p), np.arange(2 * n)]) if ratio > 0 \
        else np.arange(2 * n, 2 * n + p)
    pred_cov = -inv[np.ix_(order, order)]
    loo_sd = np.sqrt(sigma2 * np.trace(loo_cov, axis1=1, axis2=2))
    lpd = (-0.5 * (quad / sigma2 + logdet + 2 * used * np.log(2 * np.pi * sigma2))
           if used else float("-inf"))
    return Transform2D(
        model=model, from_frame=from_frame, to_frame=to_frame, mirrored=mir,
        origin=origin, scale=scale, theta=theta,
        centres=u.copy() if ratio > 0 else np.zeros((0, 2)),
        length=length if ratio > 0 else 0.0, signal_ratio=ratio if ratio > 0 else 0.0,
        pred_cov=pred_cov, sigma_um=float(np.sqrt(sigma2)), residuals_um=resid,
        loo_errors_um=loo, loo_sd_um=loo_sd, loo_lpd=float(lpd))
