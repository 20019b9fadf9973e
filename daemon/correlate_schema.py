"""OUT.json of `clemd correlate` (docs/clem-workflow.md, the offline correlation contract).

The pydantic models at the command's edge and :func:`output_model`, which turns a point
correlation into them; shared by the points, beads and atlas subcommands.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from protocols.correlation.points import PointCorrelation


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TargetOut(_Model):
    """One transferred target; ``predicted_error_um`` is an RMS radial error estimate.

    ``reliable`` is False where that error exceeds the transfer limit (targets far from
    every matched bead): use such a target only after a realign or a manual check.
    """

    id: str
    x: float
    y: float
    predicted_error_um: float
    reliable: bool


class PairOut(_Model):
    """One matched bead: indices into the input lists (0-based data rows) and errors."""

    lm_index: int
    em_index: int
    lm_x: float
    lm_y: float
    em_x: float
    em_y: float
    residual_um: float
    loo_error_um: float | None


class MatchOut(_Model):
    """How the gate decided: inliers of the best and of the next different answer."""

    n_inliers: int
    runner_up_inliers: int | None
    gate_radius_um: float
    nfa: float | None
    hypotheses: int


class DetectionsOut(_Model):
    """Beads found in the images (``beads``): counts and positions (px) with scores."""

    lm_count: int
    em_count: int
    lm_xy_score: list[tuple[float, float, float]]
    em_xy_score: list[tuple[float, float, float]]


class CorrelateOutput(_Model):
    """OUT.json. ``transform`` and ``targets`` are empty unless the beads matched.

    With "no_confident_match" they may still be present (beads matched, but the targets lie
    too far from them to trust: see ``reason`` and each target's ``reliable``).
    """

    schema_version: Literal[1] = 1
    command: str
    status: Literal["ok", "no_confident_match"]
    reason: str
    units: str
    targets: list[TargetOut]
    transform: dict[str, Any] | None
    pairs: list[PairOut]
    leave_one_out_errors_um: list[float]
    match: MatchOut
    detections: DetectionsOut | None = None
    elapsed_s: float


def output_model(command: str, res: PointCorrelation, lm: np.ndarray, em: np.ndarray,
                 ids: list[str], units: str, started: float, *,
                 targets_xy: np.ndarray | None = None,
                 detections: DetectionsOut | None = None) -> CorrelateOutput:
    """OUT.json from a point correlation; ``lm``/``em`` are the point lists in ``units``,
    ``targets_xy`` the transferred targets in ``units`` (default: ``res.targets_um``)."""
    m = res.match
    match = MatchOut(
        n_inliers=m.best.count_within(m.radius_um) if m.best else 0,
        runner_up_inliers=m.runner_up.count_within(m.radius_um) if m.runner_up else None,
        gate_radius_um=m.radius_um, nfa=m.nfa if math.isfinite(m.nfa) else None,
        hypotheses=m.n_hypotheses)
    targets: list[TargetOut] = []
    pairs: list[PairOut] = []
    loo_list: list[float] = []
    transform = None
    t = res.transform
    xy = res.targets_um if targets_xy is None else targets_xy
    if t is not None and xy is not None and res.target_errors_um is not None \
            and res.target_reliable is not None:
        targets = [TargetOut(id=i, x=float(p[0]), y=float(p[1]), predicted_error_um=float(e),
                             reliable=bool(r))
                   for i, p, e, r in zip(ids, xy, res.target_errors_um, res.target_reliable)]
        transform = t.to_dict()
        resid = np.linalg.norm(t.residuals_um, axis=1)
        loo = np.linalg.norm(t.loo_errors_um, axis=1)
        loo_list = [float(v) for v in loo if np.isfinite(v)]
        pairs = [PairOut(lm_index=int(a), em_index=int(b), lm_x=float(lm[a, 0]),
                         lm_y=float(lm[a, 1]), em_x=float(em[b, 0]), em_y=float(em[b, 1]),
                         residual_um=float(r), loo_error_um=float(v) if np.isfinite(v) else None)
                 for (a, b), r, v in zip(res.pairs, resid, loo)]
    return CorrelateOutput(command=command, status=res.status, reason=res.reason, units=units,
                           targets=targets, transform=transform, pairs=pairs,
                           leave_one_out_errors_um=loo_list, match=match,
                           detections=detections, elapsed_s=time.perf_counter() - started)
