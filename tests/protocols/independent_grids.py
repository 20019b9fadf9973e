"""Grids of the independent atlas renderer run through register_atlas and judged, for tests
that pin a grid the benchmark once refused (benchmarks/correlation_independent_atlas.py)."""

from __future__ import annotations

import numpy as np

from protocols.correlation.atlas import AtlasResult, register_atlas


def answered_right(seed: int, wide: bool = False) -> AtlasResult:
    """Register grid ``seed`` (of the ``--wide`` draw if ``wide``); assert it is answered
    and every query point lands in its true EM square. The result, for further checks."""
    from benchmarks.correlation_independent_atlas import make_case

    case = make_case(seed, wide)
    pts = case.lm_view.to_px(case.points_ij * case.grid.pitch)
    res = register_atlas(case.lm, case.lm_nominal, case.em, case.em_nominal, pts)
    assert res.status == "ok", res.reason
    assert res.points_em_px is not None
    uv = case.em_view.to_grid(res.points_em_px)
    assert np.array_equal(np.floor(uv / case.grid.pitch + 0.5), case.points_ij)
    return res
