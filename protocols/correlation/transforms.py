"""Transform models between two 2D frames, their leave-one-out error and predicted error.

Every model here is a *linear smoother* of the destination coordinates: the parameters are
``theta = M @ y`` for a fixed matrix ``M`` once the source points (and, for the similarity,
the mirror state) are known. That one fact gives, in closed form and without refitting,

- the leave-one-out (LOO) residual of every point, ``(I - H_ii)^-1 e_i`` with ``H = X M``
  (exact for least squares and for the penalised thin-plate spline),
- the covariance of the parameters, ``sigma^2 M M^T``, hence the covariance of a
  transferred target anywhere, which is what makes the predicted error honest far from the
  beads (extrapolation) and small between them.

Models: ``similarity`` (rotation, isotropic scale, shift; mirror as a flag), ``affine`` and
``tps`` (affine plus a regularised thin-plate spline residual). :func:`select_model` picks
one by LOO error, preferring the simpler model unless the richer one clearly helps.
Coordinates are micrometres; internally they are centred and scaled for conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.errors import CorrelationInputError

ModelName = Literal["similarity", "affine", "tps"]
MODEL_NAMES: tuple[ModelName, ...] = ("similarity", "affine", "tps")
# Fewest pairs for which a model is *considered* during selection (its LOO must be defined
# and not pure extrapolation noise). Fitting itself needs 2 / 3 / 4.
MIN_PAIRS: dict[str, int] = {"similarity": 3, "affine": 4, "tps": 7}
# Prior on the per-axis residual noise (um) with PRIOR_DOF pseudo-observations: keeps sigma
# from collapsing to zero when a 3-bead similarity fit happens to be perfect.
PRIOR_SIGMA_UM = 0.05
PRIOR_DOF = 2.0
TPS_LAMBDAS = (1e-3, 1e-2, 1e-1)
# A richer model must lower the LOO RMS below this fraction of the simpler one's...
SELECTION_GAIN = 0.85
# ...except the affine from AFFINE_DEFAULT_FROM pairs, which only must not be much worse.
AFFINE_DEFAULT_FROM = 6
AFFINE_DEFAULT_GAIN = 1.15
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


def _tps_kernel(a: FloatArray, b: FloatArray) -> FloatArray:
    """U(r) = r^2 log r between rows of a and b (U(0) = 0)."""
    r2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 0.5 * r2 * np.log(r2)
    k[r2 <= 0.0] = 0.0
    return k


def _design(model: str, u: FloatArray, mirrored: bool, centres: FloatArray) -> FloatArray:
    """Features Phi with shape (n, 2, p) so that mapped point i = Phi[i] @ theta."""
    n = u.shape[0]
    x, y = u[:, 0], u[:, 1]
    one, zero = np.ones(n), np.zeros(n)
    if model == "similarity":
        if mirrored:  # [[a, b], [b, -a]]
            rows = ([x, y, one, zero], [-y, x, zero, one])
        else:  # [[a, -b], [b, a]]
            rows = ([x, -y, one, zero], [y, x, zero, one])
        return np.stack([np.stack(r, axis=1) for r in rows], axis=1)
    if model == "affine":
        phi = np.stack([x, y, one], axis=1)
    elif model == "tps":
        phi = np.concatenate([_tps_kernel(u, centres), np.stack([one, x, y], axis=1)], axis=1)
    else:
        raise CorrelationInputError(f"unknown transform model {model!r}; use one of {MODEL_NAMES}")
    z = np.zeros_like(phi)
    return np.stack([np.concatenate([phi, z], 1), np.concatenate([z, phi], 1)], axis=1)


@dataclass(frozen=True)
class Transform2D:
    """A fitted mapping from ``from_frame`` to ``to_frame`` with its error statistics.

    ``theta`` acts on source coordinates normalised as ``(p - origin) / scale``; ``matrix``
    is the affine part in original micrometres (for ``tps`` the spline's affine part), so a
    reader without this class still gets a usable first-order transform from the JSON.
    ``param_cov`` is the covariance of ``theta``; ``bias_um`` is the model-misfit error that
    leave-one-out errors show beyond noise. Residuals and LOO errors are (n, 2) vectors in
    the destination frame, destination minus prediction.
    """

    model: ModelName
    from_frame: str
    to_frame: str
    mirrored: bool
    origin: FloatArray
    scale: float
    theta: FloatArray
    centres: FloatArray
    param_cov: FloatArray
    sigma_um: float
    bias_um: float
    residuals_um: FloatArray
    loo_errors_um: FloatArray
    smoothing: float = 0.0
    matrix: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        # Affine part in original units: dst = A (p - o)/s + t  ->  (A/s) p + (t - A o / s)
        feats = _design(self.model, np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
                        self.mirrored, self.centres)
        if self.model == "tps":  # drop kernel terms: only the affine part goes in ``matrix``
            k = self.centres.shape[0]
            keep = np.ones(self.theta.size, dtype=bool)
            keep[:k] = False
            keep[k + 3:2 * k + 3] = False
            theta = np.where(keep, self.theta, 0.0)
        else:
            theta = self.theta
        img = feats @ theta
        lin = np.stack([img[1] - img[0], img[2] - img[0]], axis=1) / self.scale
        t = img[0] - lin @ self.origin
        object.__setattr__(self, "matrix", np.concatenate([lin, t[:, None]], axis=1))
        if self.model != "similarity":  # the mirror state is the sign of the linear part
            object.__setattr__(self, "mirrored", bool(np.linalg.det(lin) < 0))

    @property
    def n_pairs(self) -> int:
        """Number of point pairs the fit used."""
        return int(self.residuals_um.shape[0])

    def _features(self, points: ArrayLike) -> FloatArray:
        p = as_points(points, "points")
        return _design(self.model, (p - self.origin) / self.scale, self.mirrored, self.centres)

    def apply(self, points: ArrayLike) -> FloatArray:
        """Map (N, 2) source points (um) into the destination frame (um)."""
        return self._features(points) @ self.theta

    def predicted_error(self, points: ArrayLike) -> FloatArray:
        """Predicted RMS radial error (um) of :meth:`apply` at each point.

        ``sqrt(trace(Phi C Phi^T) + bias^2)``: the parameter uncertainty propagated to the
        point (grows outside the beads' hull) plus the misfit seen by leave-one-out (and,
        for the similarity, an allowance for anisotropic scale it cannot represent). It
        does not include the localisation error of the target itself.
        """
        f = self._features(points)
        var = np.einsum("nip,pq,niq->n", f, self.param_cov, f)
        if self.model == "similarity":
            dist = np.linalg.norm(np.asarray(points, float).reshape(-1, 2) - self.origin, axis=1)
            var = var + (SIMILARITY_MODEL_SD * dist) ** 2
        return np.sqrt(np.maximum(var, 0.0) + self.bias_um ** 2)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; :meth:`from_dict` restores an identical transform."""
        res = np.linalg.norm(self.residuals_um, axis=1)
        loo = np.linalg.norm(self.loo_errors_um, axis=1)
        return {
            "model": self.model, "from_frame": self.from_frame, "to_frame": self.to_frame,
            "mirrored": self.mirrored, "matrix": self.matrix.tolist(),
            "parameters": {"origin": self.origin.tolist(), "scale": self.scale,
                           "theta": self.theta.tolist(), "centres": self.centres.tolist(),
                           "smoothing": self.smoothing},
            "param_cov": self.param_cov.tolist(), "sigma_um": self.sigma_um,
            "bias_um": self.bias_um, "residuals_um": self.residuals_um.tolist(),
            "loo_errors_um": self.loo_errors_um.tolist(),
            "rms_residual_um": float(np.sqrt(np.mean(res ** 2))) if res.size else 0.0,
            "rms_loo_error_um": float(np.sqrt(np.mean(loo ** 2))) if loo.size else 0.0,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transform2D:
        """Rebuild a transform written by :meth:`to_dict`."""
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
                param_cov=np.asarray(data["param_cov"], float),
                sigma_um=float(data["sigma_um"]), bias_um=float(data["bias_um"]),
                residuals_um=np.asarray(data["residuals_um"], float).reshape(-1, 2),
                loo_errors_um=np.asarray(data["loo_errors_um"], float).reshape(-1, 2),
                smoothing=float(par.get("smoothing", 0.0)))
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CorrelationInputError):
                raise
            raise CorrelationInputError(f"transform: malformed JSON ({err})") from err


