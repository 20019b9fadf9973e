"""The time-lapse's events: grouped into one step per (position, time point), and run.

Why a module of its own: how events become steps, how a group reaches its first frame on
schedule and how drift is reported are the time-lapse's timing rules, independent of its
parameters and of the plan that journals them (protocols/time_lapse.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import useq

from drivers.base import Image, LightMicroscope
from protocols.plan import InvalidStep, StepResult

__all__ = ["EventGroup", "drift_report", "final_events", "group_events", "prime", "run_group"]


@dataclass(frozen=True)
class EventGroup:
    """The events of one position at one time point: one step, one file."""

    p: int
    t: int
    events: tuple[useq.MDAEvent, ...]

    @property
    def min_start_s(self) -> float:
        ms = self.events[0].min_start_time
        return 0.0 if ms is None else float(ms)


def group_events(sequence: useq.MDASequence) -> list[EventGroup]:
    """Split a sequence into (position, time point) groups in acquisition order.

    Raises InvalidStep if one (p, t) is split by another (an axis order with channel or z
    outside position or time), because a time point must be one step to be resumable.
    """
    groups: list[EventGroup] = []
    seen: set[tuple[int, int]] = set()
    current: list[useq.MDAEvent] = []
    key: tuple[int, int] | None = None
    for ev in sequence:
        k = (int(ev.index.get("p", 0)), int(ev.index.get("t", 0)))
        if k != key:
            if key is not None:
                groups.append(EventGroup(key[0], key[1], tuple(current)))
            if k in seen:
                raise InvalidStep(f"axis order {''.join(sequence.axis_order)!r} interleaves "
                                  f"position {k[0]} time point {k[1]} with other events; put "
                                  "'t' and 'p' before 'c' and 'z'")
            seen.add(k)
            key, current = k, []
        current.append(ev)
    if key is not None:
        groups.append(EventGroup(key[0], key[1], tuple(current)))
    return groups


def final_events(last: EventGroup, channels: Sequence[str]) -> list[useq.MDAEvent]:
    """The last time point's z planes with ``channels`` (exposures as in the sequence)."""
    zs = sorted({float(e.z_pos) for e in last.events if e.z_pos is not None})
    exposure = {e.channel.config: e.exposure for e in last.events if e.channel is not None}
    ev0 = last.events[0]
    out = []
    for c, ch in enumerate(channels):
        planes: list[float | None] = list(zs) if zs else [None]   # no z plan: one plane
        for z, zp in enumerate(planes):
            out.append(useq.MDAEvent.model_validate({
                "index": {"p": last.p, "t": 0, "c": c, "z": z}, "channel": {"config": ch},
                "exposure": exposure.get(ch), "x_pos": ev0.x_pos, "y_pos": ev0.y_pos,
                "z_pos": zp}))
    return out


def prime(lm: LightMicroscope, first: useq.MDAEvent) -> None:
    """Move stage and focus and set the channel of a time point's first frame, before its wait.

    Why: the schedule is kept by first frames (``drift_report``). A time point that moves and
    changes the filter after its planned start exposes one filter change (0.1-0.2 s on a Ti2
    turret) or one move later than a time point that finds the instrument ready, which is
    drift the interval does not have. Primed during the idle time before the start, every
    time point's first exposure begins on schedule; ``run_events`` then finds nothing to
    change for the first event.
    """
    lm.apply_event(first)


def run_group(lm: LightMicroscope, events: Sequence[useq.MDAEvent], due_s: float) -> list[Image]:
    """Run events through the driver, starting no earlier than ``due_s`` on its clock.

    The wait is the driver's (``min_start_time`` relative to the call), so an abort ends it;
    every event of the group gets the same value so the driver waits once.
    """
    wait = max(0.0, due_s - lm.clock.now())
    evs = [e.model_copy(update={"min_start_time": wait, "reset_event_timer": False})
           for e in events]
    images = list(lm.run_events(evs))
    if len(images) != len(evs):
        raise InvalidStep(f"driver returned {len(images)} frames for {len(evs)} events")
    return images


def drift_report(rows: list[StepResult], min_start_s: list[float], tolerance_s: float
                 ) -> dict[str, Any]:
    """Interval drift per time point: first-frame time minus the position's first
    first-frame time minus the planned offset; lateness at the start; late and missed lists."""
    first_frame: dict[int, tuple[float, float]] = {}
    per_point = []
    for r, ms in zip(rows, min_start_s, strict=True):
        drift: float | None = None
        if r["status"] == "acquired":
            ref = first_frame.setdefault(int(r["p"]), (float(r["first_frame_s"]), ms))
            drift = float(r["first_frame_s"]) - ref[0] - (ms - ref[1])
        per_point.append({"p": r["p"], "t": r["t"], "status": r["status"],
                          "late_s": r["late_s"], "drift_s": drift})
    drifts = np.array([abs(x["drift_s"]) for x in per_point if x["drift_s"] is not None])
    return {
        "time_points": len(rows),
        "acquired": sum(r["status"] == "acquired" for r in rows),
        "missed": [[r["p"], r["t"]] for r in rows if r["status"] == "missed"],
        "late": [[r["p"], r["t"]] for r in rows if r["late_s"] > tolerance_s],
        "max_abs_drift_s": float(drifts.max()) if drifts.size else 0.0,
        "mean_abs_drift_s": float(drifts.mean()) if drifts.size else 0.0,
        "max_late_s": max((float(r["late_s"]) for r in rows), default=0.0),
        "per_time_point": per_point,
    }
