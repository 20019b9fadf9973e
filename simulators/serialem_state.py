"""SerialEM's own state in the twin, beside the microscope's, and how a command is run.

SerialEM keeps image buffers A-T, a navigator table, script variables and the low-dose mode;
the simulated microscope knows none of these. The handlers (simulators/serialem_commands.py,
simulators/serialem_nav_commands.py) read and change this state and the microscope, and
``run`` turns any failure into ``ScriptError``, which the server (simulators/serialem_server.py)
answers with error flag 1 and the message, as SerialEM does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.base import ElectronMicroscope, Image, LowDoseArea
from drivers.errors import ClemdError
from drivers.serialem.commands import ArgValue, CommandSpec
from drivers.serialem.wire import NUM_BUFFERS

ROLLING_BUFFERS = 3         # new images roll A -> B -> C (SerialEM's usual setup)

Values = tuple[float | str, ...]


class ScriptError(ClemdError):
    """A command failed as a SerialEM script command fails: error flag 1 and this message,
    followed by the command line (SerialEM's ABORT_LINE)."""


class ScriptErrorNoLine(ScriptError):
    """A failure SerialEM reports without the command line (its ABORT_NOLINE)."""


@dataclass(frozen=True)
class Buffer:
    """One image buffer: pixels and what SerialEM knows about them. ``conset`` is the camera
    parameter set that acquired it (0-6), -1 for an image put in from outside."""

    data: NDArray[Any]
    binning: int = 1
    exposure_s: float = 0.0
    pixel_size_um: float = 0.0
    conset: float = -1.0
    # The image's autodoc values (ReportMetadataValues), by key: "StagePosition" -> (x, y).
    meta: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass
class MontageFile:
    """The open montage file: SerialEM's MontParam for it and the pieces written.

    ``frame``/``overlap`` are (x, y) binned pixels; ``pieces`` maps 0-based (ix, iy) of
    section 0 to the piece as SerialEM would read it back; ``images`` keeps the simulator's
    frames of the same pieces (ground truth, for tests)."""

    path: str
    nx: int
    ny: int
    frame: tuple[int, int]
    overlap: tuple[int, int]
    binning: int
    move_stage: bool = False
    skip_correlations: bool = False
    pieces: dict[tuple[int, int], Buffer] = field(default_factory=dict)
    images: dict[tuple[int, int], Image] = field(default_factory=dict)


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
        # Script variables by lower-case name; a float is a numeric variable (GetVariable
        # answers a number), a str a string one.
        self.variables: dict[str, str | float] = {}
        self.low_dose_on = False
        self.area: LowDoseArea | None = None
        # SerialEM's image-shift limit (properties); past it, shifts report 1 and are not done
        self.image_shift_limit_um = 20.0
        # GetRealignToItemError before any realignment: CNavHelper starts its stage error
        # at -999 and its local error at 0.
        self.realign_error_um = (-999.0, -999.0, 0.0, 0.0)
        # CFocusManager: target defocus and current (last measured) defocus start at 0;
        # ReportAutoFocus's error code (-1 failed, > 0 aborted) before any autofocus is not
        # in the source we read, so the twin says "failed" until one has run.
        self.target_defocus_um = 0.0
        self.autofocus_defocus_um = 0.0
        self.autofocus_error = -1
        self.t0 = em.clock.now()
        # Montaging (simulators/serialem_montage_commands.py): the open montage file, the
        # names SerialEM has written (it refuses to open one again), and which parameter
        # set a low-dose montage uses (ParamSetToUseForMontage).
        self.montage: MontageFile | None = None
        self.montages: list[MontageFile] = []       # every file opened, for tests
        self.files_written: set[str] = set()
        self.montage_use_view = False
        self.montage_use_search = False
        self.montage_use_map_params = False

    # -- buffers ------------------------------------------------------------------------------

    def push_image(self, buffer: Buffer) -> None:
        """A new camera image: roll the first buffers and put it in A."""
        self.buffers[1:ROLLING_BUFFERS] = self.buffers[0:ROLLING_BUFFERS - 1]
        self.buffers[0] = buffer

    def buffer(self, letter: str) -> Buffer:
        """The buffer a letter names, with CMacroProcessor::ConvertBufferLetter's messages."""
        text = letter.upper() or "A"
        index = ord(text[0]) - ord("A")
        if len(text) > 1 or not 0 <= index < NUM_BUFFERS:
            raise ScriptError(f"Improper buffer letter {text} in statement:")
        found = self.buffers[index]
        if found is None:
            raise ScriptError(f"There is no image in buffer {text} in statement:")
        return found

    # -- navigator ----------------------------------------------------------------------------

    def item_index(self, value: ArgValue, *, zero_is_current: bool = False) -> int:
        """A 1-based table index; negative counts from the end (-1 the last item); 0 is the
        current item when ``zero_is_current`` (CMacroProcessor::CurrentOrIndexedNavItem),
        else out of range (CMacCmd::ReportNavItem for ReportOtherItem)."""
        index = int(value) if not isinstance(value, str) else 0
        if index == 0 and zero_is_current:
            if self.current_item == 0:
                raise ScriptError("There is no current Navigator item for line:")
            index = self.current_item
        if index < 0:
            index = len(self.nav) + 1 + index
        if not 1 <= index <= len(self.nav):
            raise ScriptError("Index is out of range in statement:")
        return index

    def positive_index(self, value: ArgValue, message: str) -> int:
        """A 1-based table index with no negative or zero forms, as ChangeItemLabel/Note and
        RealignToOtherItem take it; ``message`` is SerialEM's complaint when out of range."""
        index = int(value) if not isinstance(value, str) else 0
        if not 1 <= index <= len(self.nav):
            raise ScriptError(message.format(index=index))
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
        # SerialEM itself never counts arguments (the serialem module refuses a short call
        # before sending); it would run the command with the missing entries empty.
        raise ScriptError(f"{spec.name} needs at least {spec.min_args} arguments (the "
                          f"simulated SerialEM refuses what the serialem module would) in "
                          f"line:\n\n{line}")
    handler = handlers.get(spec.name)
    if handler is None:
        raise ScriptError(f"{spec.name} is not implemented by the simulated SerialEM "
                          f"in line:\n\n{line}")
    try:
        return handler(state, args) or ()
    except ScriptErrorNoLine:
        raise
    except ClemdError as err:     # ScriptError, LimitViolation, HardwareFault, InvalidState
        raise ScriptError(_with_line(str(err), line)) from err


def _with_line(message: str, line: str) -> str:
    """SerialEM's ABORT_LINE: the message, a blank line, the command line. Handler messages
    that end in ':' carry SerialEM's own lead-in ("... in statement:")."""
    lead = message if message.endswith(":") else f"{message} in line:"
    return f"{lead}\n\n{line}"


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
                                  meta.pixel_size_um if meta else 0.0,
                                  meta.conset if meta else -1.0)


def image_meta(image: Image, stage_um: tuple[float, float, float],
               piece_xy: tuple[int, int] | None = None) -> dict[str, tuple[float, ...]]:
    """The autodoc values SerialEM keeps with an image (KStoreADOC::SetValuesFromExtra, keys
    from MdocDefines.h / KStoreADOC.h) that the twin can fill: ``stage_um`` is the stage as
    SerialEM read it back at the shot, ``piece_xy`` a montage piece's pixel position."""
    meta: dict[str, tuple[float, ...]] = {
        "TiltAngle": (image.tilt_deg,),
        "StagePosition": (stage_um[0], stage_um[1]),
        "StageZ": (stage_um[2],),
        "Binning": (float(image.binning),),
        "PixelSpacing": (image.pixel_size_um * 1e4,),
    }
    if image.magnification is not None:
        meta["Magnification"] = (image.magnification,)
    if image.exposure_s is not None:
        meta["ExposureTime"] = (image.exposure_s,)
    if piece_xy is not None:
        meta["PieceCoordinates"] = (float(piece_xy[0]), float(piece_xy[1]), 0.0)
    return meta
