"""The AutoCLEM session as one resumable plan: LM phase, operator checkpoint, EM phase, report.

AutoCLEM (docs/clem-workflow.md) is a chain of protocols that each exist on their own; this
plan chains them with ``yield from``, keeping their step keys, so that the journal of a
session reads as the workflow does and a restarted service resumes at the first step not
committed, whichever protocol it belongs to:

- LM: ``lm-atlas/...``, ``squares/find``, ``lm-inspect/<square>``, ``squares/select``,
  ``timelapse/pK/tTT`` and ``timelapse/pK/final`` (position K = the K-th chosen square, at
  the focus its inspection found), ``timelapse/summary``, ``targets/pK`` (target extraction,
  protocols/target_extraction.py: visits registered to each other, static viruses, targets
  inside the beads first, positions in the final bead set's pixels);
- ``checkpoint/freeze-and-load``: an operator checkpoint (plunge-freeze, load into the EM);
  its action, run once confirmed, fixes the session's target list: the proposals plus the
  targets clients submitted until then (the grid is frozen, LM targets can no longer change);
- EM: ``em-atlas/...``, ``correlate/atlas`` (LM atlas <-> EM atlas: the chosen squares' EM
  stage centres), per square mapped: ``square-<id>/map/...`` then ``correlate/square-<id>``
  (the final 405 image <-> the square map by beads), ``targets/transfer`` (every target to EM
  stage with its predicted error, or a reason why not), per target ``target-<id>/...``
  (eucentric height, realign, one step per tilt, stack), ``em-navigator/write``,
  ``report/write``.

Every step's result carries ``timing`` (wall seconds in its action, seconds the clock
advanced): the report compares them per stage with AutoCLEM's. A target whose realignment
cannot find the map is skipped with its reason and the session goes on; a square the atlas
or the beads cannot place skips its targets the same way. Decisions read committed results
only, so a replayed plan decides what it decided before.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from drivers.base import LimitViolation
from protocols.autoclem_correlate import (
    TRANSFER_KEY,
    correlate_atlas,
    correlate_square,
    freeze_and_load,
    transfer_targets,
)
from protocols.autoclem_params import AutoCLEMParams
from protocols.autoclem_report import write_session_report
from protocols.em_align import AlignmentError
from protocols.em_atlas import EMAtlasPlan
from protocols.em_navigator import EMNavigatorParams, EMNavigatorPlan
from protocols.lm_atlas import LMAtlasPlan
from protocols.plan import InvalidStep, Plan, Step, StepContext, StepResult
from protocols.realign import RealignError
from protocols.square_map import SquareMapPlan, SquareSpec
from protocols.square_selection import SquareSelectionPlan
from protocols.target_extraction import TargetExtractionPlan
from protocols.tilt_schemes import check_limits
from protocols.tilt_series import TargetSpec, TiltSeriesPlan
from protocols.time_lapse import StagePositionUm, TimeLapsePlan

__all__ = ["ATLAS_CORRELATION_KEY", "CHECKPOINT_KEY", "REPORT_KEY", "AutoCLEMPlan",
           "ClientTargets", "clemd_templates"]

log = structlog.get_logger(__name__)

CHECKPOINT_KEY = "checkpoint/freeze-and-load"
ATLAS_CORRELATION_KEY = "correlate/atlas"
REPORT_KEY = "report/write"

#: The session's client-submitted targets (daemon/templates.py SessionEnv.targets).
ClientTargets = Callable[[], list[dict[str, Any]]]

#: Failures of one target's realignment that skip that target, not the session.
SKIPPABLE = (RealignError, AlignmentError)


def _no_client_targets() -> list[dict[str, Any]]:
    return []


class AutoCLEMPlan(Plan):
    """The AutoCLEM session; see the module docstring for its steps."""

    name = "autoclem"

    def __init__(self, params: AutoCLEMParams,
                 client_targets: ClientTargets = _no_client_targets) -> None:
        self.p = params
        self.client_targets = client_targets

    def validate(self, ctx: StepContext) -> None:
        """Refuse before anything moves what can be checked now: both instruments, the
        atlases' extent, every channel the LM phase uses, the tilt range and low-dose areas.
        Squares and targets are checked by their own plans when they are known."""
        lm, em = ctx.require_lm(), ctx.require_em()
        LMAtlasPlan(self.p.lm_atlas).validate(ctx)
        EMAtlasPlan(self.p.em_atlas).validate(ctx)
        live = self.p.live
        sel = self.p.selection()
        needed = {*live.channels, *live.final_channels, live.focus_channel,
                  self.p.correlation.bead_channel, self.p.correlation.atlas_channel,
                  sel.inspection.dic_channel, sel.inspection.bead_channel,
                  sel.inspection.cell_channel, self.p.target_extraction.channel}
        for ch in sorted(needed):
            if ch not in lm.channels:
                raise LimitViolation(f"autoclem: channel {ch!r} not available "
                                     f"(lm.channels: {sorted(lm.channels)})")
        if self.p.correlation.bead_channel not in live.final_channels:
            raise LimitViolation(f"autoclem: correlation.bead_channel "
                                 f"{self.p.correlation.bead_channel!r} is not in "
                                 f"live.final_channels {list(live.final_channels)}")
        for obj in (live.objective, sel.inspection.objective):
            if obj not in lm.objectives:
                raise LimitViolation(f"autoclem: objective {obj!r} not available "
                                     f"(lm.objectives: {sorted(lm.objectives)})")
        check_limits(self.p.tilt_scheme.to_scheme(), em.tilt_limits)
        dummy = self.p.tilts((TargetSpec(id="check", x_um=0.0, y_um=0.0),))
        for area in (dummy.track_area, dummy.record_area, self.p.square_maps.area):
            if area not in em.low_dose:
                raise LimitViolation(f"low-dose area {area.name} is not configured "
                                     "(em.low_dose)")

    def total_steps(self, ctx: StepContext) -> int | None:
        """An estimate for progress bars, exact for what is decided: each sub-plan's own count,
        with the squares inspected, chosen and mapped and the targets transferred taken from
        committed results once they exist and from the params before (``n_squares`` squares,
        ``max_targets_per_square`` each; a target whose realign was skipped counts only the
        steps it ran). The runner asks again after every step, so the total sharpens as
        the session decides."""
        p = self.p
        store = ctx.store
        sel = p.selection()
        n = _count(LMAtlasPlan(p.lm_atlas), ctx)
        found = store.get(f"{sel.prefix}/find")
        inspected = (len([k for k in found["candidates"] if k not in sel.exclude][:sel.inspect])
                     if found is not None else sel.inspect)
        n += 2 + max(inspected, len(sel.override or ()))
        chosen = store.get(f"{sel.prefix}/select")
        squares = len(chosen["selected"]) if chosen is not None else p.n_squares
        dummy = tuple(StagePositionUm(name=f"p{k}", x_um=0.0, y_um=0.0,
                                      z_um=None if p.live.refocus else 0.0)
                      for k in range(max(squares, 1)))
        n += _count(TimeLapsePlan(p.live.to_params(dummy)), ctx) + squares + 1
        n += _count(EMAtlasPlan(p.em_atlas), ctx) + 1
        atlas = store.get(ATLAS_CORRELATION_KEY)
        mapped = (sum(sq["status"] == "ok" for sq in atlas["squares"]) if atlas is not None
                  else squares)
        one = SquareSpec(id="estimate", x_um=0.0, y_um=0.0)
        n += mapped * (_count(SquareMapPlan(p.square_maps.to_params(one)), ctx) + 1) + 1
        per_target = _count(TiltSeriesPlan(p.tilts((TargetSpec(id="estimate", x_um=0.0,
                                                                y_um=0.0),))), ctx)
        n += self._target_steps(ctx, squares, per_target) + 2
        return n

    def _target_steps(self, ctx: StepContext, squares: int, per_target: int) -> int:
        """Tilt-series steps: per transferred target, or the most there can be before."""
        transfer = ctx.store.get(TRANSFER_KEY)
        if transfer is None:
            fixed = ctx.store.get(CHECKPOINT_KEY)
            count = (len(fixed["targets"]) if fixed is not None
                     else squares * self.p.max_targets_per_square)
            return count * per_target
        total = 0
        for t in transfer["targets"]:
            if t["status"] != "transferred":
                continue
            done = [k for k in ("eucentric", "realign")
                    if ctx.store.get(f"target-{t['id']}/{k}") is not None]
            stopped = any(ctx.result(f"target-{t['id']}/{k}").get("status") == "skipped"
                          for k in done)
            total += len(done) if stopped else per_target
        return total

    # -- steps -------------------------------------------------------------------------------

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        keys: list[str] = []     # every key so far: the report's table of contents
        for step in self._steps(ctx, keys):
            keys.append(step.key)
            yield step

    def _steps(self, ctx: StepContext, keys: list[str]) -> Iterator[Step]:
        p = self.p
        yield from _timed(LMAtlasPlan(p.lm_atlas).steps(ctx))
        sel = p.selection()
        yield from _timed(SquareSelectionPlan(sel).steps(ctx))
        chosen = ctx.result(f"{sel.prefix}/select")["selected"]
        if not chosen:
            raise InvalidStep("no square was selected: nothing to image live (see "
                              f"{sel.prefix}/selection.json for the ranking)")
        positions = tuple(
            StagePositionUm(name=s["key"], x_um=float(s["centre_um"][0]),
                            y_um=float(s["centre_um"][1]),
                            z_um=None if p.live.refocus or s["focus_z_um"] is None
                            else float(s["focus_z_um"]))
            for s in chosen)
        lapse = TimeLapsePlan(p.live.to_params(positions))
        lapse.validate(ctx)
        yield from _timed(lapse.steps(ctx))
        yield from _timed(TargetExtractionPlan(p.extraction()).steps(ctx))
        yield Step(CHECKPOINT_KEY, _stamped(lambda c: freeze_and_load(c, p,
                                                                      self.client_targets)),
                   title="Plunge-freeze the grid and load it into the EM; confirm when loaded",
                   checkpoint=True)
        yield from self._em_phase(ctx, keys)

    def _em_phase(self, ctx: StepContext, keys: list[str]) -> Iterator[Step]:
        p = self.p
        yield from _timed(EMAtlasPlan(p.em_atlas).steps(ctx))
        yield Step(ATLAS_CORRELATION_KEY, _stamped(lambda c: correlate_atlas(c, p)),
                   title="Correlate the LM atlas with the EM atlas", estimate_s=30.0)
        squares = ctx.result(ATLAS_CORRELATION_KEY)["squares"]
        mapped: list[str] = []
        for sq in squares:
            if sq["status"] != "ok":
                continue
            spec = SquareSpec(id=sq["id"], x_um=float(sq["em_stage_um"][0]),
                              y_um=float(sq["em_stage_um"][1]))
            maps = SquareMapPlan(p.square_maps.to_params(spec))
            maps.validate(ctx)
            yield from _timed(maps.steps(ctx))
            mapped.append(sq["id"])
            yield Step(f"correlate/square-{sq['id']}", _stamped(_square_action(p, sq)),
                       title=f"Correlate beads of square {sq['key']}", estimate_s=20.0)
        yield Step(TRANSFER_KEY, _stamped(lambda c: transfer_targets(c, p)),
                   title="Transfer the targets to the EM stage", estimate_s=1.0)
        targets = [t for t in ctx.result(TRANSFER_KEY)["targets"]
                   if t["status"] == "transferred"]
        for t in targets:
            yield from self._tilt_series(ctx, t)
        nav = EMNavigatorPlan(EMNavigatorParams.model_validate({
            "atlas": True, "square_ids": mapped, "file_name": p.navigator_file,
            "targets": [{"id": t["id"], "x_um": t["em_stage_um"][0],
                         "y_um": t["em_stage_um"][1], "square_id": t["square_id"],
                         "note": f"predicted error {t['predicted_error_um'] * 1e3:.0f} nm"}
                        for t in targets]}))
        yield from _timed(nav.steps(ctx))
        yield Step(REPORT_KEY, _stamped(lambda c: write_session_report(c, p, list(keys))),
                   title="Write the session report", estimate_s=10.0)

    def _tilt_series(self, ctx: StepContext, t: dict[str, Any]) -> Iterator[Step]:
        """One target's tilt-series steps; stops after a realign (or eucentric) step that
        was skipped, since the tilts would image the wrong place."""
        spec = TargetSpec(id=t["id"], x_um=float(t["em_stage_um"][0]),
                          y_um=float(t["em_stage_um"][1]), square_id=t["square_id"])
        plan = TiltSeriesPlan(self.p.tilts((spec,)))
        plan.validate(ctx)
        guarded = {f"target-{spec.id}/eucentric", f"target-{spec.id}/realign"}
        for step in plan.steps(ctx):
            if step.key in guarded:
                yield dataclasses.replace(step, action=_stamped(_skippable(
                    step.action, spec.id, self.p.max_realign_change_um)))
                if ctx.result(step.key).get("status") == "skipped":
                    return
            else:
                yield dataclasses.replace(step, action=_stamped(step.action))


def _count(plan: Plan, ctx: StepContext) -> int:
    """A sub-plan's step count; plans that cannot tell count as none."""
    return plan.total_steps(ctx) or 0


