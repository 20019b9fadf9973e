"""Clocks: the only source of time in clemd.

Drivers, simulators and protocols read time and wait through a ``Clock`` handed to them,
never through ``time`` directly. With a ``VirtualClock`` a simulated 40-minute time-lapse
runs in well under a second, and tests are deterministic.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Clock(ABC):
    """Seconds since an arbitrary origin, and a way to wait."""

    @abstractmethod
    def now(self) -> float:
        """Current time in seconds (monotonic)."""

    @abstractmethod
    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; a negative or zero wait returns at once."""

    def sleep_until(self, t: float) -> None:
        """Wait until ``now() >= t``; return at once if that time has passed."""
        remaining = t - self.now()
        if remaining > 0:
            self.sleep(remaining)

    def catch_up(self, t: float) -> None:
        """Continue no earlier than ``t``, a time another thread stamped on a result it handed
        over (a background computation finished at ``t``).

        Real and virtual clocks share one timeline, so the stamp is already past and this
        returns at once; ``CriticalPathClock`` keeps a timeline per thread and moves this
        thread's to ``t``, which is how waiting for another thread's result costs time there.
        """
        if t > self.now():
            self.sleep(t - self.now())

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Mark wall time on this thread that is neither protocol compute nor an instrument wait.

        Two things are: a thread blocked on another thread (its result, or an empty work queue),
        and a simulator computing what the hardware delivers during a wait it models (a frame
        rendered during its exposure). Real and virtual clocks need nothing; ``CriticalPathClock``
        leaves such stretches out of the thread's compute.
        """
        yield


class RealClock(Clock):
    """Wall-clock time for real instruments."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock(Clock):
    """Simulated time that advances only when something waits.

    A simulator models the duration of a stage move or an exposure by sleeping on this
    clock, which advances ``now()`` instantly. Waits from several threads add up, as if
    the instruments shared one timeline; this is exact for a single worker and a close
    upper bound for two workers that rarely overlap.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._now += float(seconds)

    def advance(self, seconds: float) -> None:
        """Move time forward without anyone waiting (e.g. the operator's freezing step)."""
        self.sleep(seconds)


@dataclass(frozen=True)
class ThreadTimeline:
    """One thread's account on a ``CriticalPathClock`` (seconds).

    ``now_s``: where its timeline stands; ``waited_s``: sleeps (instrument waits: moves,
    exposures, schedule); ``compute_s``: wall time spent between clock calls outside
    ``uncounted``; ``stalled_s``: time ``catch_up`` added (waiting for another thread's result
    that was not ready yet on the modelled timeline).
    """

    now_s: float
    waited_s: float
    compute_s: float
    stalled_s: float


class _Account:
    def __init__(self, t: float) -> None:
        self.t = t
        self.last = time.perf_counter()
        self.depth = 0
        self.waited = 0.0
        self.compute = 0.0
        self.stalled = 0.0


class CriticalPathClock(Clock):
    """Virtual instrument time plus measured compute: how long a run takes on real hardware.

    Why: on a microscope the stage moves and the camera exposes while the computer is idle,
    so a protocol that computes in a background thread during those waits costs nothing extra,
    while compute between hardware steps adds to the run. A ``VirtualClock`` hides all
    compute, and adding all of it to the hardware time counts overlapped work as serial.
    This clock keeps one timeline per thread: a thread's time advances by its sleeps, as on
    a ``VirtualClock``, and by the wall time it spends between calls to the clock (its
    compute), except stretches inside ``uncounted`` (a simulator rendering a frame during the
    exposure it models, a thread blocked on another). Results handed between threads carry
    stamps: a worker starting a job catches up to the time the job was queued, a thread taking
    a result catches up to the time it was finished. The instrument thread's ``now()`` then
    is the run's critical path, assuming one core per busy thread (an acquisition PC has
    several); measured on a loaded machine the compute is, if anything, overstated.

    Benchmarks only: the wall-time measurement makes results vary from run to run.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._start = float(start)
        self._lock = threading.Lock()
        self._accounts: dict[int, _Account] = {}

    def _account(self) -> _Account:
        ident = threading.get_ident()
        with self._lock:
            acc = self._accounts.get(ident)
            if acc is None:
                acc = self._accounts[ident] = _Account(self._start)
        return acc

    def _charge(self, acc: _Account) -> None:
        wall = time.perf_counter()
        if acc.depth == 0:
            acc.t += wall - acc.last
            acc.compute += wall - acc.last
        acc.last = wall

    def now(self) -> float:
        acc = self._account()
        self._charge(acc)
        return acc.t

    def sleep(self, seconds: float) -> None:
        acc = self._account()
        self._charge(acc)
        if seconds > 0:
            acc.t += float(seconds)
            acc.waited += float(seconds)

    def catch_up(self, t: float) -> None:
        acc = self._account()
        self._charge(acc)
        if t > acc.t:
            acc.stalled += t - acc.t
            acc.t = float(t)

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        acc = self._account()
        self._charge(acc)
        acc.depth += 1
        try:
            yield
        finally:
            acc.depth -= 1
            acc.last = time.perf_counter()   # the stretch inside is dropped

    def timeline(self, ident: int | None = None) -> ThreadTimeline:
        """The account of thread ``ident`` (default: the calling thread), charged up to now."""
        if ident is None:
            acc = self._account()
            self._charge(acc)
        else:
            with self._lock:
                acc = self._accounts[ident]
        return ThreadTimeline(acc.t, acc.waited, acc.compute, acc.stalled)

    def timelines(self) -> dict[int, ThreadTimeline]:
        """Every thread's account as last charged (threads other than the caller's stop
        being charged at their last clock call)."""
        with self._lock:
            items = list(self._accounts.items())
        return {k: ThreadTimeline(a.t, a.waited, a.compute, a.stalled) for k, a in items}
