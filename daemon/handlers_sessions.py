"""Handlers for ``sessions.*`` and ``jobs.*`` (the queue of sessions waiting to run)."""

from __future__ import annotations

from daemon.api_context import Call, change_token, session_info
from daemon.api_schema import (
    ArtifactInfo,
    JobsEnqueue,
    JobsReorder,
    SessionDetail,
    SessionInfo,
    SessionList,
    SessionRef,
    SessionsAbort,
    SessionsConfirm,
    SessionsCreate,
    SessionsList,
)
from daemon.states import SessionState
from drivers.base import InvalidState


def _info(call: Call, sid: str) -> SessionInfo:
    runner = call.services.runner
    return session_info(runner, runner.get(sid))


def create(call: Call, p: SessionsCreate) -> SessionInfo:
    runner = call.services.runner
    row = runner.create(p.template, p.params, p.name)
    if p.start:
        runner.start(row.id)
    return _info(call, row.id)


def list_(call: Call, p: SessionsList) -> SessionList:
    runner = call.services.runner
    rows = call.services.journal.sessions(p.states)
    return SessionList(sessions=[session_info(runner, r) for r in rows],
                       token=change_token(rows))


def get(call: Call, p: SessionRef) -> SessionDetail:
    runner = call.services.runner
    journal = call.services.journal
    row = runner.get(p.session_id)
    artifacts = [ArtifactInfo(id=a.id, step_key=a.step_key, path=a.path, kind=a.kind,
                              size_bytes=a.size_bytes, meta=a.meta, created_at=a.created_at)
                 for a in journal.artifacts(row.id)]
    return SessionDetail(session=session_info(runner, row), steps=journal.step_keys(row.id),
                         artifacts=artifacts,
                         confirmations=sorted(journal.confirmations(row.id)))


def start(call: Call, p: SessionRef) -> SessionInfo:
    call.services.runner.start(p.session_id)
    return _info(call, p.session_id)


def pause(call: Call, p: SessionRef) -> SessionInfo:
    call.services.runner.pause(p.session_id)
    return _info(call, p.session_id)


def resume(call: Call, p: SessionRef) -> SessionInfo:
    call.services.runner.resume(p.session_id)
    return _info(call, p.session_id)


def abort(call: Call, p: SessionsAbort) -> SessionInfo:
    reason = p.reason or f"aborted by {call.client}"
    call.services.runner.abort(p.session_id, reason)
    return _info(call, p.session_id)


def confirm(call: Call, p: SessionsConfirm) -> SessionInfo:
    call.services.runner.confirm(p.session_id, p.key)
    return _info(call, p.session_id)


def jobs_enqueue(call: Call, p: JobsEnqueue) -> SessionInfo:
    runner = call.services.runner
    row = runner.create(p.template, p.params, p.name)
    runner.start(row.id)
    return _info(call, row.id)


def jobs_list(call: Call, p: object) -> SessionList:
    runner = call.services.runner
    rows = runner.queue()
    return SessionList(sessions=[session_info(runner, r) for r in rows], token=change_token(rows))


def jobs_reorder(call: Call, p: JobsReorder) -> SessionList:
    runner = call.services.runner
    rows = runner.reorder(p.session_id, p.position)
    return SessionList(sessions=[session_info(runner, r) for r in rows], token=change_token(rows))


def jobs_cancel(call: Call, p: SessionRef) -> SessionInfo:
    runner = call.services.runner
    row = runner.get(p.session_id)
    if row.state != SessionState.QUEUED.value:
        raise InvalidState(f"session {row.id} is {row.state}, not queued; use sessions.abort "
                           f"to stop a session that runs")
    runner.cancel(row.id)
    return _info(call, row.id)


