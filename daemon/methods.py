"""The one table of API methods: name -> params model, handler, and who may call it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from daemon import handlers_service as svc
from daemon import handlers_sessions as ses
from daemon import handlers_targets as tgt
from daemon.api_schema import (
    DevicesLimits,
    Empty,
    EventsList,
    JobsEnqueue,
    JobsReorder,
    SessionRef,
    SessionsAbort,
    SessionsConfirm,
    SessionsCreate,
    SessionsList,
    TargetsList,
    TargetsRemove,
    TargetsSubmit,
)


@dataclass(frozen=True)
class Method:
    params: type[BaseModel]
    handler: Callable[[Any, Any], BaseModel]
    mutating: bool          # operators only
    group_commit: bool = False   # may share one journal commit with neighbouring requests


METHODS: dict[str, Method] = {
    "status": Method(Empty, svc.status, False),
    "config": Method(Empty, svc.config, False),
    "templates.list": Method(Empty, svc.templates, False),
    "devices.status": Method(Empty, svc.devices, False),
    "devices.limits": Method(DevicesLimits, svc.limits, False),
    "events.list": Method(EventsList, svc.events, False),
    "shutdown": Method(Empty, svc.shutdown, True),
    "sessions.create": Method(SessionsCreate, ses.create, True),
    "sessions.list": Method(SessionsList, ses.list_, False),
    "sessions.get": Method(SessionRef, ses.get, False),
    "sessions.start": Method(SessionRef, ses.start, True),
    "sessions.pause": Method(SessionRef, ses.pause, True),
    "sessions.resume": Method(SessionRef, ses.resume, True),
    "sessions.abort": Method(SessionsAbort, ses.abort, True),
    "sessions.confirm": Method(SessionsConfirm, ses.confirm, True),
    "targets.submit": Method(TargetsSubmit, tgt.submit, True, group_commit=True),
    "targets.list": Method(TargetsList, tgt.list_, False),
    "targets.remove": Method(TargetsRemove, tgt.remove, True, group_commit=True),
    "jobs.enqueue": Method(JobsEnqueue, ses.jobs_enqueue, True),
    "jobs.list": Method(Empty, ses.jobs_list, False),
    "jobs.reorder": Method(JobsReorder, ses.jobs_reorder, True),
    "jobs.cancel": Method(SessionRef, ses.jobs_cancel, True),
}
