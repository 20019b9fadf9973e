"""Live time-lapse at 100x: a useq-schema MDASequence, one journalled step per time point.

AutoCLEM step 4 (docs/clem-workflow.md): after the virus is added, each selected square is
imaged every 5 min for 40 min in 488 (virus) and 640 (cell tracker), an 8 um z-stack at 1 um
steps, then once more with 405 (beads) added for the correlation. The sequence is a
``useq.MDASequence`` (the field's standard; pymmcore-plus and Micro-Manager speak it), either
given by the client or built from those defaults, and it runs through the driver's
``run_events``.

Steps (keys under ``prefix``, default ``timelapse``):

- ``pP/focus`` for each position without a z: autofocus at 100x with 0.5 um steps; the
  sequence is then built with absolute z from the committed result, because the driver
  treats ``z_pos`` as absolute and a z plan around a position without z would be relative.
- ``pP/tTT``: the events of position P at time point TT, one OME-TIFF (C x Z planes).
- ``pP/final``: the same z-stack with ``final_channels`` (adds 405).
- ``summary``: interval drift and late/missed time points, as ``summary.json``.

Timing and resume. The first time-point step fixes the schedule origin (its start on the
clock, committed in its result); every later step waits on the clock until its planned start
(origin + the event's ``min_start_time`` + the position's own offset), through the driver so
an abort is not held up by the wait. Before that wait it moves to the first frame's position,
focus and channel (``prime``), so the first exposure of every time point starts on schedule
whatever the filter turret and stage had to do. A step that starts more than ``late_tolerance_s`` after
its planned start (after a pause, or a crash and resume) is *late*: it is logged and its
lateness recorded; with ``late_policy="skip_superseded"`` a time point whose successor is
already due is committed as *missed* (logged, counted in the summary, no file) instead of
being acquired back to back with it. Nothing is skipped silently, nothing is run twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import structlog
import useq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.base import LimitViolation
from protocols.lm_focus import focus_scan
from protocols.lm_io import image_record, save_images, write_json
from protocols.plan import InvalidStep, Plan, Step, StepContext, StepResult
from protocols.time_lapse_events import (
    EventGroup,
    drift_report,
    final_events,
    group_events,
    prime,
    run_group,
)

__all__ = ["EventGroup", "LatePolicy", "StagePositionUm", "TimeLapseParams", "TimeLapsePlan",
           "default_sequence", "group_events"]

log = structlog.get_logger(__name__)
LatePolicy = Literal["acquire", "skip_superseded"]


class StagePositionUm(BaseModel):
    """A position to image; ``z_um`` None means: find focus first (absolute focus-drive z)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("", max_length=64)
    x_um: float
    y_um: float
    z_um: float | None = None


