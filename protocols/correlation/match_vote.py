"""Candidate (rotation, shift) hypotheses from pair voting.

With the scale known to ~10%, every LM bead pair and every EM pair of similar length vote for
one (rotation, shift); true pairs pile up in one cell while missing and spurious beads spread
thin, which keeps this working with half the beads missing on each side.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import maximum_filter, uniform_filter

from protocols.correlation.match_refine import fit_matrix
from protocols.correlation.match_types import MIRROR, FloatArray, MatchConfig, rot

__all__ = ["vote_peaks"]
# Votes of one true correspondence agree on scale, shift and angle to within noise and
# anisotropy (a few % of scale over a 90 um square is ~1 um of shift).
SCALE_AGREEMENT = 0.03
SHIFT_AGREEMENT_UM = 1.5
ANGLE_AGREEMENT_RAD = np.deg2rad(1.5)
MAX_CONSENSUS_CENTRES = 500


def _consensus(s: FloatArray, tx: FloatArray, ty: FloatArray, theta: FloatArray,
               idx: NDArray[np.intp]) -> NDArray[np.intp]:
    """The votes of ``idx`` that agree with the vote most others agree with.

    A cell spans 3 bins of shift and angle, and its chance votes spread over the whole
    scale range, so averaging all of them biased the start: 16 true votes among 38 in one
    cell (6 shared beads among 20 a side) gave a median scale 4.5% off, 5.7 um at the
    square's edge, beyond the refinement's first radius. With thousands of votes in a cell
    (80 beads a side) every vote against every other is millions of comparisons, so at
    most MAX_CONSENSUS_CENTRES evenly spread votes are tried as the one agreed with.
    """
    if len(idx) <= 2:
        return idx
    centres = idx if len(idx) <= MAX_CONSENSUS_CENTRES else \
        idx[np.linspace(0, len(idx) - 1, MAX_CONSENSUS_CENTRES).astype(np.intp)]
    ds = np.abs(s[centres, None] - s[None, idx]) <= SCALE_AGREEMENT * s[centres, None]
    dt = np.hypot(tx[centres, None] - tx[None, idx], ty[centres, None] - ty[None, idx])
    da = np.abs(np.mod(theta[centres, None] - theta[None, idx] + np.pi, 2 * np.pi) - np.pi)
    agree = ds & (dt <= SHIFT_AGREEMENT_UM) & (da <= ANGLE_AGREEMENT_RAD)
    return idx[agree[int(np.argmax(agree.sum(axis=1)))]]


def _cell_votes(order: NDArray[np.intp], sorted_flat: NDArray[np.intp], ct: int, cx: int,
                cy: int, n_theta: int, n_t: int) -> NDArray[np.intp]:
    """Votes (original indices, ascending) in the 3 x 3 x 3 bins around one cell; angle
    wraps, shift does not. Looked up in the votes sorted by bin, not by scanning all."""
    parts = []
    for dth in (-1, 0, 1):
        t = (ct + dth) % n_theta
        for x in range(max(cx - 1, 0), min(cx + 2, n_t)):
            base = (t * n_t + x) * n_t
            lo = np.searchsorted(sorted_flat, base + max(cy - 1, 0), side="left")
            hi = np.searchsorted(sorted_flat, base + min(cy + 1, n_t - 1), side="right")
            parts.append(order[lo:hi])
    return np.sort(np.concatenate(parts))


def vote_peaks(lm: FloatArray, em: FloatArray, w_lm: FloatArray, w_em: FloatArray,
                mirrored: bool, cfg: MatchConfig) -> list[FloatArray]:
    """Initial LM->EM affines from the strongest (rotation, shift) cells of pair voting."""
    c_lm, c_em = lm.mean(0), em.mean(0)
    p = (lm - c_lm) @ (MIRROR if mirrored else np.eye(2))
    q = em - c_em
    i, j = np.triu_indices(len(p), 1)
    k, l = np.nonzero(~np.eye(len(q), dtype=bool))
    d, e = p[j] - p[i], q[l] - q[k]
    ld, le = np.hypot(d[:, 0], d[:, 1]), np.hypot(e[:, 0], e[:, 1])
    keep_d, keep_e = ld >= cfg.min_pair_dist_um, le >= cfg.min_pair_dist_um
    i, j, d, ld = i[keep_d], j[keep_d], d[keep_d], ld[keep_d]
    k, l, e, le = k[keep_e], l[keep_e], e[keep_e], le[keep_e]
    ratio = le[None, :] / ld[:, None]
    lo, hi = cfg.scale_bounds
    a, b = np.nonzero((ratio >= lo) & (ratio <= hi))
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
    half = float(np.max(np.abs(q))) + hi * float(np.max(np.abs(p))) + 1.0
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
    order = np.argsort(flat, kind="stable")
    sorted_flat = flat[order]
    for cell in top:
        ct, rem = divmod(int(cell), n_t * n_t)
        cx, cy = divmod(rem, n_t)
        sel = _cell_votes(order, sorted_flat, ct, cx, cy, n_theta, n_t)
        if not len(sel):
            continue
        sel = _consensus(s, tx, ty, theta, sel)
        th = float(np.angle(np.sum(np.exp(1j * theta[sel]))))
        sc = float(np.median(s[sel]))
        t = np.array([np.median(tx[sel]), np.median(ty[sel])])
        lin = sc * rot(th) @ (MIRROR if mirrored else np.eye(2))
        out.append(np.concatenate([lin, (c_em + t - lin @ c_lm)[:, None]], axis=1))
        fitted = _fit_voters(lm, em, np.concatenate([i[a[sel]], j[a[sel]]]),
                             np.concatenate([k[b[sel]], l[b[sel]]]), mirrored, cfg)
        if fitted is not None:
            out.append(fitted)
    return out


def _fit_voters(lm: FloatArray, em: FloatArray, src: NDArray[np.intp], dst: NDArray[np.intp],
                mirrored: bool, cfg: MatchConfig) -> FloatArray | None:
    """A start fitted to the bead correspondences the cell's votes name.

    The median rotation, scale and shift of a cell is a similarity; with 4-5% of
    anisotropy between the microscopes it is 2 um off at the square's edge, and the
    first mutual-nearest-neighbour round then pairs wrong beads and converges elsewhere
    (a simulated square with 6 shared beads refused as 5 against 5). The votes also say
    which bead is which: each correspondence counted once, the one with most votes per
    bead, and an affine (bounded like any fit) through them starts on the true pairs.
    """
    if len(src) == 0:
        return None
    pairs, counts = np.unique(np.stack([src, dst], axis=1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    used_lm: set[int] = set()
    used_em: set[int] = set()
    keep = []
    for o in order:
        p, q = int(pairs[o, 0]), int(pairs[o, 1])
        if p not in used_lm and q not in used_em:
            used_lm.add(p)
            used_em.add(q)
            keep.append(o)
    if len(keep) < 3:
        return None
    chosen = pairs[keep]
    return fit_matrix(lm[chosen[:, 0]], em[chosen[:, 1]], mirrored, len(chosen) >= 4, cfg)
