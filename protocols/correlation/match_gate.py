"""The acceptance gate: a match is "ok" only when clearly better than the next different one.

Refusing costs a manual pick; a wrong answer costs a tilt series at the wrong place. So the
best hypothesis must have enough inliers, a margin over the best *different* hypothesis (the
other mirror, a lattice shift), and a small a-contrario number of false alarms.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import binom

from protocols.correlation.match_types import (
    FloatArray,
    Hypothesis,
    MatchConfig,
    MatchResult,
    MatchStatus,
)

__all__ = ["gate"]


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


def _gate_radius(h: Hypothesis, cfg: MatchConfig) -> float:
    """The accuracy ``h`` is judged at (um): a few times its robust RMS residual.

    1.2 x the median radial residual ~ RMS for Gaussian noise, but one false pair cannot
    inflate it; kept within [gate_floor_um, verify_radius_um].
    """
    robust_rms = 1.2 * float(np.median(h.residuals_um))
    return float(np.clip(cfg.gate_rms_factor * robust_rms, cfg.gate_floor_um,
                         cfg.verify_radius_um))


def _nfa_at(h: Hypothesis, radius: float, lm: FloatArray, em: FloatArray,
            cfg: MatchConfig) -> float:
    """NFA of ``h`` counting its pairs within ``radius`` against the EM density they face."""
    span = np.ptp(em, axis=0) + 2 * radius
    density = _local_density_per_um2(em, em[h.pairs[:, 1]],
                                     len(em) / float(span[0] * span[1]))
    return _nfa(h.residuals_um, h.count_within(radius) >= cfg.affine_from, len(lm), len(em),
                density, radius)


def gate(ranked: list[Hypothesis], lm: FloatArray, em: FloatArray, cfg: MatchConfig
          ) -> MatchResult:
    """Accept the best hypothesis only if it is clearly better than the next different one.

    The best is the most significant (smallest NFA at its own accuracy), represented by
    the hypothesis of that answer with most inliers. It and the runner-up are counted at
    one accuracy, the gate radius: a few times the best one's RMS residual (within
    [gate_floor_um, verify_radius_um]). Chance alignments only reach their inlier count by
    spending the whole verification radius, so they lose inliers at the accuracy of a true
    match, which is what opens the margin. The runner-up only counts as a rival answer
    (the ratio test) when chance would not produce it (NFA at most ``rival_sure_nfa``), or
    when chance would not produce it easily (NFA at most ``rival_max_nfa``) and it is not
    overwhelmingly less significant than the best (NFA within ``rival_nfa_ratio`` of the
    best's): 8 beads at NFA 1e-13 are not made ambiguous by 5 at 0.2. A regular
    arrangement's shifted copy always counts.
    """
    if not ranked:
        return MatchResult("no_confident_match", "no hypothesis survived refinement",
                           None, None, 0, float("inf"), 0.0)
    lo, hi = lm.min(0), lm.max(0)
    probes = np.concatenate([lm, [[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]],
                                  [hi[0], hi[1]]]], axis=0)

    def differs(h: Hypothesis, ref: Hypothesis) -> bool:
        return float(np.max(np.linalg.norm(h.apply(probes) - ref.apply(probes), axis=1))
                     ) > cfg.distinct_um

    # The answer is the most significant hypothesis (a tight match of 6 beats a loose 7 of
    # which 6 are chance); its representative the one of that answer with most inliers.
    first = min(ranked, key=lambda h: (_nfa_at(h, _gate_radius(h, cfg), lm, em, cfg),
                                       -h.n_inliers, h.rms_um))
    first_radius = _gate_radius(first, cfg)
    best = max((h for h in ranked if not differs(h, first)),
               key=lambda h: (h.count_within(first_radius), -h.rms_um))
    radius = _gate_radius(best, cfg)
    nfa = _nfa_at(best, radius, lm, em, cfg)
    different = [h for h in ranked if differs(h, best)]
    runner = max(different, key=lambda h: (h.count_within(radius), -h.rms_um), default=None)
    k_best = best.count_within(radius)
    k_runner = runner.count_within(radius) if runner else 0
    k_shift = _best_shifted_count(best, lm, em, radius, cfg.distinct_um)
    nfa_runner = _nfa_at(runner, radius, lm, em, cfg) if runner else float("inf")
    # Any two pairs always fit some different similarity: the runner-up has >= 2.
    k_close = max(2, k_runner, k_shift)
    rival = nfa_runner <= cfg.rival_max_nfa and (
        nfa_runner <= cfg.rival_sure_nfa or nfa_runner <= cfg.rival_nfa_ratio * nfa)
    k_next = max(2, k_shift, k_runner if rival else 0)

    def result(status: MatchStatus, reason: str) -> MatchResult:
        return MatchResult(status, reason, best, runner, len(ranked), nfa, radius)

    if k_best < cfg.min_inliers:
        return result("no_confident_match",
                      f"{k_best} matched beads within {radius:.2f} um, need {cfg.min_inliers}")
    if k_best - k_close < cfg.min_margin or k_next > cfg.max_runner_up_fraction * k_best:
        k_other = k_close if k_best - k_close < cfg.min_margin else k_next
        return result("no_confident_match", f"ambiguous: {k_best} matched beads within "
                      f"{radius:.2f} um, a different answer has {k_other}")
    if nfa > cfg.max_nfa:
        return result("no_confident_match", f"{k_best} matched beads within {radius:.2f} um "
                      f"could be chance (NFA {nfa:.2g} > {cfg.max_nfa:g})")
    nxt = (f"next different answer has {k_runner}, less significant (NFA {nfa_runner:.2g})"
           if k_runner > k_next else f"next different answer has {k_next}")
    return result("ok", f"{k_best} matched beads within {radius:.2f} um; {nxt}; "
                  f"NFA {nfa:.2g}")
