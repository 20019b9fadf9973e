"""One worker thread per instrument, and the watchdog around every call it makes.

Steps run on the worker of their instrument (``Step.instrument``: "lm", "em", or "" for
compute), so hardware calls never run on the API thread and two sessions never talk to the
same instrument at once. The session thread waits for the call with a timeout; when it
expires the instrument is told to abort, and if the call still does not return within the
grace period the worker is marked hung and the step fails with ``WatchdogExpired``. A hung
worker refuses new calls at once (instead of queueing behind a call that may never return)
until the stuck call comes back.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import structlog

from daemon.errors import WatchdogExpired
from daemon.instruments import Instrument

log = structlog.get_logger(__name__)
T = TypeVar("T")


class WorkerState(str, Enum):
    IDLE = "idle"
    BUSY = "busy"
    HUNG = "hung"


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot for the ``devices.status`` method."""

    name: str
    state: WorkerState
    session_id: str | None
    step: str | None
    busy_for_s: float | None
    calls: int
    last_error: str | None


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future[Any]
    session_id: str
    step: str


class InstrumentWorker:
    """Runs calls for one instrument in order, on its own thread."""

    def __init__(self, name: str, instrument: Instrument | None) -> None:
        self.name = name
        self.instrument = instrument
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._current: _Job | None = None
        self._started_at: float | None = None
        self._hung = False
        self._calls = 0
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T], *, session_id: str, step: str, timeout_s: float,
            abort_grace_s: float) -> T:
        """Run ``fn`` on this worker and return its result; re-raise what it raised.

        Raises WatchdogExpired when it does not return within ``timeout_s`` (plus
        ``abort_grace_s`` after the instrument was told to abort), or at once when an
        earlier call is still stuck.
        """
        with self._lock:
            if self._hung and self._current is not None:
                raise WatchdogExpired(
                    f"instrument {self.name} is still stuck in step {self._current.step} of "
                    f"session {self._current.session_id}; it must return (or the service be "
                    f"restarted) before step {step} can run")
        job = _Job(fn, Future(), session_id, step)
        self._queue.put(job)
        try:
            return job.future.result(timeout=timeout_s)   # type: ignore[no-any-return]
        except FutureTimeout:
            pass
        log.error("watchdog.expired", instrument=self.name, session=session_id, step=step,
                  timeout_s=timeout_s)
        with self._lock:
            self._hung = True
        self.abort_instrument()
        try:
            job.future.result(timeout=abort_grace_s)
        except FutureTimeout:
            raise WatchdogExpired(
                f"step {step}: instrument {self.name} did not return within {timeout_s:g} s "
                f"(runner.watchdog_s) nor {abort_grace_s:g} s after abort "
                f"(runner.abort_grace_s); the session is paused") from None
        except BaseException as err:
            raise WatchdogExpired(f"step {step}: instrument {self.name} did not return within "
                                  f"{timeout_s:g} s (runner.watchdog_s); aborted: {err}") from err
        raise WatchdogExpired(f"step {step}: instrument {self.name} returned only after "
                              f"{timeout_s:g} s (runner.watchdog_s); its result is discarded "
                              f"and the step will run again on resume")

    def abort_session(self, session_id: str) -> bool:
        """Abort the instrument if it is running a call of ``session_id``; True if it was."""
        with self._lock:
            current = self._current
        if current is None or current.session_id != session_id:
            return False
        self.abort_instrument()
        return True

    def abort_instrument(self) -> None:
        if self.instrument is not None:
            log.warning("instrument.abort", instrument=self.name)
            self.instrument.abort()

    def status(self) -> WorkerStatus:
        with self._lock:
            cur, started = self._current, self._started_at
            state = (WorkerState.HUNG if self._hung else
                     WorkerState.BUSY if cur is not None else WorkerState.IDLE)
            return WorkerStatus(self.name, state, cur.session_id if cur else None,
                                cur.step if cur else None,
                                time.monotonic() - started if started is not None else None,
                                self._calls, self._last_error)

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to finish after its current call; True if it did within timeout."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._current, self._started_at = job, time.monotonic()
            if self.instrument is not None:
                # An abort that landed as the previous step ended must not hit this one; an
                # abort meant for this session is still caught at the plan's step boundary.
                self.instrument.clear_abort()
            try:
                result = job.fn()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting session thread
                with self._lock:
                    self._last_error = f"{type(err).__name__}: {err}"
                job.future.set_exception(err)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._current, self._started_at, self._hung = None, None, False
                    self._calls += 1
