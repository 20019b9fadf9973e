"""Shared fixtures for driver tests.

The Micro-Manager tests run on a real MMCore with Micro-Manager's demo devices
(mm-test-adapters). pycromanager's in-process core is process-global and cannot be
restarted, so one connection serves the whole session, and each test builds a fresh
driver on it (which applies the first objective and channel) and starts from the origin.

The SerialEM tests drive the real driver over TCP to the SerialEM twin (simulators/), built
by ``make_serialem``; ``record=True`` puts a RecordingLink under the driver so a test can
check which commands reached SerialEM (``serialem_calls``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from drivers.clock import VirtualClock
from drivers.errors import ConnectionLost, InvalidState
from drivers.micromanager import MicroManagerLightMicroscope
from drivers.micromanager_config import demo_config
from drivers.micromanager_core import MMConnection
from drivers.serialem.client import Result, SerialEMClient, SerialEMLink
from drivers.serialem.config import SerialEMConfig
from drivers.serialem.microscope import SerialEMElectronMicroscope
from simulators.electron import SimulatedElectronMicroscope
from simulators.serialem_server import SerialEMTwin, TwinFaults
from simulators.specimen import Specimen

MakeTwin = Callable[..., SerialEMTwin]
MakeSerialEM = Callable[..., tuple[SerialEMTwin, SerialEMElectronMicroscope]]


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


# --------------------------------------------------------------------------- SerialEM twin


class RecordingLink:
    """The real client, with every command name it is asked to send recorded."""

    def __init__(self, link: SerialEMLink, calls: list[str]) -> None:
        self.link = link
        self.calls = calls

    def call(self, name: str, *args: object) -> Result:
        self.calls.append(name)
        return self.link.call(name, *args)

    def get_image(self, buffer: str = "A", *, fft: bool = False) -> Any:
        self.calls.append(f"get_image {buffer}")
        return self.link.get_image(buffer, fft=fft)

    def put_image(self, image: Any, buffer: str = "A", **kw: Any) -> None:
        self.link.put_image(image, buffer, **kw)

    def close(self) -> None:
        self.link.close()


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return Specimen.generate(seed=7)


@pytest.fixture
def make_serialem_twin(specimen: Specimen) -> Iterator[MakeTwin]:
    """Started twins over a simulated TEM of ``specimen`` (``sim``: the simulator's overrides,
    e.g. ``camera`` or its own ``faults``); every twin is closed after the test."""
    twins: list[SerialEMTwin] = []

    def factory(faults: TwinFaults | None = None,
                sim: dict[str, Any] | None = None) -> SerialEMTwin:
        microscope = SimulatedElectronMicroscope.for_tests(specimen, VirtualClock(),
                                                           **(sim or {}))
        twins.append(SerialEMTwin(microscope, faults=faults).start())
        return twins[-1]

    yield factory
    for twin in twins:
        twin.close()


@pytest.fixture
def serialem_calls() -> dict[int, list[str]]:
    """The command names each recording driver sent, by ``id`` of the driver."""
    return {}


@pytest.fixture
def make_serialem(make_serialem_twin: MakeTwin,
                  serialem_calls: dict[int, list[str]]) -> Iterator[MakeSerialEM]:
    """(twin, driver) pairs; each driver is closed after the test, before its twin.

    ``camera`` and ``sim`` go to the simulator, ``faults`` to the twin, other keywords to the
    driver's settings. Without ``record`` the driver is opened as the daemon opens it
    (``from_config``, address from the settings or ``environ``); with ``record`` it runs on a
    RecordingLink over a client sharing the driver's virtual clock, whose resend window is
    ``resend_window_s``.
    """
    made: list[SerialEMElectronMicroscope] = []

    def factory(camera: tuple[int, int], faults: TwinFaults | None = None,
                sim: dict[str, Any] | None = None, *, record: bool = False,
                environ: dict[str, str] | None = None, resend_window_s: float = 0.2,
                **settings: Any) -> tuple[SerialEMTwin, SerialEMElectronMicroscope]:
        twin = make_serialem_twin(faults, {"camera": camera, **(sim or {})})
        config = twin.driver_config(**settings)
        if record:
            em = _recording_driver(config, twin, resend_window_s, serialem_calls)
        else:
            em = SerialEMElectronMicroscope.from_config(config, clock=VirtualClock(),
                                                        environ=environ or {})
        made.append(em)
        return twin, em

    yield factory
    for em in made:
        with contextlib.suppress(ConnectionLost, InvalidState):
            em.close()


def _recording_driver(config: SerialEMConfig, twin: SerialEMTwin, resend_window_s: float,
                      calls: dict[int, list[str]]) -> SerialEMElectronMicroscope:
    """A driver whose link records every command into ``calls[id(driver)]``."""
    clock = VirtualClock()
    host, port = twin.address
    sent: list[str] = []
    link = SerialEMClient(host, port, resend_window_s=resend_window_s, clock=clock)
    em = SerialEMElectronMicroscope(config, RecordingLink(link, sent), clock=clock)
    calls[id(em)] = sent
    return em