def _square_action(p: AutoCLEMParams, square: dict[str, Any]
                   ) -> Callable[[StepContext], StepResult]:
    def run(ctx: StepContext) -> StepResult:
        return correlate_square(ctx, p, square)
    return run


def _skippable(action: Callable[[StepContext], StepResult], target_id: str,
               max_change_um: float) -> Callable[[StepContext], StepResult]:
    """Run ``action``; a realignment that cannot find its map, or whose last iteration still
    moved by more than ``max_change_um`` (not converged), becomes a committed skip."""
    def run(ctx: StepContext) -> StepResult:
        try:
            result = action(ctx)
        except SKIPPABLE as err:
            ctx.log.warning("autoclem.target_skipped", target=target_id, reason=str(err),
                            error_type=type(err).__name__)
            return {"status": "skipped", "reason": f"{type(err).__name__}: {err}"}
        change = result.get("residual_um")
        if "iterations" in result and change is not None and change > max_change_um:
            reason = (f"realign did not converge: last change {change * 1e3:.0f} nm > "
                      f"{max_change_um * 1e3:.0f} nm (max_realign_change_um)")
            ctx.log.warning("autoclem.target_skipped", target=target_id, reason=reason)
            return {**result, "status": "skipped", "reason": reason}
        return result
    return run


