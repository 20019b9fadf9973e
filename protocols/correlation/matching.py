"""Match two bead point sets without given pairs, and decide whether the match is trustworthy.

Why this design (see docs/clem-workflow.md, "Matching without pairs"): in physical units the
scale is known to ~10%, so every LM pair of beads and every EM pair of similar length vote
for one (rotation, shift). True pairs pile up in one cell of that 3D space while the votes
of missing and spurious beads spread thin, which is what keeps the method working with half
the beads missing on each side. Both mirror states are voted separately. The strongest cells
become hypotheses, refined by mutual nearest neighbours with a shrinking radius and
finished by a one-to-one (Hungarian) assignment.

The acceptance gate compares the best hypothesis with the best *different* one (a
hypothesis that puts points somewhere else, e.g. the other mirror state or a lattice shift):
the answer is "ok" only with enough inliers, a clear inlier margin, and a small a-contrario
number of false alarms (how many hypotheses as good would be expected from unrelated point
sets). A collinear or regular bead arrangement therefore yields "no_confident_match"
rather than a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.ndimage import maximum_filter, uniform_filter
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.stats import binom

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.transforms import as_points

FloatArray = NDArray[np.float64]
MatchStatus = Literal["ok", "no_confident_match"]
_MIRROR = np.diag([-1.0, 1.0])


@dataclass(frozen=True)
class MatchConfig:
    """Tuning of :func:`match_points`; lengths in micrometres, angles in degrees.

    ``verify_radius_um`` must cover localisation noise plus what the matching model
    (similarity, or affine from ``affine_from`` inliers) cannot follow (distortion); the
    gate numbers (``min_inliers``, ``min_margin``, ``max_runner_up_fraction``, ``max_nfa``)
    are conservative on purpose: refusing costs a manual pick, a wrong answer costs a
    tilt series at the wrong place.
    """

    scale_range: tuple[float, float] = (0.9, 1.1)
    angle_bin_deg: float = 2.0
    shift_bin_um: float = 3.0
    min_pair_dist_um: float = 2.0
    max_vote_points: int = 60
    peaks_per_mirror: int = 24
    radii_um: tuple[float, ...] = (3.0, 2.0, 1.5)
    verify_radius_um: float = 1.0
    affine_from: int = 5
    max_anisotropy: float = 1.1
    min_inliers: int = 4
    min_margin: int = 2
    max_runner_up_fraction: float = 0.6
    max_nfa: float = 0.1
    distinct_um: float = 3.0
    gate_rms_factor: float = 3.0
    gate_floor_um: float = 0.15


@dataclass(frozen=True)
class Hypothesis:
    """One candidate correspondence: index pairs (lm, em), its 2x3 LM->EM affine, residuals."""

    pairs: NDArray[np.intp]
    matrix: FloatArray
    mirrored: bool
    residuals_um: FloatArray

    @property
    def n_inliers(self) -> int:
        """Number of one-to-one pairs within the verification radius."""
        return int(self.pairs.shape[0])

    @property
    def rms_um(self) -> float:
        """RMS residual of the pairs under this hypothesis' own fit."""
        return float(np.sqrt(np.mean(self.residuals_um ** 2))) if self.residuals_um.size else 0.0

    def count_within(self, radius_um: float) -> int:
        """Pairs whose residual is within ``radius_um``: compares hypotheses at one accuracy."""
        return int(np.sum(self.residuals_um <= radius_um))

    def apply(self, points: FloatArray) -> FloatArray:
        """Map LM points with this hypothesis' affine."""
        return points @ self.matrix[:, :2].T + self.matrix[:, 2]


@dataclass(frozen=True)
class MatchResult:
    """Outcome of :func:`match_points`.

    ``best`` is set whenever any hypothesis was found, also when ``status`` is
    "no_confident_match" (for display and diagnosis only: never transfer targets with it).
    ``runner_up`` is the best hypothesis that disagrees with ``best`` by more than
    ``distinct_um`` somewhere in the LM region; None if none was found.
    """

    status: MatchStatus
    reason: str
    best: Hypothesis | None
    runner_up: Hypothesis | None
    n_hypotheses: int
    nfa: float
    radius_um: float

    @property
    def pairs(self) -> NDArray[np.intp]:
        """Accepted (lm_index, em_index) pairs within the verification radius.

        Empty unless status is "ok". The gate counted only those within ``radius_um``;
        the rest are kept for the final fit, which a smooth model may explain.
        """
        if self.status != "ok" or self.best is None:
            return np.zeros((0, 2), dtype=np.intp)
        return self.best.pairs


