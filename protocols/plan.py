"""Plans as data: keyed steps that a runner executes, journals and resumes.

A protocol (an LM atlas, a time-lapse, a tilt series) is a ``Plan`` whose ``steps()``
generator yields ``Step`` objects with stable keys (``lm-atlas/tile-r02-c03``). The runner
runs a step, then commits its JSON result to a ``StepStore`` *before* it counts as done.
On resume, the runner replays the same generator: a step whose key is already in the
store is not run again, and its stored result is what later steps see. Because plans read
earlier results only through ``ctx.result(key)``, a replayed plan makes the same decisions
it made the first time, so nothing is repeated and nothing is lost.

The runner owns time, pause and abort; steps own hardware. Pause and abort requested
mid-step land at the next step boundary; to cancel the step in flight, the caller also
calls the instrument's ``abort()``, which makes the driver raise ``Aborted``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from drivers.base import Aborted, ClemdError, Clock, ElectronMicroscope, LightMicroscope

StepResult = dict[str, Any]
log = structlog.get_logger(__name__)


class StepStore(Protocol):
    """Durable record of finished steps; ``put`` returns only once the result is safe."""

    def get(self, key: str) -> StepResult | None: ...

    def put(self, key: str, result: StepResult) -> None: ...


class MemoryStepStore:
    """A StepStore in memory: for tests and for offline runs that need no resume."""

    def __init__(self) -> None:
        self._results: dict[str, StepResult] = {}
        self.order: list[str] = []

    def get(self, key: str) -> StepResult | None:
        return self._results.get(key)

    def put(self, key: str, result: StepResult) -> None:
        if key in self._results:
            raise InvalidStep(f"step {key!r} committed twice")
        self._results[key] = result
        self.order.append(key)


class InvalidStep(ClemdError):
    """A plan yielded a step the runner cannot accept (duplicate key, bad result)."""


class Paused(ClemdError):
    """The runner stopped at a step boundary because a pause was requested."""

    retryable = True


@dataclass(frozen=True)
class Progress:
    """Published after every step: enough for a progress bar with an ETA."""

    plan: str
    key: str
    title: str
    done: int
    total: int | None
    elapsed_s: float
    eta_s: float | None


@dataclass
class StepContext:
    """What a step may use. Instruments are the contracts of drivers/base.py, nothing else."""

    clock: Clock
    data_dir: Path
    store: StepStore
    lm: LightMicroscope | None = None
    em: ElectronMicroscope | None = None
    params: dict[str, Any] = field(default_factory=dict)
    log: Any = field(default_factory=lambda: log)

    def result(self, key: str) -> StepResult:
        """The committed result of an earlier step; a plan's only way to read the past."""
        r = self.store.get(key)
        if r is None:
            raise InvalidStep(f"step {key!r} has no committed result yet")
        return r

    def require_lm(self) -> LightMicroscope:
        if self.lm is None:
            raise InvalidStep("this step needs a light microscope and none is configured")
        return self.lm

    def require_em(self) -> ElectronMicroscope:
        if self.em is None:
            raise InvalidStep("this step needs an electron microscope and none is configured")
        return self.em


@dataclass(frozen=True)
class Step:
    """One unit of work with a stable key; ``action`` returns a JSON-serialisable result.

    ``checkpoint`` marks a step that waits for an operator (e.g. "freeze and load the
    grid"): the runner does not run its action until the checkpoint is confirmed.
    """

    key: str
    action: Callable[[StepContext], StepResult]
    title: str = ""
    estimate_s: float = 0.0
    instrument: str = ""          # "lm", "em" or "" (compute)
    checkpoint: bool = False


class Plan(ABC):
    """A protocol as data: a generator of keyed steps."""

    name: str = "plan"

    @abstractmethod
    def steps(self, ctx: StepContext) -> Iterator[Step]:
        """Yield steps in order; read earlier results only through ``ctx.result``."""

    def validate(self, ctx: StepContext) -> None:
        """Refuse the whole plan before anything moves (limits, channels, tilt range)."""

    def total_steps(self, ctx: StepContext) -> int | None:
        """Number of steps if known (for progress bars), else None; asked again after every
        step, so it may sharpen as results are committed. Keep it cheap."""
        return None


class RunControl:
    """Pause/abort requests from another thread, honoured at step boundaries."""

    def __init__(self) -> None:
        self._pause = threading.Event()
        self._abort = threading.Event()
        self.abort_reason = ""
        self.confirmed: set[str] = set()

    def request_pause(self) -> None:
        self._pause.set()

    def clear_pause(self) -> None:
        self._pause.clear()

    def request_abort(self, reason: str = "aborted by request") -> None:
        self.abort_reason = reason
        self._abort.set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    @property
    def abort_requested(self) -> bool:
        return self._abort.is_set()


class CheckpointWaiting(ClemdError):
    """The next step is an operator checkpoint that has not been confirmed yet."""

    retryable = True

    def __init__(self, key: str, title: str) -> None:
        super().__init__(f"waiting for operator confirmation: {title or key}")
        self.key = key
        self.title = title


def run_plan(plan: Plan, ctx: StepContext, control: RunControl | None = None,
             on_progress: Callable[[Progress], None] | None = None,
             on_step_start: Callable[[Step], None] | None = None) -> list[str]:
    """Run ``plan`` to the end, skipping committed steps; return the keys run this time.

    Raises ``Paused`` or ``CheckpointWaiting`` at a boundary (call again to continue),
    ``Aborted`` when an abort was requested, and whatever a step raised otherwise (the step
    is then not committed, so a resume runs it again).
    """
    control = control or RunControl()
    plan.validate(ctx)
    total = plan.total_steps(ctx)
    seen: set[str] = set()
    ran: list[str] = []
    t0 = ctx.clock.now()
    done = 0
    for step in plan.steps(ctx):
        if step.key in seen:
            raise InvalidStep(f"plan {plan.name} yielded step key {step.key!r} twice")
        seen.add(step.key)
        if ctx.store.get(step.key) is not None:
            done += 1
            continue
        if control.abort_requested:
            raise Aborted(control.abort_reason or "aborted by request")
        if control.pause_requested:
            raise Paused(f"paused before step {step.key}")
        if step.checkpoint and step.key not in control.confirmed:
            raise CheckpointWaiting(step.key, step.title)
        if on_step_start is not None:
            on_step_start(step)
        bound = ctx.log.bind(step=step.key) if hasattr(ctx.log, "bind") else ctx.log
        bound.info("step.start", title=step.title)
        result = step.action(ctx)
        if not isinstance(result, dict):
            raise InvalidStep(f"step {step.key} returned {type(result).__name__}, not a dict")
        ctx.store.put(step.key, result)
        bound.info("step.done")
        ran.append(step.key)
        done += 1
        if on_progress is not None:
            # Plans whose later steps depend on earlier results (squares chosen, targets
            # transferred) only know their total as decisions are committed: ask again.
            total = plan.total_steps(ctx)
            elapsed = ctx.clock.now() - t0
            eta = (elapsed / len(ran) * (total - done)) if total and ran else None
            on_progress(Progress(plan.name, step.key, step.title, done, total, elapsed, eta))
    return ran

