"""SerialEM's own state in the twin, beside the microscope's, and how a command is run.

SerialEM keeps image buffers A-T, a navigator table, script variables and the low-dose mode;
the simulated microscope knows none of these. The handlers (simulators/serialem_commands.py,
simulators/serialem_nav_commands.py) read and change this state and the microscope, and
``run`` turns any failure into ``ScriptError``, which the server (simulators/serialem_server.py)
answers with error flag 1 and the message, as SerialEM does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.base import ElectronMicroscope, LowDoseArea
from drivers.errors import ClemdError
from drivers.serialem.commands import ArgValue, CommandSpec
from drivers.serialem.wire import NUM_BUFFERS

ROLLING_BUFFERS = 3         # new images roll A -> B -> C (SerialEM's usual setup)

Values = tuple[float | str, ...]


class ScriptError(ClemdError):
    """A command failed as a SerialEM script command fails: error flag 1 and this message."""


@dataclass(frozen=True)
class Buffer:
    """One image buffer: pixels and what SerialEM knows about them."""

    data: NDArray[Any]
    binning: int = 1
    exposure_s: float = 0.0
    pixel_size_um: float = 0.0


@dataclass
class NavRow:
    """One row of SerialEM's navigator table; ``em_item_id`` is the microscope's item."""

    em_item_id: int
    stage_um: tuple[float, float, float]
    label: str
    note: str = ""
    acquire: bool = False
    kind: str = "point"
    regis: int = 1


class SerialEMState:
    """SerialEM's own state beside the microscope; one per twin, used under its lock."""

    def __init__(self, em: ElectronMicroscope) -> None:
        self.em = em
        self.buffers: list[Buffer | None] = [None] * NUM_BUFFERS
        self.nav: list[NavRow] = []
        self.current_item = 0
        self.variables: dict[str, str] = {}
        self.low_dose_on = False
        self.area: LowDoseArea | None = None
        self.last_realign_um = (0.0, 0.0)
        self.t0 = em.clock.now()

    # -- buffers ------------------------------------------------------------------------------

    def push_image(self, buffer: Buffer) -> None:
        """A new camera image: roll the first buffers and put it in A."""
        self.buffers[1:ROLLING_BUFFERS] = self.buffers[0:ROLLING_BUFFERS - 1]
        self.buffers[0] = buffer

    def buffer(self, letter: str) -> Buffer:
        index = ord(letter.upper()[:1] or "A") - ord("A")
        if not 0 <= index < NUM_BUFFERS:
            raise ScriptError(f"Buffer letter {letter!r} is out of range")
        found = self.buffers[index]
        if found is None:
            raise ScriptError(f"There is no image in buffer {chr(ord('A') + index)}")
        return found

    # -- navigator ----------------------------------------------------------------------------

    def item_index(self, value: ArgValue, *, default_current: bool = False) -> int:
        """A 1-based table index; negative counts from the end, 0 means the current item."""
        index = int(value) if not isinstance(value, str) else 0
        if index == 0 and default_current:
            index = self.current_item
        if index < 0:
            index = len(self.nav) + 1 + index
        if not 1 <= index <= len(self.nav):
            raise ScriptError(f"Navigator item index {value} is out of range (the table has "
                              f"{len(self.nav)} items)")
        return index


Handler = Callable[[SerialEMState, tuple[ArgValue, ...]], Values | None]
Handlers = dict[str, Handler]


def registrar(table: Handlers) -> Callable[..., Callable[[Handler], Handler]]:
    """A decorator factory that files handlers in ``table`` under SerialEM command names."""
    def command(*names: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            for name in names:
                table[name] = fn
            return fn
        return register
    return command


def run(state: SerialEMState, handlers: Handlers, spec: CommandSpec,
        args: tuple[ArgValue, ...]) -> Values:
    """Run one external command; every failure comes out as ScriptError."""
    line = f"{spec.name}({', '.join(str(a) for a in args)})"
    if len(args) < spec.min_args:
        raise ScriptError(f"{spec.name} must be followed by at least {spec.min_args} "
                          f"entries in line:\n\n{line}")
    handler = handlers.get(spec.name)
    if handler is None:
        raise ScriptError(f"{spec.name} is not implemented by the simulated SerialEM "
                          f"in line:\n\n{line}")
    try:
        return handler(state, args) or ()
    except ScriptError as err:
        raise ScriptError(f"{err} in line:\n\n{line}") from err
    except ClemdError as err:     # LimitViolation, ConfigError, HardwareFault, InvalidState
        raise ScriptError(f"{err} in line:\n\n{line}") from err


def optional(args: tuple[ArgValue, ...], i: int, default: float) -> float:
    return float(args[i]) if len(args) > i and not isinstance(args[i], str) else default


def flag(value: bool) -> float:
    return 1.0 if value else 0.0


def image_buffer(state: SerialEMState, index: int, data: NDArray[Any],
                 base: int | None) -> None:
    """Function 5: put ``data`` in buffer ``index``, metadata copied from ``base``."""
    if not 0 <= index < NUM_BUFFERS:
        raise ScriptError(f"buffer index {index} is out of range")
    meta = state.buffers[base] if base is not None and 0 <= base < NUM_BUFFERS else None
    state.buffers[index] = Buffer(np.ascontiguousarray(data),
                                  meta.binning if meta else 1,
                                  meta.exposure_s if meta else 0.0,
                                  meta.pixel_size_um if meta else 0.0)
