"""The link to one Micro-Manager core: how it is opened, who may call it, how it fails.

Two kinds of core sit behind the same snake_case API: an in-process pymmcore started with
pycromanager's ``start_headless(..., python_backend=True)``, or the running Micro-Manager
GUI's MMCoreJ reached over pycromanager's Java bridge. ``MMConnection`` owns that choice
and its lifetime, so the driver (drivers/micromanager.py) never asks which one it has.

``start_headless`` is process-global: pycromanager keeps the core and its acquisition
engine in module-level singletons, and its engine cannot be restarted once stopped. So a
connection refuses to start a second in-process core, and tests share one connection per
session (tests/drivers/conftest.py) while building a fresh driver per test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.errors import ClemdError, ConnectionLost, DeviceTimeout, HardwareFault, InvalidState
from drivers.micromanager_config import BridgeConnection, HeadlessConnection

__all__ = ["MMConnection", "core_errors", "strings", "unsigned_frame"]

log = structlog.get_logger(__name__)


@contextmanager
def core_errors(action: str, *, bridge: bool) -> Iterator[None]:
    """Translate core and bridge failures into clemd errors, naming ``action``.

    pymmcore reports CMMError as ``RuntimeError`` or ``ValueError``; pycromanager's Java
    bridge (pyjavaz) raises plain ``Exception`` for everything, so on a bridge connection
    this is the one place that must catch it. Nothing is swallowed: every error re-raises.
    """
    try:
        yield
    except ClemdError:
        raise
    except TimeoutError as err:
        raise DeviceTimeout(f"{action}: {err}") from err
    except (RuntimeError, ValueError) as err:
        raise HardwareFault(f"{action}: {err}") from err
    except Exception as err:
        if not bridge:
            raise
        text = str(err)
        if "timed out" in text or "closed" in text.lower():
            raise ConnectionLost(f"{action}: Micro-Manager bridge: {text}") from err
        raise HardwareFault(f"{action}: Micro-Manager: {text}") from err


class MMConnection:
    """One core, the lock that serialises clemd's calls to it, and its lifetime.

    ``lock`` is re-entrant so that a streamed acquisition can hold it for its whole run (the
    acquisition engine then owns the core) while the caller's own thread still reads
    positions. ``close()`` stops an in-process core only if this connection started it.
    """

    def __init__(self, core: Any, *, bridge_port: int | None, owns_core: bool) -> None:
        self.core = core
        self.bridge_port = bridge_port
        self.lock = threading.RLock()
        self._owns_core = owns_core
        self._closed = False

    @property
    def is_bridge(self) -> bool:
        return self.bridge_port is not None

    @classmethod
    def open(cls, settings: HeadlessConnection | BridgeConnection) -> MMConnection:
        """Start an in-process core or attach to a running Micro-Manager.

        Raises ``InvalidState`` if an in-process core is already running in this process
        (share its connection instead) or pycromanager's engine was stopped earlier in this
        process (it cannot restart), ``HardwareFault`` if the configuration fails to load,
        ``ConnectionLost`` if no Micro-Manager answers on the bridge port.
        """
        if isinstance(settings, HeadlessConnection):
            return cls._start_headless(settings)
        return cls._attach_bridge(settings)

    @classmethod
    def _start_headless(cls, settings: HeadlessConnection) -> MMConnection:
        from mmpycorex import is_pymmcore_active
        from pycromanager import Core, start_headless
        from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

        if is_pymmcore_active():
            raise InvalidState("an in-process Micro-Manager core is already running in this "
                               "process; share its MMConnection instead of starting another")
        if Engine.get_instance() is not None:
            raise InvalidState("pycromanager's in-process acquisition engine was stopped earlier "
                               "in this process and cannot be restarted; start a new process")
        log.info("mm.headless.start", mm_dir=str(settings.mm_dir),
                 config=str(settings.config_path))
        with core_errors(f"loading {settings.config_path}", bridge=False):
            start_headless(str(settings.mm_dir), str(settings.config_path), python_backend=True,
                           buffer_size_mb=settings.buffer_size_mb)
        return cls(Core(), bridge_port=None, owns_core=True)

    @classmethod
    def _attach_bridge(cls, settings: BridgeConnection) -> MMConnection:
        from mmpycorex import is_pymmcore_active
        from pycromanager import Core

        if is_pymmcore_active():
            # pycromanager picks the acquisition backend per process, not per connection.
            raise InvalidState("an in-process Micro-Manager core is running in this process; "
                               "pycromanager cannot drive a bridge acquisition beside it")
        log.info("mm.bridge.attach", port=settings.port)
        with core_errors(f"connecting to Micro-Manager on port {settings.port}", bridge=True):
            try:
                core = Core(port=settings.port, timeout=int(settings.timeout_s * 1000))
                core.get_version_info()
            except Exception as err:
                raise ConnectionLost(f"no Micro-Manager answers on port {settings.port}: "
                                     f"{err}") from err
        return cls(core, bridge_port=settings.port, owns_core=False)

    def errors(self, action: str) -> Any:
        """``core_errors`` for this connection's kind of core."""
        return core_errors(action, bridge=self.is_bridge)

    def close(self) -> None:
        """Stop the in-process core if this connection started it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_core:
            from pycromanager import stop_headless

            log.info("mm.headless.stop")
            with self.lock, self.errors("stopping the in-process core"):
                stop_headless()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unsigned_frame(data: Any, shape: tuple[int, int]) -> NDArray[Any]:
    """A 2D array of Micro-Manager's unsigned pixels, from either kind of core.

    pymmcore hands back a 2D unsigned array; the Java bridge a flat array of Java's signed
    integers, whose bits are the same unsigned pixels.
    """
    a = np.asarray(data)
    if a.dtype.kind == "i":
        a = a.view(a.dtype.str.replace("i", "u"))
    return a.reshape(shape)


def strings(values: Any) -> list[str]:
    """A Python list from a pymmcore tuple or a Java StrVector over the bridge."""
    if hasattr(values, "size") and callable(values.size):
        return [str(values.get(i)) for i in range(values.size())]
    return [str(v) for v in values]
