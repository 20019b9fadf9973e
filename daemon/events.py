"""Events: committed to the journal, then published on the PUB socket, in sequence order.

Every event gets the journal's sequence number (``seq``, strictly increasing across
restarts), so a subscriber that sees a jump knows it missed events and can fetch them with
the ``events`` method. Topics start with the event kind (``state``, ``progress``, ``image``,
``target``, ``warning``, ``service``) followed by ``.`` and the session id when there is one,
so ``SUBSCRIBE b"progress"`` gets progress of every session.

The PUB socket is used from several threads (API, session runners); a lock around
"commit, send" gives ZMQ the memory barrier it needs to migrate a socket between threads and
keeps the wire order equal to the journal order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, Protocol

import structlog

from daemon.journal import Journal, Tx
from daemon.journal_rows import EventRow

log = structlog.get_logger(__name__)

EVENT_SCHEMA = 1


class EventKind(str, Enum):
    """The first part of every topic."""

    STATE = "state"          # a session changed state: {state, previous, reason, message, error}
    PROGRESS = "progress"    # a step finished: {key, title, done, total, elapsed_s, eta_s}
    STEP = "step"            # a step started: {key, title, instrument}
    IMAGE = "image"          # a file was recorded: {artifact_id, path, kind, step, meta}
    TARGET = "target"        # targets added/removed: {action, targets, rev}
    WARNING = "warning"      # something an operator should see: {message, ...}
    SERVICE = "service"      # service start/stop: {state, ...}


def topic(kind: EventKind, session_id: str | None = None) -> str:
    return f"{kind.value}.{session_id}" if session_id else kind.value


def envelope(ev: EventRow) -> dict[str, Any]:
    """The JSON an event is published and returned as."""
    return {"schema": EVENT_SCHEMA, "seq": ev.seq, "time": ev.time, "topic": ev.topic,
            "kind": ev.topic.split(".", 1)[0], "session_id": ev.session_id,
            "payload": ev.payload}


class Publisher(Protocol):
    def send(self, topic: str, body: bytes) -> None: ...


class EventBus:
    """The one way to write the journal with events attached."""

    def __init__(self, journal: Journal, publisher: Publisher | None = None) -> None:
        self.journal = journal
        self._publisher = publisher
        self._lock = threading.RLock()

    def attach(self, publisher: Publisher | None) -> None:
        with self._lock:
            self._publisher = publisher

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Write the journal; after the commit publish the transaction's events in order.

        Nested in another transaction, its events are published when the outermost one
        commits (and never, if that one rolls back).
        """
        with self._lock:
            outermost = not self.journal.in_transaction()
            with self.journal.write() as tx:
                yield tx
            if outermost:
                for ev in tx.events:
                    self._send(ev)

    def emit(self, kind: EventKind, session_id: str | None, payload: dict[str, Any]) -> EventRow:
        """Commit and publish one event on its own."""
        with self.transaction() as tx:
            return tx.add_event(topic(kind, session_id), session_id, payload)

    def _send(self, ev: EventRow) -> None:
        if self._publisher is None:
            return
        body = json.dumps(envelope(ev), allow_nan=False).encode()
        self._publisher.send(ev.topic, body)