def _timed(steps: Iterator[Step]) -> Iterator[Step]:
    """The sub-plan's steps with their results stamped with timing (lazily, step by step)."""
    for step in steps:
        yield dataclasses.replace(step, action=_stamped(step.action))


def _stamped(action: Callable[[StepContext], StepResult]) -> Callable[[StepContext], StepResult]:
    """Add ``timing`` to a step's result: wall seconds spent in the action (compute, and the
    simulators' rendering on simulated instruments) and seconds the clock advanced
    (modelled instrument time on a VirtualClock, real time on a RealClock)."""
    def run(ctx: StepContext) -> StepResult:
        t0, c0 = time.perf_counter(), ctx.clock.now()
        result = action(ctx)
        if not isinstance(result, dict):
            return result      # run_plan refuses it with the step's key
        timing = {"compute_s": time.perf_counter() - t0, "hardware_s": ctx.clock.now() - c0}
        return {**result, "timing": timing}
    return run


def _factory(params: AutoCLEMParams, env: Any) -> Plan:
    """The service's factory: the session's submitted targets come from its environment."""
    return AutoCLEMPlan(params, env.targets)


def clemd_templates() -> list[tuple[Any, ...]]:
    """The ``autoclem`` template for daemon/templates.py (through protocols/templates.py)."""
    return [("autoclem", AutoCLEMParams, _factory, frozenset({"lm", "em"}),
             ("the AutoCLEM session: LM atlas, squares, live time-lapse, targets, operator "
              "checkpoint 'freeze and load', EM atlas, correlations, tilt series, report"))]