def _smoother(model: str, u: FloatArray, mirrored: bool, smoothing: float
              ) -> tuple[FloatArray, FloatArray]:
    """Return (X, M): stacked design (2n, p) and the map theta = M @ y (p, 2n)."""
    n = u.shape[0]
    centres = u if model == "tps" else np.zeros((0, 2))
    feats = _design(model, u, mirrored, centres)
    x = feats.reshape(2 * n, -1)
    if model == "tps":
        k = _tps_kernel(u, u)
        p = np.concatenate([np.ones((n, 1)), u], axis=1)
        lmat = np.block([[k + smoothing * np.eye(n), p], [p.T, np.zeros((3, 3))]])
        rhs = np.concatenate([np.eye(n), np.zeros((3, n))], axis=0)
        m1 = np.linalg.solve(lmat, rhs)  # (n + 3, n), per coordinate
        m = np.zeros((2 * (n + 3), 2 * n))
        m[: n + 3, 0::2] = m1
        m[n + 3:, 1::2] = m1
        return x, m
    m = np.linalg.pinv(x)
    return x, m


def fit_transform(src: ArrayLike, dst: ArrayLike, model: ModelName, *,
                  mirrored: bool | None = None, smoothing: float = 1e-2,
                  from_frame: str = "lm", to_frame: str = "em") -> Transform2D:
    """Least-squares fit of ``model`` mapping ``src`` onto ``dst`` (pairs in row order).

    ``mirrored`` only matters for the similarity: None tries both and keeps the smaller
    residual. ``smoothing`` is the TPS regularisation in normalised units (larger = closer
    to affine). Raises CorrelationInputError for too few or degenerate points.
    """
    s = as_points(src, "source points", 2)
    d = as_points(dst, "destination points", 2)
    if s.shape != d.shape:
        raise CorrelationInputError(f"source and destination differ in length: {len(s)} vs {len(d)}")
    if model not in MODEL_NAMES:
        raise CorrelationInputError(f"unknown transform model {model!r}; use one of {MODEL_NAMES}")
    need = {"similarity": 2, "affine": 3, "tps": 4}[model]
    if len(s) < need:
        raise CorrelationInputError(f"{model}: {len(s)} pair(s), need at least {need}")
    origin = s.mean(axis=0)
    scale = float(np.sqrt(np.mean(np.sum((s - origin) ** 2, axis=1))))
    if scale < 1e-9:
        raise CorrelationInputError("source points all coincide")
    u = (s - origin) / scale
    if model in ("affine", "tps") and np.linalg.matrix_rank(
            np.concatenate([u, np.ones((len(u), 1))], 1), tol=1e-6) < 3:
        raise CorrelationInputError(f"{model}: source points are collinear")
    if model == "similarity" and mirrored is None:
        fits = [fit_transform(s, d, model, mirrored=mir, from_frame=from_frame,
                              to_frame=to_frame) for mir in (False, True)]
        return min(fits, key=lambda t: float(np.sum(t.residuals_um ** 2)))
    mir = bool(mirrored) if model == "similarity" else False
    x, m = _smoother(model, u, mir, smoothing)
    y = d.reshape(-1)
    theta = m @ y
    resid = (y - x @ theta).reshape(-1, 2)
    h = x @ m
    n = len(s)
    dof_used = float(np.trace(h))
    rss = float(np.sum(resid ** 2))
    sigma2 = (rss + PRIOR_DOF * PRIOR_SIGMA_UM ** 2) / (max(2 * n - dof_used, 0.0) + PRIOR_DOF)
    loo = np.zeros_like(resid)
    excess = np.zeros(n)
    eye2 = np.eye(2)
    r_mat = np.eye(2 * n) - h
    for i in range(n):
        sl = slice(2 * i, 2 * i + 2)
        a = eye2 - h[sl, sl]
        if abs(np.linalg.det(a)) < 1e-9:  # point fully determines its own fit
            loo[i] = np.nan
            continue
        a_inv = np.linalg.inv(a)
        loo[i] = a_inv @ resid[i]
        # expected |loo|^2 with no misfit: Cov(e_i) = sigma^2 [(I-H)(I-H)^T]_ii
        c = r_mat[sl] @ r_mat[sl].T
        excess[i] = float(loo[i] @ loo[i]) - sigma2 * float(np.trace(a_inv @ c @ a_inv.T))
    finite = np.all(np.isfinite(loo), axis=1)
    bias2 = float(max(0.0, np.mean(excess[finite]))) if np.any(finite) else 0.0
    return Transform2D(
        model=model, from_frame=from_frame, to_frame=to_frame, mirrored=mir,
        origin=origin, scale=scale, theta=theta,
        centres=u.copy() if model == "tps" else np.zeros((0, 2)),
        param_cov=sigma2 * (m @ m.T), sigma_um=float(np.sqrt(sigma2)),
        bias_um=float(np.sqrt(bias2)), residuals_um=resid, loo_errors_um=loo,
        smoothing=smoothing if model == "tps" else 0.0)


