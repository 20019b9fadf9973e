"""From a rough LM->EM affine to one-to-one bead pairs: shrinking mutual-nearest-neighbour
rounds, then a Hungarian assignment whose fit leaves out pairs that disagree with the rest.

Fits stay within physical bounds (the known scale range, a mild anisotropy, the hypothesis'
mirror state), so a refinement cannot drift into a mapping no microscope produces.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from protocols.correlation.match_types import MIRROR, FloatArray, MatchConfig

__all__ = ["consensus_fit", "fit_matrix", "refine"]


def fit_matrix(src: FloatArray, dst: FloatArray, mirrored: bool, affine: bool,
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
        u = s0 @ MIRROR if mirrored else s0
        sxx = float(np.sum(u * u))
        if sxx <= 0:
            return None
        a = float(np.sum(u[:, 0] * d0[:, 0] + u[:, 1] * d0[:, 1])) / sxx
        b = float(np.sum(u[:, 0] * d0[:, 1] - u[:, 1] * d0[:, 0])) / sxx
        lin = np.array([[a, -b], [b, a]]) @ (MIRROR if mirrored else np.eye(2))
    sv = np.linalg.svd(lin, compute_uv=False)
    lo, hi = cfg.scale_bounds
    if sv[1] < lo or sv[0] > hi:
        return None
    return np.concatenate([lin, (cd - lin @ cs)[:, None]], axis=1)


def _affines_through(src: FloatArray, dst: FloatArray, triples: NDArray[np.intp]
                     ) -> tuple[FloatArray, NDArray[np.bool_]]:
    """The exact affine through each triple of pairs, (T, 2, 3), and which are defined."""
    s = src[triples]                                   # (T, 3, 2)
    d = dst[triples]
    a = np.concatenate([s, np.ones(s.shape[:2] + (1,))], axis=2)  # (T, 3, 3)
    det = np.linalg.det(a)
    ok = np.abs(det) > 1e-6 * np.maximum(1.0, np.max(np.abs(s), axis=(1, 2))) ** 2
    a[~ok] = np.eye(3)
    sol = np.linalg.solve(a, d)                        # (T, 3, 2): rows x, y, 1
    mats = np.transpose(sol, (0, 2, 1))                # (T, 2, 3)
    return mats, ok


def consensus_fit(src: FloatArray, dst: FloatArray, mirrored: bool, cfg: MatchConfig,
                  tol_um: float, max_triples: int = 400) -> FloatArray | None:
    """Least-squares fit of the largest subset of pairs one bounded affine agrees with.

    A coarse round of nearest neighbours pairs a few wrong beads along with the right
    ones; a least-squares fit through all of them, with 4-5% of anisotropy to follow,
    then lands between the two and the true pairs at the edge drift out of the next,
    smaller radius (a simulated square with 6 shared beads ended as 5 pairs, one false).
    The exact affine of every triple of pairs (a sample of them when there are many)
    that stays within physical bounds counts the pairs within ``tol_um``; the best one's
    agreeing pairs are refitted (MSAC: ties go to the smaller truncated residual sum).
    """
    a, b = _agreeing(src, dst, mirrored, cfg, tol_um, max_triples)
    return fit_matrix(a, b, mirrored, len(a) >= cfg.affine_from, cfg)


def _agreeing(src: FloatArray, dst: FloatArray, mirrored: bool, cfg: MatchConfig,
              tol_um: float, max_triples: int) -> tuple[FloatArray, FloatArray]:
    """The pairs the best bounded triple affine agrees with (all of them when no triple
    gives one: fewer than 4 pairs, none within the bounds, or under 3 agreeing)."""
    k = len(src)
    if k < 4:
        return src, dst
    if comb(k, 3) <= max_triples:
        triples = np.array(list(combinations(range(k), 3)), dtype=np.intp)
    else:  # drawn, never enumerated: hundreds of pairs have millions of triples
        rng = np.random.default_rng(k)
        triples = np.sort(np.stack([rng.choice(k, 3, replace=False)
                                    for _ in range(max_triples)]), axis=1)
    mats, ok = _affines_through(src, dst, triples)
    lin = mats[:, :, :2]
    sv = np.linalg.svd(lin, compute_uv=False)
    lo, hi = cfg.scale_bounds
    ok &= (np.linalg.det(lin) < 0) == mirrored
    ok &= (sv[:, 1] >= lo) & (sv[:, 0] <= hi) & (sv[:, 0] <= cfg.max_anisotropy * sv[:, 1])
    if not np.any(ok):
        return src, dst
    mats = mats[ok]
    pred = np.einsum("tij,kj->tki", mats[:, :, :2], src) + mats[:, None, :, 2]
    r2 = np.sum((pred - dst[None]) ** 2, axis=2)       # (T, k)
    cost = np.sum(np.minimum(r2, tol_um ** 2), axis=1)
    inl = r2[int(np.argmin(cost))] <= tol_um ** 2
    return (src[inl], dst[inl]) if inl.sum() >= 3 else (src, dst)


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


def refine(matrix: FloatArray, mirrored: bool, lm: FloatArray, em: FloatArray,
            tree: cKDTree, cfg: MatchConfig) -> tuple[NDArray[np.intp], FloatArray] | None:
    """Shrink the radius around an initial affine; finish with a Hungarian assignment."""
    mat: FloatArray | None = matrix
    for radius in (*cfg.radii_um, cfg.verify_radius_um):
        assert mat is not None
        pairs = _mutual_nn(lm @ mat[:, :2].T + mat[:, 2], tree, radius)
        if len(pairs) < 2:
            return None
        mat = consensus_fit(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored, cfg,
                            0.5 * cfg.verify_radius_um)
        if mat is None:
            return None
    for _ in range(2):
        assert mat is not None
        pairs = _assign(lm @ mat[:, :2].T + mat[:, 2], em, cfg.verify_radius_um)
        if len(pairs) < 2:
            return None
        core = pairs[_robust_core(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored, cfg)]
        mat = fit_matrix(lm[core[:, 0]], em[core[:, 1]], mirrored,
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
        mat = fit_matrix(src[keep], dst[keep], mirrored, k - 1 >= cfg.affine_from, cfg)
        if mat is None:
            return np.ones(k, dtype=bool)
        loo[j] = np.linalg.norm(src[j] @ mat[:, :2].T + mat[:, 2] - dst[j])
    return loo <= max(cfg.gate_floor_um, 3.0 * float(np.median(loo)))
