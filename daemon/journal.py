"""The SQLite journal: sessions, steps, artifacts, targets, confirmations and events.

Everything the service acknowledges is committed here first. The database runs in WAL mode
with ``synchronous=FULL``: every commit fsyncs the WAL, so a transaction that returned is on
disk even after a power cut, not only after a crash of the process. (``NORMAL`` with WAL
survives ``kill -9`` but may drop the last commits on power loss, which would break the
promise that an acknowledged target is never lost; one fsync per commit costs about a
millisecond and requests that carry many targets commit them in one transaction.)

One connection, one lock: writes are short and never wait on hardware, so serialising them
costs nothing measurable and makes "commit, then publish" ordering trivial.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import JournalError
from daemon.journal_rows import (
    ArtifactRow,
    EventRow,
    SessionRow,
    TargetRow,
    artifact_row,
    event_row,
    session_row,
    target_row,
)

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1

#: meta key holding the simulated time of the last committed step (VirtualClock only).
VIRTUAL_CLOCK_KEY = "virtual_clock_s"

#: Ids the service gives targets submitted without one; clients may not use this prefix.
AUTO_TARGET_PREFIX = "auto-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    ord INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    template TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    error TEXT,
    waiting_key TEXT,
    current_step TEXT,
    queue_pos REAL,
    steps_done INTEGER NOT NULL DEFAULT 0,
    targets_rev INTEGER NOT NULL DEFAULT 0,
    interrupted_step TEXT,
    interruptions INTEGER NOT NULL DEFAULT 0,
    data_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    schema INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    key TEXT NOT NULL,
    ord INTEGER NOT NULL,
    result TEXT NOT NULL,
    done_at REAL NOT NULL,
    PRIMARY KEY (session_id, key)
);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    step_key TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    meta TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (session_id, path)
);
CREATE TABLE IF NOT EXISTS targets (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    target_id TEXT NOT NULL,
    ord INTEGER NOT NULL,
    label TEXT NOT NULL,
    frame TEXT NOT NULL,
    x REAL NOT NULL,
    y REAL NOT NULL,
    z REAL,
    meta TEXT NOT NULL,
    created_at REAL NOT NULL,
    removed_at REAL,
    PRIMARY KEY (session_id, target_id)
);
CREATE TABLE IF NOT EXISTS confirmations (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    key TEXT NOT NULL,
    confirmed_at REAL NOT NULL,
    PRIMARY KEY (session_id, key)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    topic TEXT NOT NULL,
    session_id TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_by_ord ON steps (session_id, ord);
CREATE INDEX IF NOT EXISTS targets_by_ord ON targets (session_id, ord);
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, seq);
"""


