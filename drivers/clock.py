"""Clocks: the only source of time in clemd.

Drivers, simulators and protocols read time and wait through a ``Clock`` handed to them,
never through ``time`` directly. With a ``VirtualClock`` a simulated 40-minute time-lapse
runs in well under a second, and tests are deterministic.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod


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
