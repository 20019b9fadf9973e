"""The journal entries and events a running session produces between its state changes."""

from __future__ import annotations

import structlog

from daemon.config import RunnerConfig
from daemon.events import EventBus, EventKind, topic
from daemon.journal import VIRTUAL_CLOCK_KEY
from daemon.session_exec import error_record
from drivers.base import ClemdError
from drivers.clock import Clock, VirtualClock
from protocols.plan import Progress, Step

log = structlog.get_logger(__name__)


class StepEvents:
    """Called on session threads: a step started, a step was committed, a step is retried."""

    def __init__(self, bus: EventBus, cfg: RunnerConfig, clock: Clock) -> None:
        self.bus = bus
        self.cfg = cfg
        self.clock = clock

    def step_started(self, sid: str, step: Step) -> None:
        with self.bus.transaction() as tx:
            tx.update_session(sid, current_step=step.key)
            tx.add_event(topic(EventKind.STEP, sid), sid,
                         {"key": step.key, "title": step.title, "instrument": step.instrument,
                          "checkpoint": step.checkpoint, "estimate_s": step.estimate_s})

    def progress(self, sid: str, p: Progress) -> None:
        """Publish progress; with a virtual clock also journal its time, so that simulated
        time continues from the last committed step after a restart instead of from 0."""
        with self.bus.transaction() as tx:
            tx.add_event(topic(EventKind.PROGRESS, sid), sid,
                         {"plan": p.plan, "key": p.key, "title": p.title, "done": p.done,
                          "total": p.total, "elapsed_s": p.elapsed_s, "eta_s": p.eta_s})
            if isinstance(self.clock, VirtualClock):
                tx.set_meta(VIRTUAL_CLOCK_KEY, repr(self.clock.now()))

    def retrying(self, sid: str, step: Step, err: ClemdError, attempt: int) -> None:
        log.warning("step.retry", session=sid, step=step.key, attempt=attempt, error=str(err))
        self.bus.emit(EventKind.WARNING, sid,
                      {"message": f"retrying step {step.key} after {type(err).__name__}: {err} "
                                  f"(attempt {attempt + 1} of {self.cfg.step_retries + 1})",
                       "step": step.key, "error": error_record(err, step.key)})
