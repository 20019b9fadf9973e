"""The API's wire format: envelopes, and every method's params and result as a model.

Requests: ``{"schema": 1, "id": "c-1", "method": "sessions.get", "params": {...}}``.
Replies: ``{"schema": 1, "id": "c-1", "ok": true, "result": {...}}`` or
``{"schema": 1, "id": "c-1", "ok": false, "error": {"code", "type", "message", "retryable"}}``.
Params are validated strictly (no "1.5" for a number, no NaN, no unknown keys).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

API_SCHEMA = 1


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- envelope


class Request(Model):
    schema_version: StrictInt = Field(default=API_SCHEMA, alias="schema")
    id: Annotated[StrictStr, Field(min_length=1, max_length=128)] | StrictInt
    method: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    params: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(Result):
    code: int
    type: str
    message: str
    retryable: bool


# --------------------------------------------------------------------------- common types

SessionId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
_TARGET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_FRAME = re.compile(r"^(lm_stage|em_stage|(lm_image|em_image):[0-9]{1,18})$")
COORD_LIMIT_UM = 1e6


def _target_id(value: str) -> str:
    if not _TARGET_ID.match(value):
        raise ValueError("ids are 1-64 characters of letters, digits and _.:- , starting with "
                         "a letter or digit")
    if value.startswith("auto-"):
        raise ValueError("ids starting with 'auto-' are given by the service; leave id out")
    return value


def _frame(value: str) -> str:
    if not _FRAME.match(value):
        raise ValueError("frame must be lm_stage, em_stage, lm_image:<artifact id> or "
                         "em_image:<artifact id>")
    return value


def _coordinate(value: float) -> float:
    if not math.isfinite(value) or abs(value) > COORD_LIMIT_UM:
        raise ValueError(f"must be finite and within +-{COORD_LIMIT_UM:g}")
    return value


Coordinate = Annotated[float, AfterValidator(_coordinate)]
TargetId = Annotated[StrictStr, AfterValidator(_target_id)]
Frame = Annotated[StrictStr, AfterValidator(_frame)]


class Empty(Model):
    """Methods without params."""


class SessionRef(Model):
    session_id: SessionId


# --------------------------------------------------------------------------- results


class ProgressInfo(Result):
    done: int
    total: int | None
    elapsed_s: float
    eta_s: float | None
    key: str


class SessionInfo(Result):
    id: str
    name: str
    template: str
    params: dict[str, Any]
    state: str
    reason: str
    message: str
    error: dict[str, Any] | None
    waiting_key: str | None
    current_step: str | None
    queue_pos: float | None
    steps_done: int
    progress: ProgressInfo | None
    targets_rev: int
    data_dir: str
    created_at: float
    updated_at: float
    interrupted_step: str | None
    interruptions: int


class ArtifactInfo(Result):
    id: int
    step_key: str
    path: str
    kind: str
    size_bytes: int
    meta: dict[str, Any]
    created_at: float


class SessionDetail(Result):
    session: SessionInfo
    steps: list[str]
    artifacts: list[ArtifactInfo]
    confirmations: list[str]


class SessionList(Result):
    sessions: list[SessionInfo]
    token: str


class DeviceStatus(Result):
    name: str
    kind: str
    worker: str
    session_id: str | None
    step: str | None
    busy_for_s: float | None
    calls: int
    last_error: str | None


class DeviceList(Result):
    devices: list[DeviceStatus]


class StatusResult(Result):
    service: str
    version: str
    schema_version: int = Field(alias="schema")
    state: str
    uptime_s: float
    clock: str
    role: str
    sessions: dict[str, int]
    queue: list[str]
    devices: list[DeviceStatus]
    last_event_seq: int
    templates: list[str]
    unavailable_templates: dict[str, str]


class ConfigResult(Result):
    config: dict[str, Any]


class TemplateInfo(Result):
    name: str
    description: str
    params_schema: dict[str, Any]


class TemplateList(Result):
    templates: list[TemplateInfo]


class TargetInfo(Result):
    id: str
    label: str
    frame: str
    x: float
    y: float
    z: float | None
    meta: dict[str, Any]
    created_at: float
    removed_at: float | None


class TargetsResult(Result):
    targets: list[TargetInfo]
    created: int = 0
    rev: int


class RemovedResult(Result):
    removed: list[str]
    rev: int


class LimitsResult(Result):
    device: str
    limits: dict[str, Any]


class EventInfo(Result):
    schema_version: int = Field(alias="schema")
    seq: int
    time: float
    topic: str
    kind: str
    session_id: str | None
    payload: dict[str, Any]


class EventList(Result):
    events: list[EventInfo]
    last_seq: int


class ShutdownResult(Result):
    stopping: bool


# --------------------------------------------------------------------------- params


class SessionsCreate(Model):
    template: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    params: dict[str, Any] = Field(default_factory=dict)
    name: Annotated[StrictStr, Field(max_length=200)] = ""
    start: StrictBool = False


class SessionsList(Model):
    states: list[Literal["created", "queued", "running", "pausing", "paused",
                         "waiting_operator", "aborting", "interrupted", "completed", "aborted",
                         "failed"]] | None = None


class SessionsAbort(Model):
    session_id: SessionId
    reason: Annotated[StrictStr, Field(max_length=500)] = ""


class SessionsConfirm(Model):
    session_id: SessionId
    key: Annotated[StrictStr, Field(min_length=1, max_length=200)]


class TargetIn(Model):
    id: TargetId | None = None
    label: Annotated[StrictStr, Field(max_length=200)] = ""
    frame: Frame
    x: Coordinate
    y: Coordinate
    z: Coordinate | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class TargetsSubmit(Model):
    session_id: SessionId
    targets: Annotated[list[TargetIn], Field(min_length=1, max_length=10000)]


class TargetsList(Model):
    session_id: SessionId
    include_removed: StrictBool = False


class TargetsRemove(Model):
    session_id: SessionId
    target_ids: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=64)]],
                          Field(min_length=1, max_length=10000)]


class JobsEnqueue(Model):
    template: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    params: dict[str, Any] = Field(default_factory=dict)
    name: Annotated[StrictStr, Field(max_length=200)] = ""


class JobsReorder(Model):
    session_id: SessionId
    position: Annotated[StrictInt, Field(ge=0, le=100000)]


class DevicesLimits(Model):
    device: Literal["lm", "em"]


class EventsList(Model):
    after_seq: Annotated[StrictInt, Field(ge=0)] = 0
    limit: Annotated[StrictInt, Field(ge=1, le=10000)] = 1000
    topic_prefix: Annotated[StrictStr, Field(max_length=128)] = ""
    session_id: SessionId | None = None
