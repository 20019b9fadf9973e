"""The data of point matching: its tuning, one candidate correspondence, and the outcome.

Kept apart from the search (match_vote, match_refine) and the acceptance gate (match_gate) so
that each of those reads as one step of protocols/correlation/matching.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["MIRROR", "FloatArray", "Hypothesis", "MatchConfig", "MatchResult", "MatchStatus",
           "rot"]

FloatArray = NDArray[np.float64]
MatchStatus = Literal["ok", "no_confident_match"]
MIRROR = np.diag([-1.0, 1.0])


@dataclass(frozen=True)
class MatchConfig:
    """Tuning of :func:`match_points`; lengths in micrometres, angles in degrees.

    ``verify_radius_um`` must cover localisation noise plus what the matching model
    (similarity, or affine from ``affine_from`` inliers) cannot follow (distortion); the
    gate numbers (``min_inliers``, ``min_margin``, ``max_runner_up_fraction``, ``max_nfa``,
    and ``rival_*``, when a runner-up is a rival answer at all:
    see match_gate.gate) are conservative on purpose: refusing costs a manual pick, a wrong
    answer costs a tilt series at the wrong place. ``confident_weight`` picks the
    detections (weight relative to the best one's) of the second look that
    :func:`match_points` takes when the full sets are refused.
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
    rival_max_nfa: float = 1.0
    rival_nfa_ratio: float = 1e4
    rival_sure_nfa: float = 1e-3
    distinct_um: float = 3.0
    gate_rms_factor: float = 3.0
    gate_floor_um: float = 0.15
    confident_weight: float = 0.3

    @property
    def scale_bounds(self) -> tuple[float, float]:
        """Pair-length ratios and singular values accepted: ``scale_range`` widened by 5%.

        The nominal range bounds the overall scale; along the stretched axis of an
        anisotropic map (a few % between two microscopes), and with localisation noise on
        short pairs, single lengths go beyond it. Without the slack a square at 1.1x lost
        most of its votes (benchmarked: 90% correct at 0.9x / 1.1x against 95% mid-range).
        """
        return 0.95 * self.scale_range[0], 1.05 * self.scale_range[1]


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


def rot(theta: float) -> FloatArray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])