def _rot(theta: float) -> FloatArray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _fit_matrix(src: FloatArray, dst: FloatArray, mirrored: bool, affine: bool,
                cfg: MatchConfig) -> FloatArray | None:
    """Least-squares similarity (fixed mirror) or affine; None if outside physical bounds."""
    cs, cd = src.mean(0), dst.mean(0)
    s0, d0 = src - cs, dst - cd
    if affine:
        lin = np.linalg.lstsq(s0, d0, rcond=None)[0].T
        sv = np.linalg.svd(lin, compute_uv=False)
        if (np.linalg.det(lin) < 0) != mirrored or sv[0] > cfg.max_anisotropy * sv[1]:
            affine = False
    if not affine:
        u = s0 @ _MIRROR if mirrored else s0
        sxx = float(np.sum(u * u))
        if sxx <= 0:
            return None
        a = float(np.sum(u[:, 0] * d0[:, 0] + u[:, 1] * d0[:, 1])) / sxx
        b = float(np.sum(u[:, 0] * d0[:, 1] - u[:, 1] * d0[:, 0])) / sxx
        lin = np.array([[a, -b], [b, a]]) @ (_MIRROR if mirrored else np.eye(2))
    sv = np.linalg.svd(lin, compute_uv=False)
    lo, hi = cfg.scale_range
    if sv[1] < 0.95 * lo or sv[0] > 1.05 * hi:
        return None
    return np.concatenate([lin, (cd - lin @ cs)[:, None]], axis=1)


def _assign(pred: FloatArray, em: FloatArray, radius: float) -> NDArray[np.intp]:
    """One-to-one pairs within ``radius`` minimising total squared distance (Hungarian)."""
    d2 = np.sum((pred[:, None, :] - em[None, :, :]) ** 2, axis=2)
    near = d2 <= radius ** 2
    rows = np.flatnonzero(near.any(1))
    cols = np.flatnonzero(near.any(0))
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.intp)
    sub = np.where(near[np.ix_(rows, cols)], d2[np.ix_(rows, cols)], 1e3 * radius ** 2 + 1e6)
    r, c = linear_sum_assignment(sub)
    ok = near[rows[r], cols[c]]
    return np.stack([rows[r][ok], cols[c][ok]], axis=1).astype(np.intp)


def _mutual_nn(pred: FloatArray, tree: cKDTree, radius: float) -> NDArray[np.intp]:
    """Mutual nearest neighbours within ``radius``: cheap and robust for coarse rounds."""
    d, j = tree.query(pred, k=1)
    back = cKDTree(pred).query(tree.data[j], k=1)[1]
    ok = (d <= radius) & (back == np.arange(len(pred)))
    return np.stack([np.flatnonzero(ok), j[ok]], axis=1).astype(np.intp)


def _refine(matrix: FloatArray, mirrored: bool, lm: FloatArray, em: FloatArray,
            tree: cKDTree, cfg: MatchConfig) -> tuple[NDArray[np.intp], FloatArray] | None:
    """Shrink the radius around an initial affine; finish with a Hungarian assignment."""
    mat: FloatArray | None = matrix
    for radius in (*cfg.radii_um, cfg.verify_radius_um):
        assert mat is not None
        pairs = _mutual_nn(lm @ mat[:, :2].T + mat[:, 2], tree, radius)
        if len(pairs) < 2:
            return None
        mat = _fit_matrix(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored,
                          len(pairs) >= cfg.affine_from, cfg)
        if mat is None:
            return None
    for _ in range(2):
        assert mat is not None
        pairs = _assign(lm @ mat[:, :2].T + mat[:, 2], em, cfg.verify_radius_um)
        if len(pairs) < 2:
            return None
        core = pairs[_robust_core(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored, cfg)]
        mat = _fit_matrix(lm[core[:, 0]], em[core[:, 1]], mirrored,
                          len(core) >= cfg.affine_from, cfg)
        if mat is None:
            return None
    if mat is None:
        return None
    pairs = _assign(lm @ mat[:, :2].T + mat[:, 2], em, cfg.verify_radius_um)
    if len(pairs) < 2:
        return None
    return pairs, mat


