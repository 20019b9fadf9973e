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

Each vote cell gives two starts: its median similarity, and an affine through the bead
correspondences its votes name (the similarity is microns off at the edge of a square
with a few % of anisotropy). Coarse refinement rounds fit the largest subset of
nearest-neighbour pairs one bounded affine agrees with, so the wrong pairs a coarse radius
admits do not pull the fit. When the full sets are refused, the confident detections
alone get a second look (see :func:`match_points`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.match_gate import gate
from protocols.correlation.match_refine import fit_matrix, refine
from protocols.correlation.match_types import (
    FloatArray,
    Hypothesis,
    MatchConfig,
    MatchResult,
    MatchStatus,
)
from protocols.correlation.match_vote import vote_peaks
from protocols.correlation.transforms import as_points

__all__ = ["Hypothesis", "MatchConfig", "MatchResult", "MatchStatus", "match_points"]


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
    result = _match(lm, em, w_lm, w_em, seed, cfg)
    if result.status == "ok":
        return result
    # Second look at the confident detections alone. Specks and contamination that score
    # low still enter the a-contrario count (every LM point is a chance to align), so a
    # true match among 6 beads of 30 detections can read as chance; chosen by score alone,
    # before looking at the other side, the subset is a fair test. It is held to half
    # the NFA threshold (and its NFA reported doubled), so the two looks together expect
    # at most 1.5 x max_nfa false alarms between unrelated sets.
    keep_lm = np.flatnonzero(w_lm >= cfg.confident_weight)
    keep_em = np.flatnonzero(w_em >= cfg.confident_weight)
    if (len(keep_lm) == len(lm) and len(keep_em) == len(em)) or min(
            len(keep_lm), len(keep_em)) < cfg.min_inliers:
        return result
    sub = _match(lm[keep_lm], em[keep_em], w_lm[keep_lm], w_em[keep_em], seed,
                 replace(cfg, max_nfa=cfg.max_nfa / 2))
    if sub.status != "ok" or sub.best is None:
        return result
    return _lifted(sub, keep_lm, keep_em)


def _match(lm: FloatArray, em: FloatArray, w_lm: FloatArray, w_em: FloatArray,
           seed: FloatArray | None, cfg: MatchConfig) -> MatchResult:
    """Vote, refine and gate one pair of point sets (see :func:`match_points`)."""
    vote_lm = np.argsort(-w_lm, kind="stable")[: cfg.max_vote_points]
    vote_em = np.argsort(-w_em, kind="stable")[: cfg.max_vote_points]
    starts: list[tuple[FloatArray, bool]] = []
    for mirrored in (False, True):
        for m in vote_peaks(lm[vote_lm], em[vote_em], w_lm[vote_lm], w_em[vote_em],
                             mirrored, cfg):
            starts.append((m, mirrored))
    if seed is not None:
        starts.append((seed, bool(np.linalg.det(seed[:, :2]) < 0)))

    tree = cKDTree(em)
    hyps: dict[bytes, Hypothesis] = {}
    for mat0, mirrored in starts:
        refined = refine(mat0, mirrored, lm, em, tree, cfg)
        if refined is None:
            continue
        pairs, mat = refined
        pairs = pairs[np.argsort(pairs[:, 0])]
        key = bytes([int(mirrored)]) + pairs.tobytes()
        if key + b"c" in hyps:
            continue
        # The refinement fits the pairs that agree with each other; when that leaves
        # fewer than cfg.affine_from it falls back to a similarity, whose anisotropy
        # residuals (0.3-0.6 um over 70 um) then hide true pairs from the gate. The fit
        # of every assigned pair competes beside it, and the gate keeps the more
        # significant of the two.
        whole = fit_matrix(lm[pairs[:, 0]], em[pairs[:, 1]], mirrored,
                           len(pairs) >= cfg.affine_from, cfg)
        for tag, m in ((b"c", mat), (b"a", whole)):
            if m is None:
                continue
            pred = lm[pairs[:, 0]] @ m[:, :2].T + m[:, 2]
            res = np.linalg.norm(pred - em[pairs[:, 1]], axis=1)
            hyps[key + tag] = Hypothesis(pairs=pairs, matrix=m, mirrored=mirrored,
                                         residuals_um=res)
    ranked = sorted(hyps.values(), key=lambda h: (-h.n_inliers, h.rms_um))
    return gate(ranked, lm, em, cfg)


def _lifted(res: MatchResult, keep_lm: NDArray[np.intp], keep_em: NDArray[np.intp]
            ) -> MatchResult:
    """A subset's result with its pairs in the indices of the full point sets."""
    def lift(h: Hypothesis | None) -> Hypothesis | None:
        if h is None:
            return None
        pairs = np.stack([keep_lm[h.pairs[:, 0]], keep_em[h.pairs[:, 1]]], axis=1)
        return replace(h, pairs=pairs.astype(np.intp))

    return replace(res, best=lift(res.best), runner_up=lift(res.runner_up),
                   nfa=2 * res.nfa,
                   reason=f"{res.reason} (second look, confident detections only: "
                          f"{len(keep_lm)} LM, {len(keep_em)} EM; NFA x2)")


def _weights(w: ArrayLike | None, n: int, name: str) -> FloatArray:
    if w is None:
        return np.ones(n)
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise CorrelationInputError(f"{name}: need {n} finite positive values")
    return np.asarray(arr / arr.max(), np.float64)
