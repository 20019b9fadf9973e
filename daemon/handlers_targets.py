"""Handlers for ``targets.*``: submit (acknowledged only after commit), list, remove.

Submitting is idempotent per target id: resending a target that is already there with the
same values (a client retrying after a lost reply) returns it without a duplicate; the same
id with different values is refused (409). A request's targets commit together or not at all.
"""

from __future__ import annotations

import structlog

from daemon.api_context import Call
from daemon.api_schema import (
    RemovedResult,
    TargetIn,
    TargetInfo,
    TargetsList,
    TargetsRemove,
    TargetsResult,
    TargetsSubmit,
)
from daemon.errors import BadRequest, NotFound
from daemon.events import EventKind, topic
from daemon.journal import Journal
from daemon.journal_rows import SessionRow, TargetRow
from daemon.states import TERMINAL, SessionState
from drivers.base import InvalidState

log = structlog.get_logger(__name__)


def _info(t: TargetRow) -> TargetInfo:
    return TargetInfo(id=t.target_id, label=t.label, frame=t.frame, x=t.x, y=t.y, z=t.z,
                      meta=t.meta, created_at=t.created_at, removed_at=t.removed_at)


def _check_frame(journal: Journal, sid: str, target: TargetIn) -> None:
    kind, _, ref = target.frame.partition(":")
    if not ref:
        return
    artifact = journal.artifact(sid, int(ref))
    if artifact is None:
        raise NotFound(f"target {target.id or target.label!r}: frame {target.frame} names "
                       f"artifact {ref}, which session {sid} does not have")
    if artifact.kind != kind:
        raise BadRequest(f"target {target.id or target.label!r}: frame {target.frame} needs an "
                         f"artifact of kind {kind}, artifact {ref} is {artifact.kind}")


def _same(row: TargetRow, t: TargetIn) -> bool:
    return (row.label, row.frame, row.x, row.y, row.z, row.meta) == (
        t.label, t.frame, t.x, t.y, t.z, t.meta)


def _open_session(call: Call, sid: str) -> SessionRow:
    session = call.services.runner.get(sid)
    if SessionState(session.state) in TERMINAL:
        raise InvalidState(f"session {session.id} is {session.state}; its targets are final")
    return session


def submit(call: Call, p: TargetsSubmit) -> TargetsResult:
    svc = call.services
    session = _open_session(call, p.session_id)
    ids = [t.id for t in p.targets if t.id is not None]
    if len(set(ids)) != len(ids):
        raise BadRequest("targets: the same id appears twice in one request")
    for t in p.targets:
        _check_frame(svc.journal, session.id, t)
    out: list[TargetRow] = []
    created: list[str] = []
    with svc.bus.transaction() as tx:
        for t in p.targets:
            existing = svc.journal.target(session.id, t.id) if t.id is not None else None
            if existing is not None:
                if existing.removed_at is not None:
                    raise InvalidState(f"target {t.id} was removed from session {session.id}; "
                                       f"submit it under a new id")
                if not _same(existing, t):
                    raise InvalidState(f"target {t.id} already exists in session {session.id} "
                                       f"with different values")
                out.append(existing)
                continue
            row = tx.insert_target(TargetRow(session.id, t.id or "", 0, t.label, t.frame, t.x,
                                             t.y, t.z, t.meta, 0.0, None))
            out.append(row)
            created.append(row.target_id)
        if created:
            rev = tx.bump_targets_rev(session.id)
            tx.add_event(topic(EventKind.TARGET, session.id), session.id,
                         {"action": "added", "ids": created, "rev": rev})
        else:
            rev = session.targets_rev
    log.info("targets.submitted", session=session.id, client=call.client, new=len(created),
             resent=len(out) - len(created), rev=rev)
    return TargetsResult(targets=[_info(t) for t in out], created=len(created), rev=rev)


def list_(call: Call, p: TargetsList) -> TargetsResult:
    svc = call.services
    session = svc.runner.get(p.session_id)
    rows = svc.journal.targets(session.id, include_removed=p.include_removed)
    return TargetsResult(targets=[_info(t) for t in rows], rev=session.targets_rev)


def remove(call: Call, p: TargetsRemove) -> RemovedResult:
    svc = call.services
    session = _open_session(call, p.session_id)
    for tid in p.target_ids:
        row = svc.journal.target(session.id, tid)
        if row is None or row.removed_at is not None:
            raise NotFound(f"target {tid!r} is not in session {session.id}")
    if len(set(p.target_ids)) != len(p.target_ids):
        raise BadRequest("target_ids: the same id appears twice")
    with svc.bus.transaction() as tx:
        for tid in p.target_ids:
            tx.remove_target(session.id, tid)
        rev = tx.bump_targets_rev(session.id)
        tx.add_event(topic(EventKind.TARGET, session.id), session.id,
                     {"action": "removed", "ids": list(p.target_ids), "rev": rev})
    log.info("targets.removed", session=session.id, client=call.client, ids=p.target_ids,
             rev=rev)
    return RemovedResult(removed=list(p.target_ids), rev=rev)
