"""Fixtures for the service tests: configs on free loopback ports, an in-process service on
real sockets, clients that are always closed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon import logs
from daemon.client import ClemdClient, CurveClientKeys
from daemon.config import ServiceConfig, config_from_mapping
from daemon.service import Service
from daemon.templates import TemplateRegistry, default_registry

SMALL_LM = {"camera": {"shape": [64, 64]}}
SMALL_EM = {"camera_shape": [128, 128]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_dict(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A simulated-instruments config on two free loopback ports."""
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "api": {"bind": f"tcp://127.0.0.1:{free_port()}",
                "events": f"tcp://127.0.0.1:{free_port()}"},
        "lm": {"kind": "simulated", "settings": SMALL_LM},
        "em": {"kind": "simulated", "settings": SMALL_EM},
        "runner": {"retry_backoff_s": 0.0},
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@pytest.fixture(autouse=True, scope="session")
def _logs_to_stderr() -> Iterator[None]:
    """Service logs as JSON on stderr (as `clemd serve` writes them), so stdout stays the
    CLI's; structlog's defaults come back afterwards."""
    logs.configure("info")
    yield
    structlog.reset_defaults()


@dataclass
class Running:
    """A service serving on a thread; ``client()`` gives closed-at-teardown clients."""

    service: Service
    cfg: ServiceConfig
    thread: threading.Thread
    clients: list[ClemdClient] = field(default_factory=list)

    def client(self, keys: CurveClientKeys | None = None, timeout_s: float = 10.0) -> ClemdClient:
        c = ClemdClient(self.cfg.api.bind, self.cfg.api.events, keys=keys, timeout_s=timeout_s)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        self.service.stop_event.set()
        self.thread.join(30)
        self.service.close()


def start_service(cfg: ServiceConfig, registry: TemplateRegistry | None = None) -> Running:
    service = Service(cfg, registry=registry)
    service.start()
    thread = threading.Thread(target=service.serve, name="test-serve", daemon=True)
    thread.start()
    return Running(service, cfg, thread)


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start services; each is stopped and closed at teardown."""
    started: list[Running] = []

    def make(registry: TemplateRegistry | None = None, data_dir: Path | None = None,
             **overrides: Any) -> Running:
        cfg = config_from_mapping(config_dict(data_dir or tmp_path / "data", **overrides))
        running = start_service(cfg, registry or default_registry())
        started.append(running)
        return running

    yield make
    for running in reversed(started):
        running.stop()


@pytest.fixture
def service(make_service: Callable[..., Running]) -> Running:
    return make_service()


@pytest.fixture
def client(service: Running) -> ClemdClient:
    return service.client()