def _robust_core(src: FloatArray, dst: FloatArray, mirrored: bool, cfg: MatchConfig
                 ) -> NDArray[np.bool_]:
    """Mask of the pairs that agree with a fit made without them.

    One false pair at the edge of the radius drags a least-squares fit of a handful of
    pairs and inflates everyone's residual; its leave-one-out residual, though, stands out.
    Pairs whose leave-one-out residual exceeds three times the median are left out of the
    fit (they stay candidates for the assignment).
    """
    k = len(src)
    if k < 5:
        return np.ones(k, dtype=bool)
    loo = np.zeros(k)
    for j in range(k):
        keep = np.arange(k) != j
        mat = _fit_matrix(src[keep], dst[keep], mirrored, k - 1 >= cfg.affine_from, cfg)
        if mat is None:
            return np.ones(k, dtype=bool)
        loo[j] = np.linalg.norm(src[j] @ mat[:, :2].T + mat[:, 2] - dst[j])
    return loo <= max(cfg.gate_floor_um, 3.0 * float(np.median(loo)))


def _vote_peaks(lm: FloatArray, em: FloatArray, w_lm: FloatArray, w_em: FloatArray,
                mirrored: bool, cfg: MatchConfig) -> list[FloatArray]:
    """Initial LM->EM affines from the strongest (rotation, shift) cells of pair voting."""
    c_lm, c_em = lm.mean(0), em.mean(0)
    p = (lm - c_lm) @ (_MIRROR if mirrored else np.eye(2))
    q = em - c_em
    i, j = np.triu_indices(len(p), 1)
    k, l = np.nonzero(~np.eye(len(q), dtype=bool))
    d, e = p[j] - p[i], q[l] - q[k]
    ld, le = np.hypot(d[:, 0], d[:, 1]), np.hypot(e[:, 0], e[:, 1])
    keep_d, keep_e = ld >= cfg.min_pair_dist_um, le >= cfg.min_pair_dist_um
    i, j, d, ld = i[keep_d], j[keep_d], d[keep_d], ld[keep_d]
    k, l, e, le = k[keep_e], l[keep_e], e[keep_e], le[keep_e]
    ratio = le[None, :] / ld[:, None]
    a, b = np.nonzero((ratio >= cfg.scale_range[0]) & (ratio <= cfg.scale_range[1]))
    if a.size == 0:
        return []
    s = ratio[a, b]
    theta = np.mod(np.arctan2(e[b, 1], e[b, 0]) - np.arctan2(d[a, 1], d[a, 0]), 2 * np.pi)
    pm = 0.5 * (p[i[a]] + p[j[a]])
    qm = 0.5 * (q[k[b]] + q[l[b]])
    cos, sin = np.cos(theta), np.sin(theta)
    tx = qm[:, 0] - s * (cos * pm[:, 0] - sin * pm[:, 1])
    ty = qm[:, 1] - s * (sin * pm[:, 0] + cos * pm[:, 1])
    weight = w_lm[i[a]] * w_lm[j[a]] * w_em[k[b]] * w_em[l[b]]

    n_theta = round(360.0 / cfg.angle_bin_deg)
    half = float(np.max(np.abs(q))) + cfg.scale_range[1] * float(np.max(np.abs(p))) + 1.0
    step = max(cfg.shift_bin_um, 2 * half / 300.0)
    n_t = int(np.ceil(2 * half / step)) + 1
    bt = np.floor(theta / (2 * np.pi) * n_theta).astype(np.intp) % n_theta
    bx = np.clip(np.floor((tx + half) / step).astype(np.intp), 0, n_t - 1)
    by = np.clip(np.floor((ty + half) / step).astype(np.intp), 0, n_t - 1)
    flat = (bt * n_t + bx) * n_t + by
    grid = np.bincount(flat, weights=weight, minlength=n_theta * n_t * n_t).reshape(
        n_theta, n_t, n_t)
    smooth = uniform_filter(grid, size=3, mode=("wrap", "constant", "constant"))
    is_peak = (smooth == maximum_filter(smooth, size=3, mode=("wrap", "constant", "constant")))
    is_peak &= smooth > 0
    cells = np.flatnonzero(is_peak.ravel())
    top = cells[np.argsort(smooth.ravel()[cells])[::-1][: cfg.peaks_per_mirror]]

    out: list[FloatArray] = []
    for cell in top:
        ct, rem = divmod(int(cell), n_t * n_t)
        cx, cy = divmod(rem, n_t)
        dt = (bt - ct + n_theta // 2) % n_theta - n_theta // 2
        sel = (np.abs(dt) <= 1) & (np.abs(bx - cx) <= 1) & (np.abs(by - cy) <= 1)
        if not np.any(sel):
            continue
        th = float(np.angle(np.sum(np.exp(1j * theta[sel]))))
        sc = float(np.median(s[sel]))
        t = np.array([np.median(tx[sel]), np.median(ty[sel])])
        lin = sc * _rot(th) @ (_MIRROR if mirrored else np.eye(2))
        out.append(np.concatenate([lin, (c_em + t - lin @ c_lm)[:, None]], axis=1))
    return out


def _local_density_per_um2(em: FloatArray, at: FloatArray, box_density: float,
                           radius_um: float = 10.0) -> float:
    """Mean EM density (points per um^2) around the matched EM beads ``at``.

    Each matched bead's neighbours within ``radius_um`` (itself excluded), never below the
    set's average: clustered beads are locally much denser than on average, and a chance
    alignment inside a cluster is that much likelier.
    """
    if len(at) == 0:
        return box_density
    counts = np.array([len(n) - 1 for n in cKDTree(em).query_ball_point(at, radius_um)])
    return max(box_density, float(np.mean(counts)) / (np.pi * radius_um ** 2))


def _nfa(residuals_um: FloatArray, affine: bool, n_lm: int, n_em: int, density: float,
         max_radius_um: float) -> float:
    """Expected number of hypotheses this good between unrelated point sets (a contrario).

    Two pairs fix a similarity (three an affine); each further LM point lands within r of
    some EM point by chance with probability ``density * pi * r^2``. Tested at every
    accuracy the match offers (r = its k-th smallest residual, k >= free + 1, up to
    ``max_radius_um``) and the best kept, as in ORSA: a true match of a few beads is
    improbable because its residuals are small, not because there are many of them. The
    number of tests counts ordered pair-to-pair hypotheses in both mirror states and the
    accuracies tried.
    """
    free = 3 if affine else 2
    r = np.sort(residuals_um[residuals_um <= max_radius_um])
    n_tests = 2.0 * float(n_lm * (n_lm - 1) * n_em * (n_em - 1)) * max(len(r) - free, 1)
    best = n_tests
    for k in range(free + 1, len(r) + 1):
        p = min(1.0, density * np.pi * float(r[k - 1]) ** 2)
        best = min(best, n_tests * float(binom.sf(k - free - 1, max(n_lm - free, 0), p)))
    return best


def _prior_matrix(prior: ArrayLike | None) -> FloatArray | None:
    if prior is None:
        return None
    m = np.asarray(prior, dtype=np.float64)
    if m.shape != (2, 3) or not np.all(np.isfinite(m)):
        raise CorrelationInputError(f"prior: expected a finite 2x3 LM->EM affine, got {m.shape}")
    return m


def match_points(lm_um: ArrayLike, em_um: ArrayLike, *, lm_weights: ArrayLike | None = None,
                 em_weights: ArrayLike | None = None, prior: ArrayLike | None = None,
                 config: MatchConfig | None = None) -> MatchResult:
    """Find one-to-one LM<->EM bead pairs with unknown rotation, mirror and shift.

    Parameters
    ----------
    lm_um, em_um
        (N, 2) and (M, 2) bead positions in micrometres, any origin; scale within
        ``config.scale_range``.
    lm_weights, em_weights
        Optional detection scores (> 0); they weight the votes only, so a weak detection
        can still be matched but counts less when finding candidates.
    prior
        Optional 2x3 LM->EM affine (e.g. from the atlas). It adds a seed hypothesis that
        competes under the same gate; the search does not depend on it.

    Raises
    ------
    CorrelationInputError
        Fewer than 2 points on a side, NaN coordinates, bad weights or prior.
    """
    cfg = config or MatchConfig()
    lm = as_points(lm_um, "LM points", 2)
    em = as_points(em_um, "EM points", 2)
    w_lm = _weights(lm_weights, len(lm), "LM weights")
    w_em = _weights(em_weights, len(em), "EM weights")
    seed = _prior_matrix(prior)
    vote_lm = np.argsort(-w_lm, kind="stable")[: cfg.max_vote_points]
    vote_em = np.argsort(-w_em, kind="stable")[: cfg.max_vote_points]
    starts: list[tuple[FloatArray, bool]] = []
    for mirrored in (False, True):
        for m in _vote_peaks(lm[vote_lm], em[vote_em], w_lm[vote_lm], w_em[vote_em],
                             mirrored, cfg):
            starts.append((m, mirrored))
    if seed is not None:
        starts.append((seed, bool(np.linalg.det(seed[:, :2]) < 0)))

    tree = cKDTree(em)
    hyps: dict[bytes, Hypothesis] = {}
    for mat0, mirrored in starts:
        refined = _refine(mat0, mirrored, lm, em, tree, cfg)
        if refined is None:
            continue
        pairs, mat = refined
        pairs = pairs[np.argsort(pairs[:, 0])]
        key = bytes([int(mirrored)]) + pairs.tobytes()
        if key in hyps:
            continue
        pred = lm[pairs[:, 0]] @ mat[:, :2].T + mat[:, 2]
        res = np.linalg.norm(pred - em[pairs[:, 1]], axis=1)
        hyps[key] = Hypothesis(pairs=pairs, matrix=mat, mirrored=mirrored, residuals_um=res)
    ranked = sorted(hyps.values(), key=lambda h: (-h.n_inliers, h.rms_um))
    return _gate(ranked, lm, em, cfg)


def _weights(w: ArrayLike | None, n: int, name: str) -> FloatArray:
    if w is None:
        return np.ones(n)
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise CorrelationInputError(f"{name}: need {n} finite positive values")
    return np.asarray(arr / arr.max(), np.float64)


def _best_shifted_count(best: Hypothesis, lm: FloatArray, em: FloatArray, radius: float,
                        distinct_um: float) -> int:
    """Most LM beads the best mapping explains after a shift by any EM-to-EM vector.

    On a regular or repetitive arrangement (a lattice, beads along a line) the best
    mapping shifted by one period explains almost as many beads; voting may not propose
    that alternative, so it is checked directly.
    """
    mapped = best.apply(lm)
    if len(em) < 2:
        return 0
    k, l = np.nonzero(~np.eye(len(em), dtype=bool))
    shifts = em[l] - em[k]
    shifts = shifts[np.linalg.norm(shifts, axis=1) > distinct_um]
    if shifts.size == 0:
        return 0
    tree = cKDTree(em)
    moved = (mapped[None, :, :] + shifts[:, None, :]).reshape(-1, 2)
    d = tree.query(moved, k=1)[0].reshape(len(shifts), len(mapped))
    return int(np.max(np.sum(d <= radius, axis=1)))


def _gate(ranked: list[Hypothesis], lm: FloatArray, em: FloatArray, cfg: MatchConfig
          ) -> MatchResult:
    """Accept the best hypothesis only if it is clearly better than the next different one.

    Both are counted at one accuracy, ``gate_radius_um``: a few times the best one's RMS
    residual (within [gate_floor_um, verify_radius_um]). Chance alignments only reach
    their inlier count by spending the whole verification radius, so they lose inliers at
    the accuracy of a true match, which is what opens the margin.
    """
    if not ranked:
        return MatchResult("no_confident_match", "no hypothesis survived refinement",
                           None, None, 0, float("inf"), 0.0)
    best = ranked[0]
    # 1.2 x median radial residual ~ RMS for Gaussian noise, but one false pair cannot
    # inflate it and thereby widen the radius for everyone.
    robust_rms = 1.2 * float(np.median(best.residuals_um))
    radius = float(np.clip(cfg.gate_rms_factor * robust_rms, cfg.gate_floor_um,
                           cfg.verify_radius_um))
    lo, hi = lm.min(0), lm.max(0)
    probes = np.concatenate([lm, [[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]],
                                  [hi[0], hi[1]]]], axis=0)
    where = best.apply(probes)
    different = [h for h in ranked[1:] if float(np.max(np.linalg.norm(
        h.apply(probes) - where, axis=1))) > cfg.distinct_um]
    runner = max(different, key=lambda h: (h.count_within(radius), -h.rms_um), default=None)
    # Any two pairs always fit some different similarity: the runner-up has >= 2.
    k_best = best.count_within(radius)
    k_next = max(2, runner.count_within(radius) if runner else 0,
                 _best_shifted_count(best, lm, em, radius, cfg.distinct_um))
    span = np.ptp(em, axis=0) + 2 * radius
    density = _local_density_per_um2(em, em[best.pairs[:, 1]], len(em) / float(span[0] * span[1]))
    nfa = _nfa(best.residuals_um, k_best >= cfg.affine_from, len(lm), len(em), density, radius)

    def result(status: MatchStatus, reason: str) -> MatchResult:
        return MatchResult(status, reason, best, runner, len(ranked), nfa, radius)

    if k_best < cfg.min_inliers:
        return result("no_confident_match",
                      f"{k_best} matched beads within {radius:.2f} um, need {cfg.min_inliers}")
    if k_best - k_next < cfg.min_margin or k_next > cfg.max_runner_up_fraction * k_best:
        return result("no_confident_match", f"ambiguous: {k_best} matched beads within "
                      f"{radius:.2f} um, a different answer has {k_next}")
    if nfa > cfg.max_nfa:
        return result("no_confident_match", f"{k_best} matched beads within {radius:.2f} um "
                      f"could be chance (NFA {nfa:.2g} > {cfg.max_nfa:g})")
    return result("ok", f"{k_best} matched beads within {radius:.2f} um; "
                  f"next different answer has {k_next}; NFA {nfa:.2g}")
