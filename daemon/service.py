"""The composition root: journal, instruments, runner, sockets; start, serve, stop.

Start order matters for "never lose acknowledged work": the data folder is locked (one
service per journal), the journal opened, instruments built, sockets bound, and only then
are interrupted sessions resumed, so their events reach subscribers.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import IO

import structlog
import zmq

from daemon.api_context import Services
from daemon.config import ServiceConfig
from daemon.errors import JournalError
from daemon.events import EventBus, EventKind
from daemon.instruments import Instruments, build_instruments
from daemon.journal import VIRTUAL_CLOCK_KEY, Journal
from daemon.runner import SessionRunner
from daemon.security import ZapHandler, load_keys
from daemon.server import ApiServer, ZmqPublisher
from daemon.templates import TemplateRegistry, default_registry

log = structlog.get_logger(__name__)


def _version() -> str:
    try:
        return metadata.version("clemd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Service:
    """One running clemd. ``start()``, then ``serve()`` until shutdown, then ``close()``."""

    def __init__(self, cfg: ServiceConfig, registry: TemplateRegistry | None = None,
                 instruments: Instruments | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or default_registry()
        self._instruments = instruments
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._lockfile: IO[str] | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._zap: ZapHandler | None = None
        self.journal: Journal | None = None
        self.instruments: Instruments | None = None
        self.runner: SessionRunner | None = None
        self.server: ApiServer | None = None
        self.publisher: ZmqPublisher | None = None
        self.bus: EventBus | None = None
        self.close_failures: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Everything up to serving; on failure, what was built is closed again."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir(cfg.data_dir)
        keys = load_keys(cfg.security)
        self.journal = Journal(cfg.data_dir / "journal.sqlite")
        self.bus = EventBus(self.journal)
        start_s = float(self.journal.meta(VIRTUAL_CLOCK_KEY) or 0.0)
        self.instruments = self._instruments or build_instruments(cfg, start_s)
        self.runner = SessionRunner(cfg.runner, self.bus, self.instruments, self.registry,
                                    cfg.data_dir)
        self._ctx = zmq.Context()
        if keys is not None:
            self._zap = ZapHandler(self._ctx, keys)
        services = Services(cfg=cfg, journal=self.journal, bus=self.bus, runner=self.runner,
                            registry=self.registry, instruments=self.instruments,
                            started_at=time.monotonic(), version=_version(),
                            request_shutdown=self.stop_event.set,
                            stopping=self.stop_event.is_set)
        self.publisher = ZmqPublisher(self._ctx, cfg.api.events, keys)
        self.server = ApiServer(self._ctx, cfg.api, services, keys)
        self.bus.attach(self.publisher)
        self.bus.emit(EventKind.SERVICE, None, {"state": "started", "pid": os.getpid(),
                                                 "instruments": self.instruments.kinds})
        resumed = self.runner.recover()
        log.info("service.started", bind=cfg.api.bind, events=cfg.api.events,
                 curve=cfg.security.curve, resumed=resumed)
        self.ready.set()

    def serve(self) -> None:
        """Answer requests until ``stop_event`` is set (the shutdown method, a signal)."""
        assert self.server is not None
        self.server.serve(self.stop_event)

    def close(self) -> None:
        """Stop sessions at step boundaries, then close sockets, instruments and journal."""
        self.stop_event.set()
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.bus is not None and self.journal is not None:
            self.bus.emit(EventKind.SERVICE, None, {"state": "stopped"})
            self.bus.attach(None)
        for closable in (self.server, self.publisher, self._zap):
            if closable is not None:
                closable.close()
        self.server = self.publisher = self._zap = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.instruments is not None and self._instruments is None:
            self.close_failures = self.instruments.close()
        self.instruments = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
        log.info("service.stopped")

    def _lock_data_dir(self, data_dir: Path) -> None:
        fh = open(data_dir / "clemd.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held open
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.close()
            raise JournalError(f"another clemd is running on {data_dir} ({err})") from err
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lockfile = fh
