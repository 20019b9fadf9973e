"""Square selection on a simulated atlas and 100x inspection, against the specimen's squares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from lm_sim import context, grid_centre, small_grid

from drivers.clock import VirtualClock
from protocols.lm_atlas import LMAtlasParams, LMAtlasPlan
from protocols.lm_inspection import InspectionParams
from protocols.plan import InvalidStep, StepContext, run_plan
from protocols.square_selection import (
    SquareSelectionParams,
    SquareSelectionPlan,
    SquareSite,
    rank_squares,
)
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen, Square, SquareState

INSPECTION = InspectionParams(focus_range_um=8.0)
#: the session's 100x field: 1024 px of 0.1 um cover a 90 um square and the beads around it
FIELD = {"shape": (1024, 1024), "objectives": {"100x": {"pixel_size_um": 0.1}}}
MIN_BEADS = 4


@pytest.fixture(scope="module")
def selected(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Specimen, SimulatedLightMicroscope, StepContext]]:
    """Seed 5: two whole squares with torn film, cells in three whole squares."""
    spec = small_grid(seed=5, broken_fraction=0.2)
    lm = SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), seed=4, **FIELD)
    ctx = context(lm, tmp_path_factory.mktemp("squares"))
    centre = grid_centre(spec)
    run_plan(LMAtlasPlan(LMAtlasParams(centre_um=centre, diameter_um=700.0, focus_points=3,
                                       search_range_um=12.0)), ctx)
    run_plan(SquareSelectionPlan(SquareSelectionParams(centre_um=centre, inspect=3,
                                                       min_beads=MIN_BEADS,
                                                       inspection=INSPECTION)), ctx)
    yield spec, lm, ctx
    lm.close()


def _truth_square(spec: Specimen, centre_um: list[float]) -> tuple[Square, float]:
    g = spec.truth.lm_stage_to_grid(np.asarray(centre_um))
    i, j = spec.square_at(g)
    sq = spec.square(int(i), int(j))
    return sq, float(np.hypot(*(g - np.asarray(sq.centre_um))))


def test_squares_found_on_the_bar_lattice(selected: Any) -> None:
    spec, _, ctx = selected
    found = ctx.result("squares/find")
    truth = [_truth_square(spec, s["centre_um"]) for s in found["squares"]]
    assert max(err for _, err in truth) < 1.5                   # centres, um
    assert len({(sq.i, sq.j) for sq, _ in truth}) == len(truth)  # one key per square
    whole = {(q.i, q.j) for q in spec.squares if not q.partial}
    assert whole <= {(sq.i, sq.j) for sq, _ in truth}
    for s, (sq, _) in zip(found["squares"], truth, strict=True):
        if sq.partial:
            assert s["partial"]


def test_broken_film_and_centre_mark_are_not_candidates(selected: Any) -> None:
    spec, _, ctx = selected
    found = ctx.result("squares/find")
    by_truth = {(_truth_square(spec, s["centre_um"])[0].i,
                 _truth_square(spec, s["centre_um"])[0].j): s for s in found["squares"]}
    broken = [q for q in spec.squares if q.state == SquareState.BROKEN and not q.partial]
    assert len(broken) == 2
    for q in broken:
        assert by_truth[(q.i, q.j)]["brightness_ratio"] > 1.016
        assert by_truth[(q.i, q.j)]["key"] not in found["candidates"]
    assert by_truth[(0, 0)]["interior_metal"] > 0.05          # the finder 'F'
    assert by_truth[(0, 0)]["key"] not in found["candidates"]


def test_selection_picks_squares_with_cells_and_beads(selected: Any) -> None:
    spec, _, ctx = selected
    sel = ctx.result("squares/select")
    assert sel["how"] == "automatic" and 1 <= len(sel["selected"]) <= 2
    for s in sel["selected"]:
        sq, _ = _truth_square(spec, s["centre_um"])
        assert sq.state == SquareState.OK and not sq.partial and sq.cell_ids
        insp = ctx.result(f"lm-inspect/{s['key']}")["scores"]
        assert insp["film_ok"] and insp["beads_off_cell"] >= MIN_BEADS
        assert 1 <= insp["cells"] <= 2 and insp["metal_fraction"] < 0.05
        assert insp["periphery_in_beads"] >= 0.6
        assert any("off the cell" in r for r in s["reasons"])
    ranked = sel["ranking"]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)


def test_operator_override_replaces_the_choice(selected: Any) -> None:
    spec, _, ctx = selected
    found = ctx.result("squares/find")
    pick = next(s["key"] for s in found["squares"]
                if not s["partial"] and s["key"] not in found["candidates"][:3])
    params = SquareSelectionParams(centre_um=grid_centre(spec), inspect=0, override=(pick,),
                                   prefix="squares-op", inspect_prefix="lm-inspect-op",
                                   inspection=INSPECTION)
    run_plan(SquareSelectionPlan(params), ctx)
    sel = ctx.result("squares-op/select")
    assert sel["how"] == "override" and [s["key"] for s in sel["selected"]] == [pick]
    assert ctx.store.get(f"lm-inspect-op/{pick}") is not None     # still inspected, for the record
    bad = params.model_copy(update={"override": ("sq+9+9",), "prefix": "squares-bad"})
    with pytest.raises(InvalidStep, match="sq\\+9\\+9"):
        run_plan(SquareSelectionPlan(bad), ctx)


def test_centre_mark_shows_as_metal_at_100x(selected: Any) -> None:
    """Even when an operator asks for it, the centre-mark square is measured as metal and
    never ranks as usable."""
    spec, _, ctx = selected
    found = ctx.result("squares/find")
    centre_key = next(s["key"] for s in found["squares"]
                      if _truth_square(spec, s["centre_um"])[0].i == 0
                      and _truth_square(spec, s["centre_um"])[0].j == 0)
    params = SquareSelectionParams(centre_um=grid_centre(spec), inspect=0,
                                   override=(centre_key,), prefix="squares-f",
                                   inspect_prefix="lm-inspect-f", inspection=INSPECTION)
    run_plan(SquareSelectionPlan(params), ctx)
    scores = ctx.result(f"lm-inspect-f/{centre_key}")["scores"]
    assert scores["metal_fraction"] > 0.1
    row = next(r for r in ctx.result("squares-f/select")["ranking"] if r["key"] == centre_key)
    assert row["score"] == 0.0 and any("metal" in r for r in row["reasons"])


def _scores(**changes: Any) -> dict[str, Any]:
    base = {"beads": 8, "beads_off_cell": 8, "cells": 1, "centre_cell_fraction": 0.6,
            "centre_periphery_fraction": 0.5, "film_ratio": 50.0, "film_ok": True,
            "focus_z_um": 0.0, "metal_fraction": 0.0, "periphery_in_beads": 0.9}
    return {**base, **changes}


@pytest.mark.parametrize(("changes", "meets", "usable"), [
    ({}, True, True),
    ({"periphery_in_beads": 0.3}, False, True),          # beads all on one side of the cell
    ({"beads_off_cell": 2}, False, True),                # most beads under the cell
    ({"metal_fraction": 0.2}, False, False),             # the centre mark
    ({"film_ok": False, "film_ratio": 1.2}, False, False),
    ({"cells": 0}, False, False),
], ids=["good", "beads-one-side", "beads-under-cell", "metal", "torn", "no-cell"])
def test_ranking_wants_beads_around_the_cell(changes: dict[str, Any], meets: bool,
                                             usable: bool) -> None:
    site = SquareSite("sq+1+1", 1, 1, (0.0, 0.0), 1.0, partial=False)
    good = SquareSite("sq+2+1", 2, 1, (125.0, 0.0), 1.0, partial=False)
    p = SquareSelectionParams()
    rows = {r["key"]: r for r in rank_squares([site, good], {"sq+1+1": _scores(**changes),
                                                             "sq+2+1": _scores()}, p)}
    row = rows["sq+1+1"]
    assert row["meets_criteria"] == meets and (row["score"] > 0) == usable, row["reasons"]
    assert rows["sq+2+1"]["score"] >= row["score"]


def test_an_inspected_square_the_atlas_refused_stays_refused() -> None:
    rim = SquareSite("sq+5+0", 5, 0, (0.0, 0.0), 0.6, partial=True)
    row = rank_squares([rim], {"sq+5+0": _scores()}, SquareSelectionParams())[0]
    assert row["score"] == 0.0 and not row["meets_criteria"]
    assert any("rim" in r for r in row["reasons"])
