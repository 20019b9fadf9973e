"""Shared fixtures for driver tests.

The Micro-Manager tests run on a real MMCore with Micro-Manager's demo devices
(mm-test-adapters). pycromanager's in-process core is process-global and cannot be
restarted, so one connection serves the whole session, and each test builds a fresh
driver on it (which applies the first objective and channel) and starts from the origin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from drivers.clock import VirtualClock
from drivers.micromanager import MicroManagerLightMicroscope
from drivers.micromanager_config import demo_config
from drivers.micromanager_core import MMConnection


@pytest.fixture(scope="session")
def mm_connection() -> Iterator[MMConnection]:
    """The session's in-process MMCore with the demo devices; stopped at the end."""
    with MMConnection.open(demo_config().connection) as connection:
        yield connection


@pytest.fixture
def mm_clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def mm_light(mm_connection: MMConnection,
             mm_clock: VirtualClock) -> Iterator[MicroManagerLightMicroscope]:
    """A fresh driver on the shared core, stage at the origin, closed after the test."""
    light = MicroManagerLightMicroscope(demo_config(), mm_connection, mm_clock)
    light.move_xy(0.0, 0.0)
    light.move_z(0.0)
    yield light
    light.close()