def loo_rms(t: Transform2D) -> float:
    """RMS leave-one-out error (um); infinite when any point is undetermined without itself."""
    loo = t.loo_errors_um
    if loo.size == 0 or not np.all(np.isfinite(loo)):
        return float("inf")
    return float(np.sqrt(np.mean(np.sum(loo ** 2, axis=1))))


def select_model(src: ArrayLike, dst: ArrayLike, *, mirrored: bool | None = None,
                 models: tuple[ModelName, ...] = MODEL_NAMES,
                 from_frame: str = "lm", to_frame: str = "em") -> Transform2D:
    """Fit the candidate models and keep the one leave-one-out error supports.

    A richer model replaces the simpler choice only if its LOO RMS is below
    ``SELECTION_GAIN`` times the current one, so a spline is used only when leaving beads
    out shows it helps; from ``AFFINE_DEFAULT_FROM`` pairs the affine is the default
    unless the similarity's LOO is clearly better. Models with fewer pairs than ``MIN_PAIRS`` are
    skipped; with fewer than 3 pairs the similarity is returned without a LOO check.
    """
    s = as_points(src, "source points", 2)
    d = as_points(dst, "destination points", 2)
    fits: dict[str, Transform2D] = {}
    for model in MODEL_NAMES:
        if model not in models or len(s) < MIN_PAIRS[model]:
            continue
        lambdas = TPS_LAMBDAS if model == "tps" else (0.0,)
        cands: list[Transform2D] = []
        for lam in lambdas:
            try:
                cands.append(fit_transform(s, d, model, mirrored=mirrored, smoothing=lam,
                                           from_frame=from_frame, to_frame=to_frame))
            except CorrelationInputError:
                continue  # e.g. collinear points: this model is not identifiable here
        if cands:
            fits[model] = min(cands, key=loo_rms)
    best: Transform2D | None = fits.get("similarity")
    aff = fits.get("affine")
    if aff is not None:
        # Anisotropic scale is the rule between two microscopes, so with enough pairs the
        # affine is the default and the similarity has to earn its place; with few pairs
        # the affine has to.
        gain = AFFINE_DEFAULT_GAIN if len(s) >= AFFINE_DEFAULT_FROM else SELECTION_GAIN
        if best is None or loo_rms(aff) < gain * loo_rms(best):
            best = aff
    tps = fits.get("tps")
    if tps is not None and (best is None or loo_rms(tps) < SELECTION_GAIN * loo_rms(best)):
        best = tps
    if best is None:
        return fit_transform(s, d, "similarity", mirrored=mirrored,
                             from_frame=from_frame, to_frame=to_frame)
    return best
