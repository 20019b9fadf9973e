"""Interrupting any EM protocol between steps and resuming completes it with no step run
twice; a tilt exposed before a crash is never exposed again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from em_sim import FINE_MAG_INDEX, MappedSquare, context, make_em

from protocols.em_atlas import EMAtlasParams, EMAtlasPlan
from protocols.em_navigator import EMNavigatorParams, EMNavigatorPlan
from protocols.plan import (
    MemoryStepStore,
    Paused,
    Plan,
    RunControl,
    Step,
    StepContext,
    StepResult,
    run_plan,
)
from protocols.square_map import SquareMapParams, SquareMapPlan
from protocols.tilt_series import TiltSeriesParams, TiltSeriesPlan, tilt_key
from simulators.specimen import Specimen

TRACK = {"mag_index": FINE_MAG_INDEX, "dose_rate_e_per_a2_s": 1.0, "defocus_offset_um": -30.0}
FINE = {"mag_index": FINE_MAG_INDEX, "dose_rate_e_per_a2_s": 0.1, "defocus_offset_um": -10.0}


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=4)


def run_with_pause_after_every_step(plan: Plan, ctx: StepContext) -> list[str]:
    """Pause at every step boundary, resume, until done; return keys in the order started."""
    started: list[str] = []
    control = RunControl()

    def pause(_: Any) -> None:
        control.request_pause()

    def start(step: Step) -> None:
        started.append(step.key)

    for _ in range(1000):
        try:
            run_plan(plan, ctx, control, on_progress=pause, on_step_start=start)
            return started
        except Paused:
            control.clear_pause()
    raise AssertionError("plan never finished")


def tilt_plan(mapped: MappedSquare, **changes: Any) -> TiltSeriesPlan:
    nominal, _ = mapped.target((3.0, 2.0))
    return TiltSeriesPlan(TiltSeriesParams.model_validate({
        "targets": [{"id": "t1", "x_um": float(nominal[0]), "y_um": float(nominal[1]),
                     "square_id": "m"}],
        "scheme": {"kind": "bidirectional", "min_deg": -12, "max_deg": 12, "step_deg": 6},
        "realign": {"fine": FINE}, "track_settings": TRACK, **changes}))


PlanFactory = Callable[[MappedSquare], Plan]
PLANS: dict[str, PlanFactory] = {
    "em-atlas": lambda m: EMAtlasPlan(EMAtlasParams(centre_um=tuple(m.centre),
                                                    grid_radius_um=150.0)),
    "square-map": lambda m: SquareMapPlan(SquareMapParams(
        squares=({"id": "r", "x_um": m.centre[0] + 20, "y_um": m.centre[1]},), tiles_xy=(2, 2))),
    "tilt-series": tilt_plan,
    "navigator": lambda m: EMNavigatorPlan(EMNavigatorParams(atlas=False, square_ids=("m",))),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_resume_after_every_step_runs_each_step_once(spec: Specimen, tmp_path: Path,
                                                     name: str) -> None:
    mapped = MappedSquare(make_em(spec), spec, tmp_path, tiles_xy=(2, 2))
    plan = PLANS[name](mapped)
    ctx = context(mapped.em, tmp_path, mapped.store)
    before = len(mapped.store.order)
    started = run_with_pause_after_every_step(plan, ctx)
    all_keys = [s.key for s in plan.steps(ctx)]
    assert started == all_keys                         # each once, in order, none lost
    assert mapped.store.order[before:] == all_keys
    if name == "tilt-series":
        records = [e for e in mapped.em.dose.exposures if e.area == "R"]
        assert len(records) == 5


class FailOnce(MemoryStepStore):
    """A store whose commit of one key fails once: a crash after the step, before commit."""

    def __init__(self, base: MemoryStepStore, key: str) -> None:
        super().__init__()
        for k in base.order:
            base_result = base.get(k)
            assert base_result is not None
            super().put(k, base_result)
        self.key, self.failed = key, False

    def put(self, key: str, result: StepResult) -> None:
        if key == self.key and not self.failed:
            self.failed = True
            raise OSError("power cut before the journal commit")
        super().put(key, result)


def test_tilt_exposed_before_a_crash_is_not_exposed_again(spec: Specimen, tmp_path: Path) -> None:
    mapped = MappedSquare(make_em(spec), spec, tmp_path, tiles_xy=(2, 2))
    store = FailOnce(mapped.store, tilt_key("t1", 6.0))
    ctx = context(mapped.em, tmp_path, store)
    plan = tilt_plan(mapped)
    with pytest.raises(OSError, match="power cut"):
        run_plan(plan, ctx)
    run_plan(plan, ctx)
    records = [e for e in mapped.em.dose.exposures if e.area == "R"]
    assert len(records) == 5                           # five tilts, five exposures
    assert ctx.result("target-t1/stack")["n_tilts"] == 5


def test_tilt_lost_between_exposure_and_save_is_reported_not_repeated(
        spec: Specimen, tmp_path: Path) -> None:
    mapped = MappedSquare(make_em(spec), spec, tmp_path, tiles_xy=(2, 2))
    store = FailOnce(mapped.store, tilt_key("t1", 6.0))
    ctx = context(mapped.em, tmp_path, store)
    plan = tilt_plan(mapped)
    with pytest.raises(OSError):
        run_plan(plan, ctx)
    # the crash came before the frame reached the disk: only the exposure marker survives
    for f in (tmp_path / "target-t1").glob("tilt-001_+06.0*"):
        if not f.name.endswith(".exposing"):
            f.unlink()
    run_plan(plan, ctx)
    stack = ctx.result("target-t1/stack")
    assert stack["lost_tilts_deg"] == [6.0] and stack["n_tilts"] == 4
    assert stack["total_dose_e_per_a2"] == pytest.approx(100.0, rel=1e-6)   # lost dose counted
    assert len([e for e in mapped.em.dose.exposures if e.area == "R"]) == 5
