"""What every API handler receives: the service's parts and the caller's role."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from daemon.api_schema import ProgressInfo, SessionInfo
from daemon.config import Role, ServiceConfig
from daemon.events import EventBus
from daemon.instruments import Instruments
from daemon.journal import Journal
from daemon.journal_rows import SessionRow
from daemon.runner import SessionRunner
from daemon.templates import TemplateRegistry


@dataclass(frozen=True)
class Services:
    """The long-lived parts, built once by daemon/service.py."""

    cfg: ServiceConfig
    journal: Journal
    bus: EventBus
    runner: SessionRunner
    registry: TemplateRegistry
    instruments: Instruments
    started_at: float
    version: str
    request_shutdown: Callable[[], None]
    stopping: Callable[[], bool]


@dataclass(frozen=True)
class Call:
    """One request's context."""

    services: Services
    role: Role
    client: str


def session_info(runner: SessionRunner, row: SessionRow) -> SessionInfo:
    p = runner.live_progress(row.id)
    progress = None if p is None else ProgressInfo(done=p.done, total=p.total,
                                                   elapsed_s=p.elapsed_s, eta_s=p.eta_s,
                                                   key=p.key)
    return SessionInfo(
        id=row.id, name=row.name, template=row.template, params=row.params, state=row.state,
        reason=row.reason, message=row.message, error=row.error, waiting_key=row.waiting_key,
        current_step=row.current_step, queue_pos=row.queue_pos, steps_done=row.steps_done,
        progress=progress, targets_rev=row.targets_rev, data_dir=row.data_dir,
        created_at=row.created_at, updated_at=row.updated_at,
        interrupted_step=row.interrupted_step, interruptions=row.interruptions)


def change_token(rows: list[SessionRow]) -> str:
    """A short token that changes whenever any listed session changes."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.id}|{r.state}|{r.queue_pos}|{r.updated_at}|{r.steps_done};".encode())
    return h.hexdigest()[:16]
