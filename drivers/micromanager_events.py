"""useq-schema events -> pycromanager acquisition events, and the time groups they run in.

A run is planned completely before the first frame: every ``useq.MDAEvent`` becomes a
frozen ``PlannedEvent`` with clemd's names resolved (channel -> Micro-Manager preset,
exposure in seconds, a missing x or y filled from the stage), so nothing is looked up while
the acquisition engine is running.

Waiting for ``min_start_time`` goes through clemd's Clock rather than pycromanager's engine
(which waits on wall time), so events are cut into *time groups*: consecutive events that
share a start time. Each group is handed to the engine in one call, which lets the engine
merge it into a hardware sequence (a 100-frame burst runs as one camera sequence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from drivers.base import Channel
from drivers.errors import InvalidState

if TYPE_CHECKING:
    import useq

__all__ = [
    "EVENT_AXIS", "PlannedEvent", "plain_index", "plan_events", "time_groups", "to_pycromanager",
]

#: The pycromanager axis that carries an event's position in the run, so each frame that
#: comes back is matched to the event that asked for it, whatever the engine merged.
EVENT_AXIS = "clemd_event"


@dataclass(frozen=True)
class PlannedEvent:
    """One frame to acquire, in clemd's units (um, s) with the Micro-Manager preset resolved."""

    number: int
    index: dict[str, int]
    channel: Channel
    group: str
    preset: str
    set_channel: bool
    exposure_s: float
    x_um: float | None
    y_um: float | None
    z_um: float | None
    min_start_time_s: float | None
    reset_timer: bool
    properties: tuple[tuple[str, str, str], ...] = ()


def plan_events(events: Sequence[useq.MDAEvent], channels: Mapping[str, Channel],
                presets: Mapping[str, tuple[str, str]], current_channel: str,
                start_xy: tuple[float, float]) -> list[PlannedEvent]:
    """Resolve every event; the caller has already checked channels and limits.

    An event without a channel uses ``current_channel`` without switching presets; an event
    with only one of x and y keeps the other from the previous event (or ``start_xy``).
    Raises ``InvalidState`` for event features this driver does not run (actions other than
    acquiring an image, SLM patterns, camera ROIs), rather than ignoring them.
    """
    planned = []
    x_prev, y_prev = start_xy
    for number, ev in enumerate(events):
        _refuse_unsupported(ev)
        name = current_channel if ev.channel is None else ev.channel.config
        channel = channels[name]
        group, preset = presets[name]
        x = y = None
        if ev.x_pos is not None or ev.y_pos is not None:
            x = x_prev if ev.x_pos is None else float(ev.x_pos)
            y = y_prev if ev.y_pos is None else float(ev.y_pos)
            x_prev, y_prev = x, y
        planned.append(PlannedEvent(
            number=number, index=plain_index(ev.index), channel=channel, group=group, preset=preset,
            set_channel=ev.channel is not None,
            exposure_s=channel.exposure_s if ev.exposure is None else ev.exposure / 1000.0,
            x_um=x, y_um=y, z_um=None if ev.z_pos is None else float(ev.z_pos),
            min_start_time_s=None if ev.min_start_time is None else float(ev.min_start_time),
            reset_timer=bool(ev.reset_event_timer),
            properties=tuple((p.device_name, p.property_name, str(p.property_value))
                             for p in (ev.properties or ())),
        ))
    return planned


def plain_index(index: Mapping[Any, int]) -> dict[str, int]:
    """useq's index keyed by plain strings ("t", "c", ...) rather than its Axis enum, so
    images compare, print and serialise the same whichever backend made them."""
    return {str(getattr(k, "value", k)): int(v) for k, v in index.items()}


def _refuse_unsupported(ev: useq.MDAEvent) -> None:
    action = getattr(ev.action, "type", "acquire_image")
    if action != "acquire_image":
        raise InvalidState(f"event {dict(ev.index)}: action {action!r} is not supported by the "
                           f"Micro-Manager driver; call autofocus() between runs instead")
    if ev.slm_image is not None:
        raise InvalidState(f"event {dict(ev.index)}: SLM patterns are not supported")
    if getattr(ev, "roi", None) is not None:
        raise InvalidState(f"event {dict(ev.index)}: camera ROIs are not supported")


def to_pycromanager(p: PlannedEvent) -> dict[str, Any]:
    """The pycromanager event dict for ``p``.

    Without ``min_start_time`` (the Clock waits) and without ``properties``: the driver sets
    those itself from a hook, because pycromanager 1.0.2's engine loses the exception of a
    failed property (the run just stops delivering frames).
    """
    event: dict[str, Any] = {"axes": {EVENT_AXIS: p.number}, "exposure": p.exposure_s * 1000.0}
    if p.set_channel:
        event["config_group"] = [p.group, p.preset]
    if p.x_um is not None and p.y_um is not None:
        event["x"] = p.x_um
        event["y"] = p.y_um
    if p.z_um is not None:
        event["z"] = p.z_um
    return event


def time_groups(planned: Sequence[PlannedEvent]) -> list[list[PlannedEvent]]:
    """Cut the run where the start time changes or the event timer is reset.

    An event without ``min_start_time`` joins the group before it: it has no time to wait
    for, so it runs as soon as its predecessor has. An event that sets device properties
    runs alone: pycromanager's engine merges events into a hardware sequence without
    looking at their properties, and a merged event's properties are never set.
    """
    groups: list[list[PlannedEvent]] = []
    for p in planned:
        if groups and not p.reset_timer and not p.properties \
                and not groups[-1][-1].properties and (
                    p.min_start_time_s is None
                    or p.min_start_time_s == groups[-1][0].min_start_time_s):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups
