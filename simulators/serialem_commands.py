"""What the simulated SerialEM does for each script command, over a simulated microscope.

simulators/serialem_server.py owns sockets and the external-control state machine; this
module owns SerialEM's state that is not the microscope's (image buffers A-T, the navigator
table, script variables, low-dose mode) and one handler per command. Handlers take the
arguments as SerialEM reads them (drivers/serialem/commands.py ``interpret``) and return the
reported values; a failure raises ``ScriptError`` with the message SerialEM would log, which
the server sends back with error flag 1.

The microscope is used only through the ``ElectronMicroscope`` contract, so its limits are
SerialEM's limits here and its ``LimitViolation`` message is the script error. Deviations from
SerialEM, kept small on purpose: image-shift "IS units" are specimen micrometres (the twin has
no IS calibration); ``ReportDefocus`` reports the base defocus, not the low-dose area's
offset; acquisitions roll buffers A -> B -> C as SerialEM's default setup does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.base import AcquisitionSettings, ElectronMicroscope, Image, LowDoseArea
from drivers.errors import ClemdError
from drivers.serialem.commands import ArgValue, CommandSpec
from drivers.serialem.framing import mode_of
from drivers.serialem.wire import NUM_BUFFERS

log = structlog.get_logger(__name__)

ROLLING_BUFFERS = 3         # new images roll A -> B -> C (SerialEM's usual setup)
VACUUM_GAUGES = ("IGPco", "IGPa", "IGPf", "PPc1")
GAUGE_OK_PA, GAUGE_BAD_PA = 2.0e-6, 5.0e-3
_LD_NUMBER = {LowDoseArea.VIEW: 0, LowDoseArea.FOCUS: 1, LowDoseArea.TRIAL: 2,
              LowDoseArea.RECORD: 3, LowDoseArea.SEARCH: 4}
# Camera parameter sets by letter or number (Preview shares the Record area in low dose).
_PARAM_SETS = {"V": LowDoseArea.VIEW, "F": LowDoseArea.FOCUS, "T": LowDoseArea.TRIAL,
               "R": LowDoseArea.RECORD, "P": LowDoseArea.RECORD, "S": LowDoseArea.SEARCH,
               "0": LowDoseArea.VIEW, "1": LowDoseArea.FOCUS, "2": LowDoseArea.TRIAL,
               "3": LowDoseArea.RECORD, "4": LowDoseArea.RECORD, "5": LowDoseArea.SEARCH}
_SHOTS = {"View": LowDoseArea.VIEW, "Focus": LowDoseArea.FOCUS, "Trial": LowDoseArea.TRIAL,
          "Record": LowDoseArea.RECORD, "Preview": LowDoseArea.RECORD,
          "Search": LowDoseArea.SEARCH}
_ITEM_TYPES = {"point": 0, "polygon": 1, "map": 2}

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
HANDLERS: dict[str, Handler] = {}


def command(*names: str) -> Callable[[Handler], Handler]:
    """Register a handler under one or more SerialEM command names."""
    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn
    return register


def run(state: SerialEMState, spec: CommandSpec, args: tuple[ArgValue, ...]) -> Values:
    """Run one external command; every failure comes out as ScriptError."""
    line = f"{spec.name}({', '.join(str(a) for a in args)})"
    if len(args) < spec.min_args:
        raise ScriptError(f"{spec.name} must be followed by at least {spec.min_args} "
                          f"entries in line:\n\n{line}")
    handler = HANDLERS.get(spec.name)
    if handler is None:
        raise ScriptError(f"{spec.name} is not implemented by the simulated SerialEM "
                          f"in line:\n\n{line}")
    try:
        return handler(state, args) or ()
    except ScriptError as err:
        raise ScriptError(f"{err} in line:\n\n{line}") from err
    except ClemdError as err:     # LimitViolation, ConfigError, HardwareFault, InvalidState
        raise ScriptError(f"{err} in line:\n\n{line}") from err


def _opt(args: tuple[ArgValue, ...], i: int, default: float) -> float:
    return float(args[i]) if len(args) > i and not isinstance(args[i], str) else default


def _flag(value: bool) -> float:
    return 1.0 if value else 0.0


# --------------------------------------------------------------------------- session


@command("Echo", "NoMessageBoxOnError", "StartTry", "EndTry", "ResetClock")
def _no_op(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    return None


@command("Delay")
def _delay(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    unit = str(args[1]).lower() if len(args) > 1 else "s"
    scale = {"ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0}.get(unit)
    if scale is None:
        raise ScriptError(f"Delay unit {unit!r} must be ms, sec or min")
    state.em.clock.sleep(float(args[0]) * scale)


@command("SetVariable")
def _set_variable(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.variables[str(args[0]).lower()] = str(args[1])


@command("GetVariable")
def _get_variable(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    name = str(args[0])
    if name.lower() not in state.variables:
        raise ScriptError(f"The variable {name} is not defined")
    return (state.variables[name.lower()],)


@command("IsVersionAtLeast")
def _version(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (1.0,)


@command("ReportClock")
def _clock(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.em.clock.now() - state.t0,)


# --------------------------------------------------------------------------- stage


@command("MoveStageTo")
def _move_to(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    z = float(args[2]) if len(args) > 2 else None
    state.em.move_stage(float(args[0]), float(args[1]), z)


@command("MoveStage")
def _move_by(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    x, y, z = state.em.stage_position()
    dz = _opt(args, 2, 0.0)
    state.em.move_stage(x + float(args[0]), y + float(args[1]), z + dz if dz else None)


@command("ReportStageXYZ")
def _stage(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return tuple(float(v) for v in state.em.stage_position())


@command("TiltTo")
def _tilt_to(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.tilt_to(float(args[0]))


@command("TiltBy")
def _tilt_by(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.tilt_to(state.em.tilt() + float(args[0]))


@command("ReportTiltAngle")
def _tilt(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.em.tilt(),)


@command("ReportStageBusy")
def _stage_busy(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (0.0,)     # moves finish before their reply


# --------------------------------------------------------------------------- optics


@command("SetMagIndex")
def _set_mag(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = int(args[0])
    state.em.set_mag_index(index)
    if state.low_dose_on and state.area is not None:   # in low dose a mag change is the area's
        area = state.area
        state.em.low_dose[area] = replace(state.em.low_dose[area], mag_index=index)


@command("ReportMagIndex")
def _mag_index(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (float(state.em.mag_index()),)


@command("ReportMag")
def _mag(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.em.magnification(state.em.mag_index()).magnification,)


@command("SetDefocus")
def _set_defocus(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.set_defocus(float(args[0]))


@command("ChangeFocus")
def _change_focus(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.set_defocus(state.em.defocus() + float(args[0]))


@command("ReportDefocus")
def _defocus(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.em.defocus(),)


@command("ImageShiftByMicrons")
def _shift_by(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    x, y = state.em.image_shift()
    state.em.set_image_shift(x + float(args[0]), y + float(args[1]))


@command("SetImageShift")
def _set_shift(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.set_image_shift(float(args[0]), float(args[1]))


@command("ReportImageShift")
def _shift(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    x, y = state.em.image_shift()
    return (x, y, x, y)      # IS units, then specimen um: the same in the twin


# --------------------------------------------------------------------------- low dose, camera


def _param_set(value: ArgValue) -> LowDoseArea:
    key = str(value).strip().upper()[:1] if isinstance(value, str) else str(int(value))
    if key not in _PARAM_SETS:
        raise ScriptError(f"{value!r} is not a parameter set letter (V, F, T, R, P, S)")
    return _PARAM_SETS[key]


def _area_settings(state: SerialEMState, area: LowDoseArea) -> AcquisitionSettings:
    settings = state.em.low_dose.get(area)
    if settings is None:
        raise ScriptError(f"The {area.name.title()} parameter set is not set up")
    return settings


@command("SetLowDoseMode")
def _set_low_dose(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    was = state.low_dose_on
    state.low_dose_on = int(args[0]) != 0
    if not state.low_dose_on:
        state.area = None
    return (_flag(was),)


@command("ReportLowDose")
def _report_low_dose(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    area = -1.0 if state.area is None else float(_LD_NUMBER[state.area])
    return (_flag(state.low_dose_on), area)


@command("GoToLowDoseArea")
def _go_to_area(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if not state.low_dose_on:
        raise ScriptError("Low dose mode must be on to go to a low dose area")
    area = _param_set(args[0])
    state.em.set_mag_index(_area_settings(state, area).mag_index)
    state.area = area


@command("SetExposure")
def _set_exposure(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    area = _param_set(args[0])
    state.em.low_dose[area] = replace(_area_settings(state, area), exposure_s=float(args[1]))


@command("SetBinning")
def _set_binning(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    area = _param_set(args[0])
    binning = int(args[1])
    h, w = state.em.camera_shape()
    if binning < 1 or binning > min(h, w):
        raise ScriptError(f"Binning {binning} is not available for this camera")
    state.em.low_dose[area] = replace(_area_settings(state, area), binning=binning)


@command("ReportExposure")
def _exposure(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (_area_settings(state, _param_set(args[0])).exposure_s,)


@command("ReportBinning")
def _binning(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (float(_area_settings(state, _param_set(args[0])).binning),)


@command("CameraProperties")
def _camera(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    h, w = state.em.camera_shape()
    return (float(w), float(h))


def _shoot(state: SerialEMState, area: LowDoseArea) -> None:
    """Acquire into buffer A: the area's settings in low dose, else at the current mag."""
    settings = _area_settings(state, area)
    if state.low_dose_on:
        image = state.em.acquire(area)
        state.area = area
    else:
        here = replace(settings, mag_index=state.em.mag_index(), defocus_offset_um=0.0)
        state.em.low_dose[area] = here
        try:
            image = state.em.acquire(area)
        finally:
            state.em.low_dose[area] = settings
    state.push_image(_buffer_of(image))


def _buffer_of(image: Image) -> Buffer:
    return Buffer(image.data, image.binning, image.exposure_s or 0.0, image.pixel_size_um)


def _make_shot(area: LowDoseArea) -> Handler:
    def shoot(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
        _shoot(state, area)
    return shoot


for _shot_name, _shot_area in _SHOTS.items():
    command(_shot_name)(_make_shot(_shot_area))
del _shot_name, _shot_area


@command("ImageProperties")
def _image_properties(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    buf = state.buffer(str(args[0]) if args else "A")
    h, w = buf.data.shape[:2]
    return (float(w), float(h), float(buf.binning), buf.exposure_s, buf.pixel_size_um * 1e3,
            float(mode_of(buf.data)))


# --------------------------------------------------------------------------- navigator


def _report_item(state: SerialEMState, index: int) -> Values:
    row = state.nav[index - 1]
    state.variables["navlabel"] = row.label
    state.variables["navnote"] = row.note
    x, y, z = row.stage_um
    return (float(index), x, y, z, float(_ITEM_TYPES.get(row.kind, 0)), float(row.regis))


@command("AddStagePosAsNavPoint")
def _add_point(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    x, y, z = float(args[0]), float(args[1]), float(args[2])
    item = state.em.add_nav_point(x, y, z)
    state.nav.append(NavRow(em_item_id=item.item_id, stage_um=(x, y, z),
                            label=str(len(state.nav) + 1)))
    return (float(len(state.nav)),)


@command("ReportNumTableItems")
def _num_items(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (float(len(state.nav)),)


@command("ReportOtherItem")
def _other_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return _report_item(state, state.item_index(args[0]))


@command("ReportNavItem")
def _nav_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    if state.current_item == 0:
        raise ScriptError("There is no current Navigator item")
    return _report_item(state, state.current_item)


@command("ChangeItemLabel")
def _label(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.nav[state.item_index(args[0]) - 1].label = str(args[1])


@command("ChangeItemNote")
def _note(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.nav[state.item_index(args[0]) - 1].note = str(args[1]) if len(args) > 1 else ""


@command("SetItemAcquire")
def _set_acquire(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = state.item_index(args[0] if args else 0, default_current=True)
    state.nav[index - 1].acquire = _opt(args, 1, 1.0) != 0


@command("ReportItemAcquire")
def _item_acquire(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    index = state.item_index(args[0] if args else 0, default_current=True)
    return (_flag(state.nav[index - 1].acquire),)


@command("NavIndexWithLabel")
def _index_with_label(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    label = str(args[0])
    return (float(next((i + 1 for i, r in enumerate(state.nav) if r.label == label), 0)),)


@command("MoveToNavItem")
def _move_to_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = state.item_index(args[0] if args else 0, default_current=True)
    x, y, z = state.nav[index - 1].stage_um
    state.em.move_stage(x, y, z)
    state.current_item = index


def _realign(state: SerialEMState, index: int) -> None:
    state.current_item = index
    state.last_realign_um = state.em.realign_to_item(state.nav[index - 1].em_item_id)


@command("RealignToOtherItem")
def _realign_other(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    _realign(state, state.item_index(args[0]))


@command("RealignToNavItem")
def _realign_current(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if state.current_item == 0:
        raise ScriptError("There is no current Navigator item to realign to")
    _realign(state, state.current_item)


@command("GetRealignToItemError")
def _realign_error(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    x, y = state.last_realign_um
    return (x, y, x, y)      # first round, last round: the twin does one round


# --------------------------------------------------------------------------- status


@command("ReportVacuumGauge")
def _gauge(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    name = str(args[0])
    if name not in VACUUM_GAUGES:
        raise ScriptError(f"There is no vacuum gauge named {name} (known: "
                          f"{', '.join(VACUUM_GAUGES)})")
    ok = state.em.status().vacuum_ok
    return (0.0 if ok else 2.0, GAUGE_OK_PA if ok else GAUGE_BAD_PA)


@command("ReportColumnOrGunValve")
def _valve(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (_flag(state.em.status().column_valve_open),)


@command("SetColumnOrGunValve")
def _set_valve(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    setter = getattr(state.em, "set_column_valve", None)
    if setter is None:
        raise ScriptError("This microscope's column valve cannot be operated")
    setter(int(args[0]) != 0)


@command("ReportHighVoltage")
def _high_voltage(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.em.status().high_voltage_kv,)


@command("AreDewarsFilling")
def _dewars(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (_flag(state.em.status().dewar_filling),)


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
