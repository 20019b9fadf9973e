"""The journal's rows as frozen values (what ``Journal`` reads return)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SessionRow:
    id: str
    ord: int
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
    targets_rev: int
    data_dir: str
    created_at: float
    updated_at: float
    interrupted_step: str | None = None     # the step in flight at the last restart(s)
    interruptions: int = 0                  # consecutive restarts with that step in flight


@dataclass(frozen=True)
class TargetRow:
    session_id: str
    target_id: str
    ord: int
    label: str
    frame: str
    x: float
    y: float
    z: float | None
    meta: dict[str, Any]
    created_at: float
    removed_at: float | None


@dataclass(frozen=True)
class ArtifactRow:
    id: int
    session_id: str
    step_key: str
    path: str
    kind: str
    size_bytes: int
    meta: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class EventRow:
    seq: int
    time: float
    topic: str
    session_id: str | None
    payload: dict[str, Any]


def session_row(r: sqlite3.Row) -> SessionRow:
    return SessionRow(r["id"], r["ord"], r["name"], r["template"], json.loads(r["params"]),
                      r["state"], r["reason"], r["message"],
                      json.loads(r["error"]) if r["error"] else None, r["waiting_key"],
                      r["current_step"], r["queue_pos"], r["steps_done"], r["targets_rev"],
                      r["data_dir"], r["created_at"], r["updated_at"], r["interrupted_step"],
                      r["interruptions"])


def target_row(r: sqlite3.Row) -> TargetRow:
    return TargetRow(r["session_id"], r["target_id"], r["ord"], r["label"], r["frame"], r["x"],
                     r["y"], r["z"], json.loads(r["meta"]), r["created_at"], r["removed_at"])


def artifact_row(r: sqlite3.Row) -> ArtifactRow:
    return ArtifactRow(r["id"], r["session_id"], r["step_key"], r["path"], r["kind"],
                       r["size_bytes"], json.loads(r["meta"]), r["created_at"])


def event_row(r: sqlite3.Row) -> EventRow:
    return EventRow(r["seq"], r["time"], r["topic"], r["session_id"], json.loads(r["payload"]))
