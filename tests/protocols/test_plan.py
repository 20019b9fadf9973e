"""The plan runner: keyed steps, commit before done, resume without repeats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.base import Aborted, VirtualClock
from protocols.plan import (
    CheckpointWaiting, InvalidStep, MemoryStepStore, Paused, Plan, RunControl, Step,
    StepContext, StepResult, run_plan,
)


class Counting(Plan):
    """Five steps; step 3 reads step 1's result; step ``fail_at`` raises once."""

    name = "counting"

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def _act(self, key: str, value: int) -> Step:
        def action(ctx: StepContext) -> StepResult:
            self.calls.append(key)
            if key == self.fail_at:
                self.fail_at = None
                raise RuntimeError("instrument fell over")
            ctx.clock.sleep(10)
            return {"value": value}
        return Step(key=key, action=action, title=key)

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        yield self._act("a/1", 1)
        yield self._act("a/2", 2)
        first = ctx.result("a/1")["value"]
        yield self._act(f"b/{first}", 10 * first)
        yield Step("freeze", lambda c: {"ok": True}, title="freeze the grid", checkpoint=True)
        yield self._act("c", 3)

    def total_steps(self, ctx: StepContext) -> int | None:
        return 5


def _ctx(tmp_path: Path, store: MemoryStepStore | None = None) -> StepContext:
    return StepContext(clock=VirtualClock(), data_dir=tmp_path, store=store or MemoryStepStore())


def test_runs_in_order_and_waits_at_checkpoint(tmp_path: Path) -> None:
    plan, ctx, control = Counting(), _ctx(tmp_path), RunControl()
    with pytest.raises(CheckpointWaiting) as info:
        run_plan(plan, ctx, control)
    assert info.value.key == "freeze"
    assert plan.calls == ["a/1", "a/2", "b/1"]
    control.confirmed.add("freeze")
    progress = []
    ran = run_plan(plan, ctx, control, on_progress=progress.append)
    assert ran == ["freeze", "c"]
    assert plan.calls == ["a/1", "a/2", "b/1", "c"]
    assert progress[-1].done == 5 and progress[-1].total == 5


def test_failed_step_is_not_committed_and_reruns_once(tmp_path: Path) -> None:
    plan, store = Counting(fail_at="b/1"), MemoryStepStore()
    ctx, control = _ctx(tmp_path, store), RunControl()
    control.confirmed.add("freeze")
    with pytest.raises(RuntimeError):
        run_plan(plan, ctx, control)
    assert store.order == ["a/1", "a/2"]
    run_plan(plan, ctx, control)
    assert store.order == ["a/1", "a/2", "b/1", "freeze", "c"]
    assert plan.calls.count("a/1") == 1 and plan.calls.count("b/1") == 2


def test_pause_and_abort_land_at_boundaries(tmp_path: Path) -> None:
    plan, ctx, control = Counting(), _ctx(tmp_path), RunControl()
    control.request_pause()
    with pytest.raises(Paused):
        run_plan(plan, ctx, control)
    assert plan.calls == []
    control.clear_pause()
    control.request_abort("operator stopped the session")
    with pytest.raises(Aborted, match="operator stopped"):
        run_plan(plan, ctx, control)
    assert plan.calls == []


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    class Twice(Plan):
        def steps(self, ctx: StepContext) -> Iterator[Step]:
            yield Step("x", lambda c: {})
            yield Step("x", lambda c: {})

    with pytest.raises(InvalidStep, match="twice"):
        run_plan(Twice(), _ctx(tmp_path))


class Growing(Plan):
    """Decides how many steps follow from its first step's result (as squares chosen do)."""

    name = "growing"

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        yield Step("choose", lambda c: {"n": 4}, title="choose")
        for i in range(ctx.result("choose")["n"]):
            yield Step(f"work/{i}", lambda c: {}, title="work")

    def total_steps(self, ctx: StepContext) -> int | None:
        chosen = ctx.store.get("choose")
        return 1 + (chosen["n"] if chosen is not None else 2)     # an estimate before


def test_progress_total_sharpens_as_decisions_are_committed(tmp_path: Path) -> None:
    progress: list = []
    run_plan(Growing(), _ctx(tmp_path), on_progress=progress.append)
    assert [p.total for p in progress] == [5] * 5
    assert progress[-1].done == progress[-1].total == 5
