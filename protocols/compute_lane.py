"""A background thread for a protocol's compute, so that it runs while the hardware works.

Why: on a microscope most of a protocol's time is the instrument's (stage moves and settles,
the filter turret turns, the camera exposes) while the computer waits. Work that does not
decide the next hardware step (registering a tile's overlaps, writing its file, blending it
into the atlas, scoring an autofocus frame) can run meanwhile in one worker thread: numpy,
OpenCV, scipy.fft and file writes release the GIL. The instrument stays on the caller's
thread, in the caller's order, so hardware sequences and random draws of a simulator do not
depend on thread timing, and the worker runs jobs strictly in submission order, so results
do not either.

A job's result (or its exception, re-raised in the thread that asks) is taken with
``Job.result``. Hand-overs carry clock stamps (``Clock.catch_up``): no effect on a real or a
virtual clock, and on ``CriticalPathClock`` (benchmarks) they make waiting for a result that
was not ready cost the waiting thread time, so overlapped compute is measured as it plays out.

The lane holds at most ``max_pending`` unfinished jobs: ``submit`` beyond that first waits for
the oldest, so the caller can never outrun the worker by more than that (memory stays bounded).
The worker thread ends after ``idle_exit_s`` without work and starts again on the next submit,
so a lane whose owner was dropped (a plan paused and rebuilt) leaves no thread behind.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

from drivers.clock import Clock

__all__ = ["ComputeLane", "Job"]

T = TypeVar("T")
log = structlog.get_logger(__name__)


class Job(Generic[T]):
    """One submitted computation; ``result()`` waits for it and returns or re-raises."""

    def __init__(self, fn: Callable[[], T], clock: Clock, name: str) -> None:
        self.name = name
        self._fn: Callable[[], T] | None = fn
        self._clock = clock
        self.queued_at = clock.now()
        self.done_at = self.queued_at
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self.collected = False

    def _run(self) -> None:
        self._clock.catch_up(self.queued_at)      # it cannot start before it was queued
        try:
            assert self._fn is not None, "a job runs once"
            self._value = self._fn()
        except BaseException as err:  # noqa: BLE001 - handed to the thread that asks (result)
            self._error = err
        self.done_at = self._clock.now()
        self._fn = None                            # drop what the closure held
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        """Wait for the job; return its value or raise its exception in this thread."""
        with self._clock.uncounted():
            self._done.wait()
        self._clock.catch_up(self.done_at)
        self.collected = True
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set unless _error is


def _worker(jobs: queue.Queue[Job[object] | None], clock: Clock, idle_exit_s: float,
            stopped: threading.Event, lock: threading.Lock) -> None:
    while True:
        with clock.uncounted():
            try:
                job = jobs.get(timeout=idle_exit_s)
            except queue.Empty:
                job = None
        if job is None:               # idle, or closed: end unless work came in meanwhile
            with lock:                # submit checks ``stopped`` and queues under this lock
                if jobs.empty():
                    stopped.set()
                    return
            continue
        job._run()


class ComputeLane:
    """One worker thread running submitted jobs in order (see the module docstring)."""

    def __init__(self, clock: Clock, name: str, *, max_pending: int = 64,
                 idle_exit_s: float = 30.0) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending {max_pending} must be >= 1")
        self.clock = clock
        self.name = name
        self.max_pending = max_pending
        self.idle_exit_s = idle_exit_s
        self._jobs: queue.Queue[Job[object] | None] = queue.Queue()
        self._pending: deque[Job[object]] = deque()
        self._last: Job[object] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T], name: str = "") -> Job[T]:
        """Queue ``fn`` after every job submitted before it; return its handle.

        With ``max_pending`` jobs unfinished, waits for the oldest first (its exception, if
        any, stays with it for its own ``result``).
        """
        while self._pending and self._pending[0].done:
            self._pending.popleft()
        if len(self._pending) >= self.max_pending:
            oldest = self._pending.popleft()
            with self.clock.uncounted():
                oldest._done.wait()
            self.clock.catch_up(oldest.done_at)
        job: Job[T] = Job(fn, self.clock, name)
        self._pending.append(job)  # type: ignore[arg-type]  # a Job[T] is a Job[object] here
        self._last = job  # type: ignore[assignment]
        with self._lock:
            if self._thread is None or self._stopped.is_set():
                self._stopped = threading.Event()
                self._thread = threading.Thread(
                    target=_worker, args=(self._jobs, self.clock, self.idle_exit_s,
                                          self._stopped, self._lock),
                    name=f"clemd-{self.name}", daemon=True)
                self._thread.start()
            self._jobs.put(job)  # type: ignore[arg-type]
        return job

    def drain(self) -> None:
        """Wait for every job submitted so far (their exceptions stay with them).

        Catches up with the last job's finish even when it finished before (in wall time):
        jobs run in order, so that is when the lane's work was done on the clock.
        """
        while self._pending:
            job = self._pending.popleft()
            with self.clock.uncounted():
                job._done.wait()
        if self._last is not None:
            self.clock.catch_up(self._last.done_at)

    def close(self) -> None:
        """Finish queued work and end the thread; a job whose exception nobody collected
        is logged (its owner failed first and is raising its own error)."""
        pending = list(self._pending)
        self.drain()
        with self._lock:
            thread = self._thread
            if thread is not None and not self._stopped.is_set():
                self._jobs.put(None)
        if thread is not None:
            with self.clock.uncounted():
                thread.join()
        for job in pending:
            if job._error is not None and not job.collected:
                log.error("compute_lane.uncollected_error", lane=self.name, job=job.name,
                          error=repr(job._error))
