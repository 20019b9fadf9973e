"""Shared helpers (``free_ports`` is re-exported from daemon.ports): configs on free ports, an in-process service, journal snapshots, and
templates that misbehave on purpose."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from daemon.client import ClemdClient, CurveClientKeys
from daemon.config import ServiceConfig
from daemon.ports import free_ports
from daemon.service import Service
from daemon.templates import SessionEnv, TemplateRegistry, default_registry
from drivers.base import ConnectionLost, LimitViolation
from protocols.plan import Plan, Step, StepContext, StepResult

SMALL_LM = {"camera": {"shape": [64, 64]}}
SMALL_EM = {"camera_shape": [128, 128]}


def free_port() -> int:
    return free_ports(1)[0]


def config_dict(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A simulated-instruments config on two free loopback ports."""
    bind_port, events_port = free_ports(2)
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "api": {"bind": f"tcp://127.0.0.1:{bind_port}",
                "events": f"tcp://127.0.0.1:{events_port}"},
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


TABLES = ("sessions", "steps", "artifacts", "targets", "confirmations", "events")


def journal_snapshot(data_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through a separate connection."""
    conn = sqlite3.connect(f"file:{data_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in TABLES}
    finally:
        conn.close()


class _P(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    steps: int = Field(default=3, ge=1, le=100)


class Gate:
    """Shared switches the misbehaving templates read (one per registry)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.flaky_failures = 0
        self.limit_failures = 0


class HangPlan(Plan):
    """Step 1 blocks (a hung driver call) until the gate is released."""

    name = "hang"

    def __init__(self, gate: Gate, env: SessionEnv) -> None:
        self.gate = gate

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        def hang(c: StepContext) -> StepResult:
            self.gate.entered.set()
            self.gate.release.wait(30)
            return {"hung": True}
        yield Step("hang/1", hang, title="a call that does not return", instrument="lm")
        yield Step("hang/2", lambda c: {"ok": True}, instrument="lm")


class SpinPlan(Plan):
    """Step 1 moves the LM stage back and forth until aborted through the driver."""

    name = "spin"

    def __init__(self, gate: Gate, env: SessionEnv) -> None:
        self.gate = gate

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        def spin(c: StepContext) -> StepResult:
            lm = c.require_lm()
            self.gate.entered.set()
            i = 0
            while not self.gate.release.is_set():
                lm.move_xy(float(i % 2), 0.0)
                i += 1
            return {"moves": i}
        yield Step("spin/1", spin, title="long stage work", instrument="lm")
        yield Step("spin/2", lambda c: {"ok": True}, instrument="lm")


class FlakyPlan(Plan):
    """Fails with ConnectionLost ``flaky_failures`` times, then LimitViolation
    ``limit_failures`` times, then succeeds."""

    name = "flaky"

    def __init__(self, gate: Gate, env: SessionEnv) -> None:
        self.gate = gate
        self.calls = 0

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        def act(c: StepContext) -> StepResult:
            self.calls += 1
            if self.gate.flaky_failures > 0:
                self.gate.flaky_failures -= 1
                raise ConnectionLost("link dropped (test)")
            if self.gate.limit_failures > 0:
                self.gate.limit_failures -= 1
                raise LimitViolation("stage x 9999 um outside [-5000, 5000] (test)")
            return {"calls": self.calls}
        yield Step("flaky/1", act, title="flaky", instrument="lm")


def misbehaving_registry(gate: Gate) -> TemplateRegistry:
    """The default templates plus hang, spin and flaky bound to ``gate``."""
    reg = default_registry()
    reg.register("hang", _P, lambda p, env: HangPlan(gate, env), frozenset({"lm"}))
    reg.register("spin", _P, lambda p, env: SpinPlan(gate, env), frozenset({"lm"}))
    reg.register("flaky", _P, lambda p, env: FlakyPlan(gate, env), frozenset({"lm"}))
    return reg
