"""Handlers for the service as a whole: status, config, templates, devices, events, shutdown.

None of them touches hardware: device status comes from the instrument workers' snapshots
and limits from the drivers' configured (in-memory) tables.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from daemon.api_context import Call
from daemon.api_schema import (
    API_SCHEMA,
    ConfigResult,
    DeviceList,
    DevicesLimits,
    DeviceStatus,
    Empty,
    EventInfo,
    EventList,
    EventsList,
    LimitsResult,
    ShutdownResult,
    StatusResult,
    TemplateInfo,
    TemplateList,
)
from daemon.errors import NotFound
from daemon.events import envelope
from drivers.base import ElectronMicroscope, LightMicroscope, RealClock


def _devices(call: Call) -> list[DeviceStatus]:
    svc = call.services
    out = []
    for key, worker in svc.runner.workers.items():
        s = worker.status()
        out.append(DeviceStatus(name=s.name, kind=svc.instruments.kinds.get(key, "compute"),
                                worker=s.state.value, session_id=s.session_id, step=s.step,
                                busy_for_s=s.busy_for_s, calls=s.calls, last_error=s.last_error))
    return out


def status(call: Call, p: Empty) -> StatusResult:
    svc = call.services
    return StatusResult(
        service="clemd", version=svc.version, schema=API_SCHEMA,
        state="stopping" if svc.stopping() else "serving",
        uptime_s=time.monotonic() - svc.started_at,
        clock="real" if isinstance(svc.instruments.clock, RealClock) else "virtual",
        role=call.role.value, sessions=svc.journal.counts(),
        queue=[r.id for r in svc.runner.queue()], devices=_devices(call),
        last_event_seq=svc.journal.last_event_seq(), templates=sorted(svc.registry.templates),
        unavailable_templates=dict(svc.registry.unavailable))


def config(call: Call, p: Empty) -> ConfigResult:
    return ConfigResult(config=call.services.cfg.public_view())


def templates(call: Call, p: Empty) -> TemplateList:
    reg = call.services.registry
    return TemplateList(templates=[
        TemplateInfo(name=t.name, description=t.description,
                     params_schema=t.params_model.model_json_schema())
        for t in sorted(reg.templates.values(), key=lambda t: t.name)])


def devices(call: Call, p: Empty) -> DeviceList:
    return DeviceList(devices=_devices(call))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(getattr(k, "name", k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def limits(call: Call, p: DevicesLimits) -> LimitsResult:
    inst = call.services.instruments.get(p.device)
    if inst is None:
        raise NotFound(f"device {p.device} is not configured; devices: "
                       f"{call.services.instruments.names()}")
    out: dict[str, Any] = {"stage": _jsonable(inst.limits)}
    if isinstance(inst, LightMicroscope):
        out["objectives"] = _jsonable(dict(inst.objectives))
        out["channels"] = _jsonable(dict(inst.channels))
    if isinstance(inst, ElectronMicroscope):
        out["tilt"] = _jsonable(inst.tilt_limits)
        out["magnifications"] = _jsonable({str(k): v for k, v in inst.magnifications.items()})
        out["low_dose"] = _jsonable(inst.low_dose)
    return LimitsResult(device=p.device, limits=out)


def events(call: Call, p: EventsList) -> EventList:
    journal = call.services.journal
    rows = journal.events(p.after_seq, p.limit, p.topic_prefix, p.session_id)
    return EventList(events=[EventInfo.model_validate(envelope(r)) for r in rows],
                     last_seq=journal.last_event_seq())


def shutdown(call: Call, p: Empty) -> ShutdownResult:
    call.services.request_shutdown()
    return ShutdownResult(stopping=True)