def dumps(value: Any) -> str:
    """Strict JSON (no NaN/Infinity), as every client can parse it."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"), sort_keys=True)


class Tx:
    """One write transaction; created only by ``Journal.write()``."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self._c = conn
        self.now = now
        self.events: list[EventRow] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._c.execute(sql, args)

    def insert_session(self, *, id: str, name: str, template: str, params: dict[str, Any],
                       state: str, reason: str, data_dir: str) -> None:
        ord_ = self._c.execute("SELECT COALESCE(MAX(ord), 0) + 1 FROM sessions").fetchone()[0]
        self._c.execute(
            "INSERT INTO sessions (id, ord, name, template, params, state, reason, data_dir, "
            "created_at, updated_at, schema) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (id, ord_, name, template, dumps(params), state, reason, data_dir, self.now,
             self.now, SCHEMA_VERSION))

    def update_session(self, session_id: str, **fields: Any) -> None:
        if "error" in fields and fields["error"] is not None:
            fields["error"] = dumps(fields["error"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._c.execute(f"UPDATE sessions SET {cols}, updated_at = ? WHERE id = ?",
                        (*fields.values(), self.now, session_id))

    def add_step(self, session_id: str, key: str, result_json: str,
                 artifacts: Sequence[tuple[str, str, int, dict[str, Any]]]) -> list[ArtifactRow]:
        """Record a finished step and the files it wrote, in this transaction."""
        ord_ = self._c.execute("SELECT COALESCE(MAX(ord), 0) + 1 FROM steps WHERE session_id = ?",
                               (session_id,)).fetchone()[0]
        self._c.execute("INSERT INTO steps (session_id, key, ord, result, done_at) "
                        "VALUES (?,?,?,?,?)", (session_id, key, ord_, result_json, self.now))
        rows = []
        for path, kind, size, meta in artifacts:
            cur = self._c.execute(
                "INSERT INTO artifacts (session_id, step_key, path, kind, size_bytes, meta, "
                "created_at) VALUES (?,?,?,?,?,?,?)",
                (session_id, key, path, kind, size, dumps(meta), self.now))
            rows.append(ArtifactRow(int(cur.lastrowid or 0), session_id, key, path, kind, size,
                                    meta, self.now))
        self._c.execute("UPDATE sessions SET steps_done = steps_done + 1, current_step = NULL, "
                        "updated_at = ? WHERE id = ?", (self.now, session_id))
        return rows

    def insert_target(self, t: TargetRow) -> TargetRow:
        ord_ = self._c.execute("SELECT COALESCE(MAX(ord), 0) + 1 FROM targets "
                               "WHERE session_id = ?", (t.session_id,)).fetchone()[0]
        target_id = t.target_id or f"{AUTO_TARGET_PREFIX}{ord_}"
        self._c.execute(
            "INSERT INTO targets (session_id, target_id, ord, label, frame, x, y, z, meta, "
            "created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (t.session_id, target_id, ord_, t.label, t.frame, t.x, t.y, t.z, dumps(t.meta),
             self.now))
        return TargetRow(t.session_id, target_id, ord_, t.label, t.frame, t.x, t.y, t.z, t.meta,
                         self.now, None)

    def remove_target(self, session_id: str, target_id: str) -> None:
        self._c.execute("UPDATE targets SET removed_at = ? WHERE session_id = ? AND "
                        "target_id = ?", (self.now, session_id, target_id))

    def bump_targets_rev(self, session_id: str) -> int:
        self._c.execute("UPDATE sessions SET targets_rev = targets_rev + 1 WHERE id = ?",
                        (session_id,))
        return int(self._c.execute("SELECT targets_rev FROM sessions WHERE id = ?",
                                   (session_id,)).fetchone()[0])

    def confirm(self, session_id: str, key: str) -> None:
        self._c.execute("INSERT OR IGNORE INTO confirmations (session_id, key, confirmed_at) "
                        "VALUES (?,?,?)", (session_id, key, self.now))

    def set_meta(self, key: str, value: str) -> None:
        self._c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value", (key, value))

    def add_event(self, topic: str, session_id: str | None, payload: dict[str, Any]) -> EventRow:
        cur = self._c.execute("INSERT INTO events (time, topic, session_id, payload) "
                              "VALUES (?,?,?,?)", (self.now, topic, session_id, dumps(payload)))
        row = EventRow(int(cur.lastrowid or 0), self.now, topic, session_id, payload)
        self.events.append(row)
        return row


class Journal:
    """The service's durable state; thread-safe through one lock."""

    def __init__(self, path: Path, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall
        self._lock = threading.RLock()
        self._stack: list[Tx] = []        # open transactions of the thread holding the lock
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(path), isolation_level=None,
                                         check_same_thread=False, timeout=30.0)
        except sqlite3.Error as err:
            raise JournalError(f"cannot open journal {path}: {err}") from err
        try:
            self._conn.row_factory = sqlite3.Row
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {path}: WAL mode refused (got {mode})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            self._check_version()
        except (sqlite3.Error, JournalError) as err:
            self._conn.close()
            if isinstance(err, JournalError):
                raise
            raise JournalError(f"journal {path} is unusable: {err}") from err

    def _check_version(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                               (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise JournalError(f"journal {self.path} has schema {row[0]}; this clemd "
                               f"understands up to {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction: committed (and fsynced) on exit, rolled back on error.

        Nested inside another ``write()`` on the same thread it is a savepoint: an error
        undoes only its own changes, and its events join the enclosing transaction's, which
        alone commits. The API edge uses this to commit a group of requests with one fsync.
        """
        with self._lock:
            depth = len(self._stack)
            name = f"sp{depth}"
            self._conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
            tx = Tx(self._conn, self._wall() if depth == 0 else self._stack[0].now)
            self._stack.append(tx)
            try:
                yield tx
            except BaseException:
                self._stack.pop()
                if depth == 0:
                    self._conn.execute("ROLLBACK")
                else:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                raise
            self._stack.pop()
            if depth == 0:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error:
                    # sqlite may have rolled back already; the commit error is what counts
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                    raise
            else:
                self._conn.execute(f"RELEASE {name}")
                self._stack[-1].events.extend(tx.events)

    def in_transaction(self) -> bool:
        """True when the calling thread is inside ``write()``."""
        with self._lock:
            return bool(self._stack)

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- reads -------------------------------------------------------------------------------

    def session(self, session_id: str) -> SessionRow | None:
        rows = self._all("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return session_row(rows[0]) if rows else None

    def sessions(self, states: Sequence[str] | None = None) -> list[SessionRow]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._all(f"SELECT * FROM sessions WHERE state IN ({marks}) ORDER BY ord",
                             tuple(states))
        else:
            rows = self._all("SELECT * FROM sessions ORDER BY ord")
        return [session_row(r) for r in rows]

    def step_result(self, session_id: str, key: str) -> dict[str, Any] | None:
        rows = self._all("SELECT result FROM steps WHERE session_id = ? AND key = ?",
                         (session_id, key))
        return json.loads(rows[0][0]) if rows else None

    def step_keys(self, session_id: str) -> list[str]:
        return [r[0] for r in self._all("SELECT key FROM steps WHERE session_id = ? ORDER BY ord",
                                        (session_id,))]

    def artifacts(self, session_id: str) -> list[ArtifactRow]:
        return [artifact_row(r) for r in self._all(
            "SELECT * FROM artifacts WHERE session_id = ? ORDER BY id", (session_id,))]

    def artifact(self, session_id: str, artifact_id: int) -> ArtifactRow | None:
        rows = self._all("SELECT * FROM artifacts WHERE session_id = ? AND id = ?",
                         (session_id, artifact_id))
        return artifact_row(rows[0]) if rows else None

    def artifact_by_path(self, session_id: str, path: str) -> ArtifactRow | None:
        rows = self._all("SELECT * FROM artifacts WHERE session_id = ? AND path = ?",
                         (session_id, path))
        return artifact_row(rows[0]) if rows else None

    def targets(self, session_id: str, include_removed: bool = False) -> list[TargetRow]:
        sql = "SELECT * FROM targets WHERE session_id = ?"
        if not include_removed:
            sql += " AND removed_at IS NULL"
        return [target_row(r) for r in self._all(sql + " ORDER BY ord", (session_id,))]

    def target(self, session_id: str, target_id: str) -> TargetRow | None:
        rows = self._all("SELECT * FROM targets WHERE session_id = ? AND target_id = ?",
                         (session_id, target_id))
        return target_row(rows[0]) if rows else None

    def confirmations(self, session_id: str) -> set[str]:
        return {r[0] for r in self._all("SELECT key FROM confirmations WHERE session_id = ?",
                                        (session_id,))}

    def events(self, after_seq: int = 0, limit: int = 1000, topic_prefix: str = "",
               session_id: str | None = None) -> list[EventRow]:
        sql = "SELECT * FROM events WHERE seq > ? AND topic LIKE ? ESCAPE '\\'"
        escaped = topic_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args: list[Any] = [after_seq, escaped + "%"]
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        return [event_row(r) for r in self._all(sql + " ORDER BY seq LIMIT ?", (*args, limit))]

    def meta(self, key: str) -> str | None:
        rows = self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def last_event_seq(self) -> int:
        rows = self._all("SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(rows[0][0])

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._all("SELECT state, COUNT(*) FROM sessions GROUP BY state")}
