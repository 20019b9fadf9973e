"""Fixtures for the service tests: an in-process service on real loopback sockets, clients
that are always closed, service logs on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon import logs
from daemon.client import ClemdClient
from daemon.config import config_from_mapping
from daemon.templates import TemplateRegistry, default_registry
from tests.daemon.helpers import Running, config_dict, start_service


@pytest.fixture(autouse=True, scope="module")
def _logs_to_stderr() -> Iterator[None]:
    """Service logs as JSON on stderr (as `clemd serve` writes them), so stdout stays the
    CLI's; structlog's defaults come back afterwards."""
    logs.configure("info")
    yield
    structlog.reset_defaults()


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
