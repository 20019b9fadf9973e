"""Executing one session's plan: steps dispatched to instrument workers, retries, outcome.

``execute`` runs on the session's own thread. It never changes session state itself: it
returns an ``Outcome`` and the runner (daemon/runner.py) makes the one transition that
outcome calls for. Retries happen only where a retry is safe: the error's class says a retry
can help (ConnectionLost, DeviceBusy, DeviceTimeout from the driver), the step is not an
operator checkpoint, no pause or abort is pending, and the error is not a watchdog expiry
(the instrument's state is unknown then). Every step is keyed and re-runnable by contract,
since resume re-runs the step in flight anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog

from daemon.config import RunnerConfig
from daemon.errors import WatchdogExpired
from daemon.workers import InstrumentWorker
from drivers.base import Aborted, ClemdError, RealClock
from protocols.plan import (
    CheckpointWaiting,
    Paused,
    Plan,
    Progress,
    RunControl,
    Step,
    StepContext,
    StepResult,
    run_plan,
)

log = structlog.get_logger(__name__)


class OutcomeKind(Enum):
    DONE = "done"
    PAUSED = "paused"
    CHECKPOINT = "checkpoint"
    ABORTED = "aborted"
    ERROR = "error"
    WATCHDOG = "watchdog"
    INVALID = "invalid"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    message: str = ""
    key: str | None = None
    error: dict[str, Any] | None = None


def error_record(err: BaseException, step: str | None = None) -> dict[str, Any]:
    """How an error is stored on the session and shown to clients."""
    return {"type": type(err).__name__, "message": str(err),
            "retryable": bool(getattr(err, "retryable", False)), "step": step}


@dataclass
class Hooks:
    """Callbacks into the runner (journal and events), called on the session thread."""

    step_started: Callable[[Step], None]
    progress: Callable[[Progress], None]
    retrying: Callable[[Step, ClemdError, int], None]


class DispatchPlan(Plan):
    """Wraps a plan so that each step's action runs on its instrument's worker."""

    def __init__(self, inner: Plan, run_step: Callable[[Step, StepContext], StepResult]) -> None:
        self.inner = inner
        self.name = inner.name
        self._run_step = run_step

    def validate(self, ctx: StepContext) -> None:
        self.inner.validate(ctx)

    def total_steps(self, ctx: StepContext) -> int | None:
        return self.inner.total_steps(ctx)

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        for step in self.inner.steps(ctx):
            yield dataclasses.replace(step, action=self._bind(step))

    def _bind(self, step: Step) -> Callable[[StepContext], StepResult]:
        return lambda ctx: self._run_step(step, ctx)


class SessionExecution:
    """One run of a session's plan until it ends, pauses or waits for an operator."""

    def __init__(self, session_id: str, plan: Plan, ctx: StepContext, control: RunControl,
                 workers: dict[str, InstrumentWorker], cfg: RunnerConfig, hooks: Hooks) -> None:
        self.session_id = session_id
        self.plan = plan
        self.ctx = ctx
        self.control = control
        self.workers = workers
        self.cfg = cfg
        self.hooks = hooks
        self.current: Step | None = None
        self.last_progress: Progress | None = None

    def validate(self) -> Outcome | None:
        """Check the whole plan before anything moves; an Outcome if it is refused."""
        try:
            self.plan.validate(self.ctx)
        except ClemdError as err:
            return Outcome(OutcomeKind.INVALID, str(err), error=error_record(err))
        return None

    def execute(self) -> Outcome:
        plan = DispatchPlan(self.plan, self._run_step)
        try:
            run_plan(plan, self.ctx, self.control, on_progress=self._progress,
                     on_step_start=self._started)
        except Paused as err:
            return Outcome(OutcomeKind.PAUSED, str(err))
        except CheckpointWaiting as err:
            return Outcome(OutcomeKind.CHECKPOINT, str(err), key=err.key)
        except WatchdogExpired as err:
            return self._failed(OutcomeKind.WATCHDOG, err)
        except Aborted as err:
            if self.control.abort_requested:
                return Outcome(OutcomeKind.ABORTED, self.control.abort_reason or str(err))
            return self._failed(OutcomeKind.ERROR, err)
        except Exception as err:  # noqa: BLE001 - the step runner records every step failure
            return self._failed(OutcomeKind.ERROR, err)
        return Outcome(OutcomeKind.DONE, "plan finished")

    def _failed(self, kind: OutcomeKind, err: BaseException) -> Outcome:
        step = self.current.key if self.current else None
        log.error("step.failed", session=self.session_id, step=step, error=str(err),
                  error_type=type(err).__name__, exc_info=not isinstance(err, ClemdError))
        return Outcome(kind, f"step {step} failed: {err}", key=step,
                       error=error_record(err, step))

    def _started(self, step: Step) -> None:
        self.current = step
        self.hooks.step_started(step)

    def _progress(self, p: Progress) -> None:
        self.last_progress = p
        self.hooks.progress(p)

    def _timeout(self, step: Step) -> float:
        limit = self.cfg.watchdog_s
        if isinstance(self.ctx.clock, RealClock):
            limit = max(limit, step.estimate_s * self.cfg.watchdog_estimate_factor)
        return limit

    def _run_step(self, step: Step, ctx: StepContext) -> StepResult:
        worker = self.workers.get(step.instrument)
        if worker is None:
            raise ClemdError(f"step {step.key} names instrument {step.instrument!r}; known: "
                             f"{sorted(k or 'compute' for k in self.workers)}")
        attempt = 0
        while True:
            try:
                return worker.run(lambda: step.action(ctx), session_id=self.session_id,
                                  step=step.key, timeout_s=self._timeout(step),
                                  abort_grace_s=self.cfg.abort_grace_s)
            except ClemdError as err:
                if not self._may_retry(step, err, attempt):
                    raise
                attempt += 1
                self.hooks.retrying(step, err, attempt)
                ctx.clock.sleep(self.cfg.retry_backoff_s * attempt)

    def _may_retry(self, step: Step, err: ClemdError, attempt: int) -> bool:
        return (err.retryable and not isinstance(err, WatchdogExpired) and not step.checkpoint
                and attempt < self.cfg.step_retries and not self.control.abort_requested
                and not self.control.pause_requested)
