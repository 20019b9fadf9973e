"""The LM atlas's background compute: the lane's order and errors, and how the critical-path
clock accounts for work that overlaps hardware waits (and for work that does not)."""

from __future__ import annotations

import time

import pytest

from drivers.clock import CriticalPathClock, VirtualClock
from drivers.errors import HardwareFault
from protocols.compute_lane import ComputeLane


def _busy(seconds: float) -> float:
    """Compute for ``seconds`` of wall time (what a registration or a file write costs)."""
    end = time.perf_counter() + seconds
    n = 0.0
    while time.perf_counter() < end:
        n += 1.0
    return n


def test_jobs_run_in_order_and_errors_reach_the_caller() -> None:
    lane = ComputeLane(VirtualClock(), "test", max_pending=2)
    seen: list[int] = []
    jobs = [lane.submit(lambda k=k: seen.append(k) or k) for k in range(6)]

    def fail() -> int:
        raise HardwareFault("disk full")
    bad = lane.submit(fail, "fails")
    assert [j.result() for j in jobs] == list(range(6)) and seen == list(range(6))
    with pytest.raises(HardwareFault, match="disk full"):
        bad.result()
    lane.close()
    assert lane.submit(lambda: 7).result() == 7         # a closed lane starts a new thread
    lane.close()


def test_overlapped_compute_costs_nothing_on_the_critical_path() -> None:
    """A job queued before a 1 s hardware wait and collected after it does not lengthen the
    instrument thread's timeline; collected at once, it does, by its duration."""
    clock = CriticalPathClock()
    lane = ComputeLane(clock, "test")
    job = lane.submit(lambda: _busy(0.2))
    clock.sleep(1.0)                                     # the stage moves meanwhile
    job.result()
    overlapped = clock.timeline()
    assert overlapped.waited_s == pytest.approx(1.0)
    assert overlapped.stalled_s == 0.0
    assert overlapped.now_s - overlapped.waited_s < 0.1     # only the thread's own bookkeeping

    lane.submit(lambda: _busy(0.2)).result()            # the next step needs it now
    serial = clock.timeline()
    assert serial.stalled_s == pytest.approx(0.2, abs=0.1)
    assert serial.now_s - overlapped.now_s >= 0.2
    lane.close()


def test_instrument_thread_compute_counts_and_uncounted_stretches_do_not() -> None:
    clock = CriticalPathClock()
    start = clock.timeline()
    _busy(0.03)                                          # protocol compute between steps
    with clock.uncounted():                              # a simulator rendering a frame
        _busy(0.03)
        clock.sleep(0.02)                                # the exposure it models
    end = clock.timeline()
    assert 0.03 <= end.compute_s - start.compute_s < 0.06     # the uncounted 0.03 s is out
    assert end.waited_s == pytest.approx(0.02)
    assert end.now_s == pytest.approx(end.compute_s + 0.02)
