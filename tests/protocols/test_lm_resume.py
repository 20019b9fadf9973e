"""Interrupt every LM protocol between steps (pause, or the service killed after a commit),
resume with a fresh plan object, and check that it completes with no step run twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lm_sim import CrashingStore, context, grid_centre, run_to_end, scope, small_grid, virus_site

from protocols.lm_atlas import LMAtlasParams, LMAtlasPlan
from protocols.lm_inspection import InspectionParams
from protocols.plan import MemoryStepStore, Plan, StepContext, run_plan
from protocols.square_selection import SquareSelectionParams, SquareSelectionPlan
from protocols.target_extraction import TargetExtractionParams, TargetExtractionPlan
from protocols.time_lapse import StagePositionUm, TimeLapseParams, TimeLapsePlan


class LMSession(Plan):
    """Atlas, square selection, time-lapse at the chosen square and targets, as one plan
    (what the AutoCLEM session does with them)."""

    name = "lm_session"

    def __init__(self, centre: tuple[float, float], site: tuple[float, float]) -> None:
        self.atlas = LMAtlasPlan(LMAtlasParams(centre_um=centre, diameter_um=300.0,
                                               overlap=0.2, focus_points=3,
                                               search_range_um=12.0))
        self.squares = SquareSelectionParams(
            centre_um=centre, inspect=1, min_beads=0, fill_below_criteria=True,
            inspection=InspectionParams(focus_range_um=4.0, z_range_um=2.0))
        self.site = site

    def steps(self, ctx: StepContext) -> Any:
        yield from self.atlas.steps(ctx)
        yield from SquareSelectionPlan(self.squares).steps(ctx)
        x, y = self.site
        lapse = TimeLapseParams(positions=(StagePositionUm(x_um=x, y_um=y, z_um=0.0),),
                                interval_s=60.0, duration_s=180.0, z_range_um=2.0)
        yield from TimeLapsePlan(lapse).steps(ctx)
        yield from TargetExtractionPlan(TargetExtractionParams()).steps(ctx)


def _session(tmp_path: Path, store: Any) -> tuple[Callable[[], Plan], StepContext]:
    spec = small_grid(seed=3)
    lm = scope(spec, (256, 256), seed=5)
    ctx = context(lm, tmp_path, store)
    centre, site = grid_centre(spec), virus_site(spec)
    return (lambda: LMSession(centre, site)), ctx


def _reference_keys(tmp_path: Path) -> list[str]:
    make, ctx = _session(tmp_path / "ref", MemoryStepStore())
    run_plan(make(), ctx)
    return list(ctx.store.order)      # type: ignore[attr-defined]  # MemoryStepStore


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _reference_keys(tmp_path_factory.mktemp("reference"))


def test_reference_session_has_every_protocol(reference: list[str]) -> None:
    prefixes = {k.split("/")[0] for k in reference}
    assert prefixes == {"lm-atlas", "squares", "lm-inspect", "timelapse", "targets"}
    assert reference[-1] == "targets/p0" and "lm-atlas/stitch" in reference


@pytest.mark.parametrize("pause_every", [1, 6])
def test_pause_anywhere_and_resume(tmp_path: Path, reference: list[str],
                                   pause_every: int) -> None:
    make, ctx = _session(tmp_path, MemoryStepStore())
    started, interruptions = run_to_end(make, ctx, pause_every=pause_every)
    assert interruptions >= len(reference) // pause_every - 1
    assert started == reference                         # each step exactly once, in order
    assert ctx.store.order == reference                 # type: ignore[attr-defined]
    assert (tmp_path / "lm-atlas" / "atlas.ome.tif").is_file()
    assert (tmp_path / "targets" / "p0.json").is_file()


@pytest.mark.parametrize("crash_after", [2, 9, 31, 34],
                         ids=["focus", "tile", "inspection", "time-point"])
def test_killed_after_a_commit_resumes_where_it_stopped(tmp_path: Path, reference: list[str],
                                                        crash_after: int) -> None:
    """The service dies right after committing a focus point, a tile, an inspection
    or a time point (of 39 steps); 60 s pass before it is back, which can make
    a time point late: recorded, never lost."""
    store = CrashingStore(crash_after)
    make, ctx = _session(tmp_path, store)
    started, interruptions = run_to_end(make, ctx, downtime_s=60.0)
    assert interruptions == 1 and started == reference and store.order == reference
    assert store.order[crash_after - 1] == started[crash_after - 1]
    summary = ctx.result("timelapse/summary")
    assert summary["acquired"] == 4 and summary["missed"] == []