class TimeLapseParams(BaseModel):
    """A live time-lapse. Defaults are the AutoCLEM paper's (488 + 640 every 5 min for
    40 min, 8 um z-stack at 1 um, then a set with 405 added).

    ``sequence`` (a useq MDASequence) replaces channels, timing, z plan and positions when
    given; positions in it without z are focused first, like ``positions`` without z.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["time_lapse"] = "time_lapse"
    positions: tuple[StagePositionUm, ...] = ()
    sequence: useq.MDASequence | None = None
    objective: str = Field("100x", min_length=1)
    channels: tuple[str, ...] = ("488", "640")
    interval_s: float = Field(300.0, gt=0, le=86400)
    duration_s: float = Field(2400.0, ge=0, le=7 * 86400)
    z_range_um: float = Field(8.0, ge=0, le=200)
    z_step_um: float = Field(1.0, gt=0, le=50)
    final_channels: tuple[str, ...] = ("488", "640", "405")
    focus_channel: str = Field("DIC", min_length=1)
    focus_centre_um: float | None = None
    focus_range_um: float = Field(16.0, gt=0, le=200)
    focus_step_um: float = Field(0.5, gt=0, le=10)
    late_policy: LatePolicy = "acquire"
    late_tolerance_s: float = Field(5.0, ge=0)
    prefix: str = Field("timelapse", pattern=r"^[a-z0-9][a-z0-9_/-]*$")

    @field_validator("sequence", mode="before")
    @classmethod
    def _sequence_from_json(cls, value: Any) -> Any:
        """Parse a sequence given as JSON with useq's own (lax) rules: the service validates
        params strictly, which would refuse useq's durations given as seconds."""
        if isinstance(value, dict):
            return useq.MDASequence.model_validate(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> TimeLapseParams:
        if self.sequence is None and not self.positions:
            raise ValueError("positions: give at least one position, or a sequence with "
                             "stage_positions")
        if self.sequence is not None:
            if self.positions:
                raise ValueError("positions: give positions or a sequence, not both (put the "
                                 "positions in sequence.stage_positions)")
            if not self.sequence.stage_positions:
                raise ValueError("sequence: stage_positions is empty; the time-lapse needs "
                                 "at least one absolute position")
            if self.sequence.grid_plan is not None or any(
                    p.sequence is not None for p in self.sequence.stage_positions):
                raise ValueError("sequence: grid plans and position sub-sequences are not "
                                 "supported; list every position in stage_positions")
        elif not self.channels:
            raise ValueError("channels: at least one channel is required")
        return self


def _positions(p: TimeLapseParams) -> list[StagePositionUm]:
    if p.sequence is None:
        return list(p.positions)
    return [StagePositionUm(name=sp.name or "", x_um=float(sp.x if sp.x is not None else 0.0),
                            y_um=float(sp.y if sp.y is not None else 0.0),
                            z_um=None if sp.z is None else float(sp.z))
            for sp in p.sequence.stage_positions]


def default_sequence(p: TimeLapseParams, positions: Sequence[StagePositionUm]
                     ) -> useq.MDASequence:
    """The sequence to run: ``p.sequence`` with focused z filled in, or one built from the
    paper's parameters. Every position must have a z by now."""
    if any(pos.z_um is None for pos in positions):
        raise InvalidStep("time-lapse positions need an absolute z before the sequence is built")
    stage = [{"x": pos.x_um, "y": pos.y_um, "z": pos.z_um, "name": pos.name or None}
             for pos in positions]
    if p.sequence is not None:
        return p.sequence.model_copy(update={"stage_positions": tuple(
            useq.Position.model_validate(s) for s in stage)})
    loops = round(p.duration_s / p.interval_s) + 1
    fields: dict[str, Any] = {
        "axis_order": "tpcz", "stage_positions": stage,
        "channels": [{"config": c} for c in p.channels],
        "time_plan": {"interval": p.interval_s, "loops": loops},
    }
    if p.z_range_um > 0:
        fields["z_plan"] = {"range": p.z_range_um, "step": p.z_step_um}
    return useq.MDASequence.model_validate(fields)


class TimeLapsePlan(Plan):
    """Focus, time points, final set and summary; see the module docstring."""

    name = "time_lapse"

    def __init__(self, params: TimeLapseParams) -> None:
        self.p = params

    def key(self, name: str) -> str:
        return f"{self.p.prefix}/{name}"

    def validate(self, ctx: StepContext) -> None:
        """Refuse before anything moves: objective, channels, positions and z limits."""
        lm = ctx.require_lm()
        if self.p.objective not in lm.objectives:
            raise LimitViolation(f"time-lapse objective {self.p.objective!r} not available "
                                 f"(lm.objectives: {sorted(lm.objectives)})")
        positions = _positions(self.p)
        needs_focus = any(pos.z_um is None for pos in positions)
        names = set(self.p.final_channels) | ({self.p.focus_channel} if needs_focus else set())
        if self.p.sequence is None:
            names |= set(self.p.channels)
        else:
            names |= {c.config for c in self.p.sequence.channels}
        for ch in sorted(names):
            if ch not in lm.channels:
                raise LimitViolation(f"time-lapse channel {ch!r} not available "
                                     f"(lm.channels: {sorted(lm.channels)})")
        # positions known now: check the whole sequence (z with a guess where focus is due)
        guess = [pos if pos.z_um is not None else pos.model_copy(update={"z_um": 0.0})
                 for pos in positions]
        sequence = default_sequence(self.p, guess)
        groups = group_events(sequence)
        events = [e for g in groups for e in g.events]
        if needs_focus:
            events = [e.model_copy(update={"z_pos": None}) for e in events]
            for pos in positions:
                lm.limits.check_xy(pos.x_um, pos.y_um)
        lm.validate_events(events)

    def total_steps(self, ctx: StepContext) -> int | None:
        positions = _positions(self.p)
        guess = [pos.model_copy(update={"z_um": 0.0}) for pos in positions]
        n_groups = len(group_events(default_sequence(self.p, guess)))
        n_focus = sum(pos.z_um is None for pos in positions)
        return n_focus + n_groups + (len(positions) if self.p.final_channels else 0) + 1

    # -- steps -------------------------------------------------------------------------------

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        p = self.p
        positions = _positions(p)
        focused = []
        for k, pos in enumerate(positions):
            if pos.z_um is None:
                yield Step(self.key(f"p{k}/focus"), self._focus_action(pos),
                           title=f"focus position {k}", estimate_s=10.0, instrument="lm")
                pos = pos.model_copy(update={"z_um": ctx.result(self.key(f"p{k}/focus"))["z_um"]})
            focused.append(pos)
        sequence = default_sequence(p, focused)
        groups = group_events(sequence)
        origin_key = self.key(f"p{groups[0].p}/t{groups[0].t:02d}")
        first_of: dict[int, EventGroup] = {}
        last_of: dict[int, EventGroup] = {}
        for g in groups:
            first_of.setdefault(g.p, g)
            last_of[g.p] = g
        for n, g in enumerate(groups):
            key = self.key(f"p{g.p}/t{g.t:02d}")
            schedule: dict[str, float] | None = None
            if key != origin_key:
                origin = float(ctx.result(origin_key)["schedule_origin_s"])
                first = first_of[g.p]
                offset = 0.0
                if g is not first:
                    offset = float(ctx.result(self.key(f"p{g.p}/t{first.t:02d}"))["offset_s"])
                schedule = {"origin_s": origin, "offset_s": offset}
            nxt = next((h for h in groups[n + 1:] if h.p == g.p), None)
            exposure = sum((e.exposure or 100.0) / 1000.0 for e in g.events)
            yield Step(key, self._group_action(g, schedule, g is first_of[g.p], nxt),
                       title=f"position {g.p} time point {g.t}",
                       estimate_s=exposure + 0.05 * len(g.events), instrument="lm")
        if p.final_channels:
            for pp in sorted(last_of):
                yield Step(self.key(f"p{pp}/final"), self._final_action(last_of[pp]),
                           title=f"final set at position {pp}", estimate_s=10.0,
                           instrument="lm")
        yield Step(self.key("summary"), self._summary_action(groups, sorted(last_of)),
                   title="time-lapse summary")

    def _focus_action(self, pos: StagePositionUm) -> Any:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            lm.set_objective(self.p.objective)
            lm.move_xy(pos.x_um, pos.y_um)
            centre = lm.position_z() if self.p.focus_centre_um is None else self.p.focus_centre_um
            scan = focus_scan(lm, self.p.focus_channel, centre, self.p.focus_range_um,
                              self.p.focus_step_um)
            ctx.log.info("timelapse.focus", x_um=pos.x_um, y_um=pos.y_um, z_um=round(scan.z_um, 3),
                         peak_ratio=round(scan.peak_ratio, 2))
            return {"xy_um": [pos.x_um, pos.y_um], "z_um": scan.z_um,
                    "peak_ratio": scan.peak_ratio}
        return action

    def _group_action(self, g: EventGroup, schedule: dict[str, float] | None, first: bool,
                      nxt: EventGroup | None) -> Any:
        p = self.p

        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            lm.set_objective(p.objective)
            prime(lm, g.events[0])
            now = ctx.clock.now()
            origin = now if schedule is None else schedule["origin_s"]
            offset = 0.0 if schedule is None else schedule["offset_s"]
            if first:        # a position's first time point fixes its own offset
                due = max(now, origin + g.min_start_s)
                offset = due - origin - g.min_start_s
            else:
                due = origin + g.min_start_s + offset
            late_s = max(0.0, now - due)
            base: dict[str, Any] = {
                "p": g.p, "t": g.t, "schedule_origin_s": origin, "offset_s": offset,
                "planned_start_s": due, "late_s": late_s,
                "late": late_s > p.late_tolerance_s}
            if base["late"]:
                ctx.log.warning("timelapse.late", p=g.p, t=g.t, late_s=round(late_s, 3))
                next_due = None if nxt is None else origin + nxt.min_start_s + offset
                if p.late_policy == "skip_superseded" and next_due is not None and now >= next_due:
                    ctx.log.warning("timelapse.missed", p=g.p, t=g.t, late_s=round(late_s, 3),
                                    reason="the next time point is already due")
                    return {**base, "status": "missed", "started_s": None, "frames": 0,
                            "artifacts": []}
            images = run_group(lm, g.events, due)
            rel = f"{self.key(f'p{g.p}/t{g.t:02d}')}.ome.tif"
            art = save_images(ctx, rel, images, "lm_timelapse", name=f"p{g.p} t{g.t}",
                              p=g.p, t=g.t)
            return {**base, "status": "acquired", "started_s": max(now, due),
                    "first_frame_s": images[0].time_s, "last_frame_s": images[-1].time_s,
                    "frames": len(images), "path": rel, "artifacts": [art],
                    "channels": sorted({im.channel or "" for im in images}),
                    "z_um": sorted({float(im.z_um) for im in images if im.z_um is not None}),
                    "stage_um": list(images[0].stage_um),
                    "pixel_to_stage": image_record(images[0])["pixel_to_stage"],
                    "frame": image_record(images[0])}
        return action

    def _final_action(self, last: EventGroup) -> Any:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            lm.set_objective(self.p.objective)
            events = final_events(last, self.p.final_channels)
            images = run_group(lm, events, ctx.clock.now())
            rel = f"{self.key(f'p{last.p}/final')}.ome.tif"
            art = save_images(ctx, rel, images, "lm_timelapse_final", name=f"p{last.p} final",
                              p=last.p)
            return {"p": last.p, "status": "acquired", "path": rel, "artifacts": [art],
                    "frames": len(images), "first_frame_s": images[0].time_s,
                    "channels": list(self.p.final_channels),
                    "z_um": sorted({float(im.z_um) for im in images if im.z_um is not None}),
                    "stage_um": list(images[0].stage_um),
                    "pixel_to_stage": image_record(images[0])["pixel_to_stage"],
                    "frame": image_record(images[0])}
        return action

    def _summary_action(self, groups: list[EventGroup], positions: list[int]) -> Any:
        def action(ctx: StepContext) -> StepResult:
            rows = [ctx.result(self.key(f"p{g.p}/t{g.t:02d}")) for g in groups]
            report = drift_report(rows, [g.min_start_s for g in groups], self.p.late_tolerance_s)
            art = write_json(ctx, self.key("summary.json"), report, "lm_timelapse_summary")
            ctx.log.info("timelapse.summary", **{k: v for k, v in report.items()
                                                 if not isinstance(v, (list, dict))})
            return {**report, "positions": positions, "artifacts": [art]}
        return action
