"""Session states, the reasons for entering them, and the table of allowed transitions.

Only ``SessionRunner._transition`` changes a session's state; it checks this table, logs
old -> new, journals the change and publishes a ``state`` event in one step.
"""

from __future__ import annotations

from enum import Enum

from drivers.errors import InvalidState


class SessionState(str, Enum):
    """Where a session is. Values are what the API and the journal carry."""

    CREATED = "created"                     # built from a template, not queued
    QUEUED = "queued"                       # waiting for its instruments
    RUNNING = "running"                     # a step runs or is about to
    PAUSING = "pausing"                     # pause asked, the step in flight finishes first
    PAUSED = "paused"                       # stopped at a step boundary (by request or error)
    WAITING_OPERATOR = "waiting_operator"   # an operator checkpoint waits for confirmation
    ABORTING = "aborting"                   # abort asked, the step in flight is being cancelled
    INTERRUPTED = "interrupted"             # found mid-run at start; waits for resume
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"                       # the plan itself is invalid; cannot continue


class Reason(str, Enum):
    """Why a transition happened (outcomes carry an enum, the message adds detail)."""

    CREATED = "created"
    START_REQUESTED = "start_requested"
    SCHEDULED = "scheduled"
    CANCELLED = "cancelled"
    PAUSE_REQUESTED = "pause_requested"
    PAUSED_AT_BOUNDARY = "paused_at_boundary"
    RESUME_REQUESTED = "resume_requested"
    CHECKPOINT = "checkpoint"
    CONFIRMED = "confirmed"
    ABORT_REQUESTED = "abort_requested"
    ABORTED = "aborted"
    STEP_ERROR = "step_error"
    WATCHDOG = "watchdog"
    PLAN_FINISHED = "plan_finished"
    PLAN_INVALID = "plan_invalid"
    SERVICE_RESTART = "service_restart"


S = SessionState

TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.CREATED: frozenset({S.QUEUED, S.ABORTED}),
    S.QUEUED: frozenset({S.RUNNING, S.CREATED, S.ABORTED}),
    S.RUNNING: frozenset({S.PAUSING, S.PAUSED, S.WAITING_OPERATOR, S.ABORTING, S.COMPLETED,
                          S.FAILED, S.INTERRUPTED}),
    S.PAUSING: frozenset({S.RUNNING, S.PAUSED, S.ABORTING, S.COMPLETED, S.FAILED,
                          S.INTERRUPTED}),
    S.PAUSED: frozenset({S.RUNNING, S.ABORTED}),
    S.WAITING_OPERATOR: frozenset({S.RUNNING, S.PAUSED, S.ABORTED}),
    S.ABORTING: frozenset({S.ABORTED, S.COMPLETED}),
    S.INTERRUPTED: frozenset({S.RUNNING, S.ABORTED}),
    S.COMPLETED: frozenset(),
    S.ABORTED: frozenset(),
    S.FAILED: frozenset(),
}

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

#: States in which a session holds its instruments (no other session may use them).
HOLDS_INSTRUMENTS = frozenset({S.RUNNING, S.PAUSING, S.PAUSED, S.WAITING_OPERATOR, S.ABORTING,
                               S.INTERRUPTED})

#: States in which a session thread is (or should be) executing the plan.
EXECUTING = frozenset({S.RUNNING, S.PAUSING, S.ABORTING})


def check_transition(session_id: str, old: SessionState, new: SessionState) -> None:
    """Raise InvalidState naming the current state if ``old -> new`` is not allowed."""
    if new not in TRANSITIONS[old]:
        allowed = sorted(s.value for s in TRANSITIONS[old]) or ["none: the session has ended"]
        raise InvalidState(f"session {session_id} is {old.value}; it cannot become "
                           f"{new.value} (allowed from {old.value}: {', '.join(allowed)})")
