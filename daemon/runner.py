"""The session runner: commands from the API, the queue, one thread per running session.

``_transition`` is the only place a session's state changes: it checks the table in
daemon/states.py, logs old -> new, and journals the change together with its ``state``
event. API commands only flip flags and start threads; they never wait on hardware. A queued
session starts when every instrument its template needs is free (queue order is kept: a
session never overtakes an earlier one that wants the same instrument).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.config import RunnerConfig
from daemon.errors import NotFound, ServiceBusy
from daemon.events import EventBus, EventKind, topic
from daemon.instruments import Instruments
from daemon.journal_rows import SessionRow
from daemon.session_events import StepEvents
from daemon.session_exec import Hooks, Outcome, OutcomeKind, SessionExecution, error_record
from daemon.states import EXECUTING, HOLDS_INSTRUMENTS, Reason, SessionState, check_transition
from daemon.stepstore import JournalStepStore
from daemon.templates import SessionEnv, TemplateRegistry
from daemon.workers import InstrumentWorker
from drivers.base import InvalidState
from protocols.plan import Progress, RunControl, StepContext

log = structlog.get_logger(__name__)
S = SessionState


@dataclass
class Live:
    """A session that has a thread executing its plan."""

    session_id: str
    control: RunControl
    execution: SessionExecution | None = None
    thread: threading.Thread | None = None
    halt: bool = False            # service shutdown: stop at a boundary, keep RUNNING journaled


class SessionRunner:
    """Owns session state, the queue and the session threads."""

    def __init__(self, cfg: RunnerConfig, bus: EventBus, instruments: Instruments,
                 registry: TemplateRegistry, data_dir: Path) -> None:
        self.cfg = cfg
        self.bus = bus
        self.journal = bus.journal
        self.instruments = instruments
        self.registry = registry
        self.sessions_dir = data_dir / "sessions"
        self._lock = threading.RLock()
        self._live: dict[str, Live] = {}
        self._stopping = False
        self._events = StepEvents(bus, cfg, instruments.clock)
        self.workers: dict[str, InstrumentWorker] = {"": InstrumentWorker("compute", None)}
        for name in instruments.names():
            self.workers[name] = InstrumentWorker(name, instruments.get(name))

    # ------------------------------------------------------------------ commands

    def create(self, template: str, params: dict[str, Any], name: str) -> SessionRow:
        self._refuse_if_stopping()
        tpl = self.registry.get(template)
        model = self.registry.validate(template, params)
        missing = tpl.instruments_for(model) - set(self.instruments.names())
        if missing:
            raise InvalidState(f"template {template} needs {sorted(missing)}, which this "
                               f"service has not configured ([lm]/[em] in the config)")
        with self._lock:
            sid = self._new_id()
            folder = self.sessions_dir / sid
            with self.bus.transaction() as tx:
                tx.insert_session(id=sid, name=name or sid, template=template,
                                  params=model.model_dump(mode="json"), state=S.CREATED.value,
                                  reason=Reason.CREATED.value, data_dir=str(folder))
                tx.add_event(topic(EventKind.STATE, sid), sid,
                             {"state": S.CREATED.value, "previous": None,
                              "reason": Reason.CREATED.value, "message": "", "error": None})
            folder.mkdir(parents=True, exist_ok=True)
        log.info("session.created", session=sid, template=template)
        return self.get(sid)

    def start(self, sid: str) -> SessionRow:
        self._refuse_if_stopping()
        with self._lock:
            pos = max((r.queue_pos or 0.0 for r in self.journal.sessions([S.QUEUED.value])),
                      default=0.0) + 1.0
            self._transition(sid, S.QUEUED, Reason.START_REQUESTED, queue_pos=pos)
            self._schedule()
            return self.get(sid)

    def cancel(self, sid: str) -> SessionRow:
        """Take a queued session off the queue (it returns to created)."""
        with self._lock:
            return self._transition(sid, S.CREATED, Reason.CANCELLED, queue_pos=None)

    def reorder(self, sid: str, position: int) -> list[SessionRow]:
        """Move a queued session to ``position`` (0 = head) of the queue."""
        with self._lock:
            row = self.get(sid)
            if row.state != S.QUEUED.value:
                raise InvalidState(f"session {sid} is {row.state}; only queued sessions can be "
                                   f"reordered")
            order = [r.id for r in self.queue() if r.id != sid]
            order.insert(min(max(position, 0), len(order)), sid)
            with self.bus.transaction() as tx:
                for i, other in enumerate(order):
                    tx.update_session(other, queue_pos=float(i + 1))
                tx.add_event(topic(EventKind.SERVICE), None, {"queue": order})
            self._schedule()
            return self.queue()

    def pause(self, sid: str) -> SessionRow:
        with self._lock:
            state = self._state(sid)
            if state == S.WAITING_OPERATOR:
                return self._transition(sid, S.PAUSED, Reason.PAUSE_REQUESTED)
            row = self._transition(sid, S.PAUSING, Reason.PAUSE_REQUESTED)
            live = self._live.get(sid)
            if live is not None:
                live.control.request_pause()
            return row

    def resume(self, sid: str) -> SessionRow:
        self._refuse_if_stopping()
        with self._lock:
            state = self._state(sid)
            if state == S.PAUSING:
                live = self._live.get(sid)
                if live is not None:
                    live.control.clear_pause()
                return self._transition(sid, S.RUNNING, Reason.RESUME_REQUESTED)
            if state == S.WAITING_OPERATOR:
                raise InvalidState(f"session {sid} is waiting_operator; confirm the checkpoint "
                                   f"with sessions.confirm instead of resuming")
            self._transition(sid, S.RUNNING, Reason.RESUME_REQUESTED, error=None)
            self._spawn(sid)
            return self.get(sid)

    def confirm(self, sid: str, key: str) -> SessionRow:
        self._refuse_if_stopping()
        with self._lock:
            row = self.get(sid)
            if row.state != S.WAITING_OPERATOR.value or row.waiting_key != key:
                waiting = (f"waits for {row.waiting_key!r}" if row.state ==
                           S.WAITING_OPERATOR.value else f"is {row.state}")
                raise InvalidState(f"session {sid} {waiting}; nothing to confirm for {key!r}")
            with self.bus.transaction() as tx:     # confirmation and state change together
                tx.confirm(sid, key)
                self._transition(sid, S.RUNNING, Reason.CONFIRMED, message=key,
                                 waiting_key=None)
            self._spawn(sid)
            return self.get(sid)

    def abort(self, sid: str, reason: str) -> SessionRow:
        with self._lock:
            state = self._state(sid)
            if state not in EXECUTING:
                return self._transition(sid, S.ABORTED, Reason.ABORT_REQUESTED, message=reason,
                                        queue_pos=None)
            row = self._transition(sid, S.ABORTING, Reason.ABORT_REQUESTED, message=reason)
            live = self._live.get(sid)
            if live is not None:
                live.control.request_abort(reason or "aborted by request")
        # Telling the driver may itself talk to hardware: never on the API thread.
        threading.Thread(target=self._abort_instruments, args=(sid,), name=f"abort-{sid}",
                         daemon=True).start()
        return row

    # ------------------------------------------------------------------ reads

    def get(self, sid: str) -> SessionRow:
        row = self.journal.session(sid)
        if row is None:
            raise NotFound(f"session {sid!r} does not exist")
        return row

    def queue(self) -> list[SessionRow]:
        rows = self.journal.sessions([S.QUEUED.value])
        return sorted(rows, key=lambda r: (r.queue_pos or 0.0, r.ord))

    def live_progress(self, sid: str) -> Progress | None:
        live = self._live.get(sid)
        execution = live.execution if live else None
        return execution.last_progress if execution else None

    def targets_of(self, sid: str) -> list[dict[str, Any]]:
        return [{"id": t.target_id, "label": t.label, "frame": t.frame, "x": t.x, "y": t.y,
                 "z": t.z, "meta": t.meta} for t in self.journal.targets(sid)]

    # ------------------------------------------------------------------ service lifecycle

    def recover(self) -> list[str]:
        """At start: sessions that were executing are interrupted, then resumed or held."""
        resumed = []
        with self._lock:
            if self.cfg.auto_confirm_checkpoints:     # left waiting by a service without it
                for row in self.journal.sessions([S.WAITING_OPERATOR.value]):
                    if row.waiting_key is not None:
                        self._confirm_by_config(row.id, row.waiting_key)
            for row in self.journal.sessions([s.value for s in EXECUTING]):
                if row.state == S.ABORTING.value:
                    self._transition(row.id, S.ABORTED, Reason.SERVICE_RESTART,
                                     message="abort completed at restart")
                    continue
                if row.state == S.PAUSING.value:    # the operator's pause stands
                    self._transition(row.id, S.PAUSED, Reason.SERVICE_RESTART,
                                     message="pause completed at restart")
                    continue
                where = (f"during step {row.current_step}" if row.current_step
                         else "between steps")
                repeats = (row.interruptions + 1 if row.current_step is not None
                           and row.current_step == row.interrupted_step else 1)
                self._transition(row.id, S.INTERRUPTED, Reason.SERVICE_RESTART,
                                 message=f"service stopped {where}",
                                 interrupted_step=row.current_step, interruptions=repeats)
                if row.current_step is not None and repeats >= self.cfg.max_auto_resumes:
                    message = (f"step {row.current_step} was in flight at {repeats} "
                               f"consecutive restarts; not resuming it automatically "
                               f"(runner.max_auto_resumes); check the logs, then resume or "
                               f"abort")
                    log.error("session.crash_loop", session=row.id, step=row.current_step,
                              restarts=repeats)
                    self.bus.emit(EventKind.WARNING, row.id, {"message": message,
                                                              "step": row.current_step})
                    continue
                if self.cfg.on_restart == "resume":
                    self._transition(row.id, S.RUNNING, Reason.SERVICE_RESTART,
                                     message="resumed after restart")
                    self._spawn(row.id)
                    resumed.append(row.id)
                else:
                    self.bus.emit(EventKind.WARNING, row.id,
                                  {"message": f"session {row.id} was interrupted; resume or "
                                              f"abort it (runner.on_restart = wait)"})
            self._schedule()
        return resumed

    def stop(self) -> None:
        """Stop at step boundaries; executing sessions stay journaled as running, so the
        next start resumes them. Waits up to ``runner.shutdown_timeout_s``."""
        with self._lock:
            self._stopping = True
            lives = list(self._live.values())
            for live in lives:
                live.halt = True
                live.control.request_pause()
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        for live in lives:
            if live.thread is not None:
                live.thread.join(max(0.0, deadline - time.monotonic()))
                if live.thread.is_alive():
                    log.error("runner.stop_timeout", session=live.session_id,
                              step=live.execution.current.key if live.execution
                              and live.execution.current else None)
        for worker in self.workers.values():
            worker.stop(self.cfg.abort_grace_s)

    # ------------------------------------------------------------------ internals

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise ServiceBusy("the service is shutting down")

    def _new_id(self) -> str:
        while True:
            sid = "s-" + secrets.token_hex(4)
            if self.journal.session(sid) is None:
                return sid

    def _state(self, sid: str) -> SessionState:
        return SessionState(self.get(sid).state)

    def _transition(self, sid: str, new: SessionState, reason: Reason, message: str = "",
                    error: dict[str, Any] | None = None, **fields: Any) -> SessionRow:
        """The one way a session changes state: check, journal with event, log."""
        with self._lock:
            old = self._state(sid)
            check_transition(sid, old, new)
            if new != S.QUEUED:
                fields.setdefault("queue_pos", None)
            with self.bus.transaction() as tx:
                tx.update_session(sid, state=new.value, reason=reason.value, message=message,
                                  error=error, **fields)
                tx.add_event(topic(EventKind.STATE, sid), sid,
                             {"state": new.value, "previous": old.value, "reason": reason.value,
                              "message": message, "error": error})
            log.info("session.state", session=sid, old=old.value, new=new.value,
                     reason=reason.value, message=message)
            return self.get(sid)

    def _held(self) -> set[str]:
        held: set[str] = set()
        for row in self.journal.sessions([s.value for s in HOLDS_INSTRUMENTS]):
            held |= self._instruments_of(row)
        return held

    def _instruments_of(self, row: SessionRow) -> frozenset[str]:
        tpl = self.registry.templates.get(row.template)
        if tpl is None:       # template gone since: assume it needs everything
            return frozenset({"lm", "em"})
        return tpl.instruments_for(tpl.params_model.model_validate(row.params))

    def _schedule(self) -> None:
        with self._lock:
            if self._stopping:
                return
            busy = self._held()
            for row in self.queue():
                need = self._instruments_of(row)
                if need & busy:
                    busy |= need      # later sessions may not overtake this one
                    continue
                busy |= need
                self._transition(row.id, S.RUNNING, Reason.SCHEDULED)
                self._spawn(row.id)

    def _spawn(self, sid: str) -> None:
        """Start a thread executing the session's plan (caller holds the lock)."""
        row = self.get(sid)
        control = RunControl()
        control.confirmed |= self.journal.confirmations(sid)
        live = Live(sid, control)
        self._live[sid] = live
        try:
            live.execution = self._build(row, control)
        except Exception as err:  # noqa: BLE001 - a plan that cannot be built fails its session
            del self._live[sid]
            self._finish(sid, live, Outcome(OutcomeKind.INVALID, str(err),
                                            error=error_record(err)))
            return
        live.thread = threading.Thread(target=self._thread_main, args=(live,),
                                       name=f"session-{sid}", daemon=True)
        live.thread.start()

    def _build(self, row: SessionRow, control: RunControl) -> SessionExecution:
        tpl = self.registry.get(row.template)
        params = tpl.params_model.model_validate(row.params)
        folder = Path(row.data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        env = SessionEnv(row.id, folder, lambda: self.targets_of(row.id))
        plan = tpl.factory(params, env)
        step_params: dict[str, Any] = params.model_dump(mode="json")
        if "specimen" in self.instruments.extra:
            # Simulation only: the report's "true error" column; never used for decisions.
            from daemon.sim_truth import probe_for
            if (probe := probe_for(self.instruments)) is not None:
                step_params["truth_probe"] = probe
        ctx = StepContext(clock=self.instruments.clock, data_dir=folder,
                          store=JournalStepStore(self.bus, row.id, folder),
                          lm=self.instruments.lm, em=self.instruments.em,
                          params=step_params, log=log.bind(session=row.id))
        hooks = Hooks(step_started=self._hook(row.id, self._events.step_started),
                      progress=self._hook(row.id, self._events.progress),
                      retrying=self._hook(row.id, self._events.retrying))
        return SessionExecution(row.id, plan, ctx, control, self.workers, self.cfg, hooks)

    @staticmethod
    def _hook(sid: str, fn: Callable[..., None]) -> Callable[..., None]:
        return lambda *args: fn(sid, *args)

    def _thread_main(self, live: Live) -> None:
        execution = live.execution
        assert execution is not None
        outcome = execution.validate()
        while True:
            if outcome is None:
                outcome = execution.execute()
            with self._lock:
                # A resume that raced with the pause landing: keep going.
                if (outcome.kind == OutcomeKind.PAUSED and not live.halt
                        and not live.control.pause_requested):
                    outcome = None
                    continue
                self._live.pop(live.session_id, None)
                self._finish(live.session_id, live, outcome)
                self._schedule()
                return

    def _finish(self, sid: str, live: Live, outcome: Outcome) -> None:
        """Map an outcome onto the one transition it calls for (caller holds the lock)."""
        state = self._state(sid)
        kind = outcome.kind
        if state == S.ABORTING:
            if kind == OutcomeKind.DONE:
                self._transition(sid, S.COMPLETED, Reason.PLAN_FINISHED, message=outcome.message)
            else:
                self._transition(sid, S.ABORTED, Reason.ABORTED,
                                 message=live.control.abort_reason or outcome.message,
                                 error=outcome.error)
        elif kind == OutcomeKind.DONE:
            self._transition(sid, S.COMPLETED, Reason.PLAN_FINISHED, message=outcome.message)
        elif kind == OutcomeKind.PAUSED:
            if not (live.halt and state == S.RUNNING):
                self._transition(sid, S.PAUSED, Reason.PAUSED_AT_BOUNDARY,
                                 message=outcome.message)
        elif kind == OutcomeKind.CHECKPOINT:
            target = S.PAUSED if state == S.PAUSING else S.WAITING_OPERATOR
            self._transition(sid, target, Reason.CHECKPOINT, message=outcome.message,
                             waiting_key=outcome.key)
            if (target == S.WAITING_OPERATOR and self.cfg.auto_confirm_checkpoints
                    and outcome.key is not None and not self._stopping):
                self._confirm_by_config(sid, outcome.key)
        elif kind == OutcomeKind.INVALID:
            self._transition(sid, S.FAILED, Reason.PLAN_INVALID, message=outcome.message,
                             error=outcome.error)
        else:
            reason = Reason.WATCHDOG if kind == OutcomeKind.WATCHDOG else Reason.STEP_ERROR
            self._transition(sid, S.PAUSED, reason, message=outcome.message,
                             error=outcome.error)
            self.bus.emit(EventKind.WARNING, sid, {"message": outcome.message,
                                                   "error": outcome.error})

    def _confirm_by_config(self, sid: str, key: str) -> None:
        """``runner.auto_confirm_checkpoints`` (simulated instruments only, see
        daemon/config.py): the checkpoint is journaled as confirmed by "config", the same
        confirmation an operator's ``sessions.confirm`` records (caller holds the lock)."""
        message = f"{key} confirmed by config (runner.auto_confirm_checkpoints)"
        with self.bus.transaction() as tx:
            tx.confirm(sid, key)
            tx.add_event(topic(EventKind.WARNING, sid), sid,
                         {"message": message, "checkpoint": key, "confirmed_by": "config"})
            self._transition(sid, S.RUNNING, Reason.CONFIRMED, message=message,
                             waiting_key=None)
        log.info("session.auto_confirmed", session=sid, key=key)
        self._spawn(sid)

    def _abort_instruments(self, sid: str) -> None:
        for worker in self.workers.values():
            worker.abort_session(sid)

__all__ = ["SessionRunner"]
