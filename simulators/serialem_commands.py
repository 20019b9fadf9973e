"""What the simulated SerialEM does for session, stage, optics, low-dose and camera commands.

simulators/serialem_server.py owns sockets and the external-control state machine,
simulators/serialem_state.py SerialEM's own state; this module has one handler per command
(navigator and status commands: simulators/serialem_nav_commands.py). Handlers take the
arguments as SerialEM reads them (drivers/serialem/commands.py ``interpret``) and return the
reported values; a failure raises ``ScriptError`` with the message SerialEM would log.

The microscope is used only through the ``ElectronMicroscope`` contract, so its limits are
SerialEM's limits here and its ``LimitViolation`` message is the script error. Reply shapes
and messages follow SerialEM's MacroCommands.cpp (CMacCmd::<Command>; see
docs/serialem-commands-verified.md). Deviations from SerialEM, kept small on purpose:
image-shift "IS units" are specimen micrometres (the twin has no IS calibration), so
``ReportImageShift``'s pixel and stage values are the twin's own simple conversion;
``ReportDefocus`` reports the base defocus, not the low-dose area's offset; acquisitions roll
buffers A -> B -> C as SerialEM's default setup does.
"""

from __future__ import annotations

from dataclasses import replace

from drivers.base import AcquisitionSettings, Image, LowDoseArea
from drivers.serialem.commands import ArgValue
from simulators.serialem_state import (
    Buffer,
    Handler,
    Handlers,
    ScriptError,
    SerialEMState,
    Values,
    flag,
    image_meta,
    optional,
    registrar,
)

_LD_NUMBER = {LowDoseArea.VIEW: 0, LowDoseArea.FOCUS: 1, LowDoseArea.TRIAL: 2,
              LowDoseArea.RECORD: 3, LowDoseArea.SEARCH: 4}
# Camera parameter sets by letter (any case) or number, as CheckAndConvertCameraSet reads
# them: V F T R P S M = 0..6. Preview shares the Record area in low dose; the twin has no
# Mont-map set (6).
_PARAM_SETS = {"V": LowDoseArea.VIEW, "F": LowDoseArea.FOCUS, "T": LowDoseArea.TRIAL,
               "R": LowDoseArea.RECORD, "P": LowDoseArea.RECORD, "S": LowDoseArea.SEARCH,
               "0": LowDoseArea.VIEW, "1": LowDoseArea.FOCUS, "2": LowDoseArea.TRIAL,
               "3": LowDoseArea.RECORD, "4": LowDoseArea.RECORD, "5": LowDoseArea.SEARCH}
# Parameter-set number SerialEM records with an image (ImageProperties' sixth value).
_CONSET = {LowDoseArea.VIEW: 0, LowDoseArea.FOCUS: 1, LowDoseArea.TRIAL: 2,
           LowDoseArea.RECORD: 3, LowDoseArea.SEARCH: 5}
# GoToLowDoseArea takes only these upper-case letters (CheckAndConvertLDAreaLetter).
_LD_LETTERS = "VFTRS"
CHIP_PIXEL_UM = 5.0             # CameraProperties' pixel on chip: a fixed value in the twin
_SHOTS = {"View": LowDoseArea.VIEW, "Focus": LowDoseArea.FOCUS, "Trial": LowDoseArea.TRIAL,
          "Record": LowDoseArea.RECORD, "Preview": LowDoseArea.RECORD,
          "Search": LowDoseArea.SEARCH}

COMMANDS: Handlers = {}
command = registrar(COMMANDS)


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
    """From an external client the value is stored as text (a string variable)."""
    state.variables[str(args[0]).lower()] = str(args[1])


@command("GetVariable")
def _get_variable(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """A numeric variable comes back as a number, any other as its text (CMacCmd::GetVariable)."""
    name = str(args[0])
    if name.lower() not in state.variables:
        raise ScriptError(f"The variable {name} is not defined in line:")
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
    dz = optional(args, 2, 0.0)
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
    """Index, then 1 if it is a low (LM) magnification: the twin has no LM range."""
    return (float(state.em.mag_index()), 0.0)


@command("ReportMag")
def _mag(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Magnification, low-mag flag, mode (0 TEM, 1 EFTEM, 2 STEM)."""
    return (state.em.magnification(state.em.mag_index()).magnification, 0.0, 0.0)


@command("SetDefocus")
def _set_defocus(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.set_defocus(float(args[0]))


@command("ChangeFocus")
def _change_focus(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.em.set_defocus(state.em.defocus() + float(args[0]))


@command("ReportDefocus")
def _defocus(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.em.defocus(),)


def _shift_refused(state: SerialEMState, x: float, y: float) -> bool:
    """SerialEM's ImageShiftIsOK: a shift past the limit is not done and reports 1."""
    return max(abs(x), abs(y)) > state.image_shift_limit_um


@command("ImageShiftByMicrons")
def _shift_by(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """A relative shift in specimen um; reports 1 (and does nothing) past the limit, else 0
    (CMacCmd::ImageShiftByMicrons -> TestIncrementalImageShift)."""
    x, y = state.em.image_shift()
    x, y = x + float(args[0]), y + float(args[1])
    if _shift_refused(state, x, y):
        return (1.0,)
    state.em.set_image_shift(x, y)
    return (0.0,)


@command("SetImageShift")
def _set_shift(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """An absolute shift in IS units; reports 1 (and does nothing) past the limit, else 0."""
    x, y = float(args[0]), float(args[1])
    if _shift_refused(state, x, y):
        return (1.0,)
    state.em.set_image_shift(x, y)
    return (0.0,)


@command("ReportImageShift")
def _shift(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """IS units x y, the image shift in unbinned camera pixels (negated, as SerialEM reports
    it), and the stage move that would replace it: six values, none in specimen um."""
    x, y = state.em.image_shift()
    px = state.em.magnification(state.em.mag_index()).pixel_size_um
    return (x, y, -x / px, -y / px, x, y)


@command("ReportSpecimenShift")
def _specimen_shift(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """The image shift in specimen um (the IS-to-specimen calibration applied)."""
    return state.em.image_shift()


# --------------------------------------------------------------------------- low dose, camera


def _param_set(value: ArgValue) -> LowDoseArea:
    text = str(value).strip().upper() if isinstance(value, str) else str(int(value))
    if len(text) != 1 or text not in _PARAM_SETS:
        raise ScriptError("Inappropriate parameter set letter/number in:")
    return _PARAM_SETS[text]


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
    return (flag(was),)


@command("ReportLowDose")
def _report_low_dose(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    area = -1.0 if state.area is None else float(_LD_NUMBER[state.area])
    return (flag(state.low_dose_on), area)


@command("GoToLowDoseArea")
def _go_to_area(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if not state.low_dose_on:
        raise ScriptError("You must be in low dose mode to use this command:")
    letter = str(args[0])[:1]
    if not letter or letter not in _LD_LETTERS:
        raise ScriptError("Command must be followed by one of V, F, T, R, or S in line:")
    area = LowDoseArea(letter)
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
        raise ScriptError("Not a valid binning for camera in:")
    state.em.low_dose[area] = replace(_area_settings(state, area), binning=binning)


@command("ReportExposure")
def _exposure(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Exposure and drift-settling time (the twin never settles)."""
    return (_area_settings(state, _param_set(args[0])).exposure_s, 0.0)


@command("ReportBinning")
def _binning(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (float(_area_settings(state, _param_set(args[0])).binning),)


@command("CameraProperties")
def _camera(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Width, height (unbinned), rotation/flip, pixel on chip (um), pixel at the current mag
    (nm, unbinned), active camera number: CMacCmd::CameraProperties' six values."""
    h, w = state.em.camera_shape()
    px_nm = state.em.magnification(state.em.mag_index()).pixel_size_um * 1e3
    return (float(w), float(h), 0.0, CHIP_PIXEL_UM, px_nm, 1.0)


def _shoot(state: SerialEMState, area: LowDoseArea) -> None:
    """Acquire into buffer A: the area's settings in low dose, else at the current mag."""
    settings = _area_settings(state, area)
    if state.low_dose_on:
        image = state.em.acquire(area)
        state.area = area
    else:
        here = replace(settings, mag_index=state.em.mag_index(), defocus_offset_um=0.0)
        image = state.em.acquire(area, here)
    state.push_image(_buffer_of(image))


def _buffer_of(image: Image) -> Buffer:
    area = LowDoseArea(image.low_dose_area) if image.low_dose_area else LowDoseArea.RECORD
    return Buffer(image.data, image.binning, image.exposure_s or 0.0, image.pixel_size_um,
                  float(_CONSET[area]), image_meta(image, image.stage_um))


def _make_shot(area: LowDoseArea) -> Handler:
    def shoot(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
        _shoot(state, area)
    return shoot


for _shot_name, _shot_area in _SHOTS.items():
    command(_shot_name)(_make_shot(_shot_area))
del _shot_name, _shot_area


@command("ImageProperties")
def _image_properties(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Width, height, binning, exposure (s), pixel size (nm, 0 if unknown), and the parameter
    set used (0-6, -1 for an image not acquired): CMacCmd::ImageProperties."""
    buf = state.buffer(str(args[0]) if args else "A")
    h, w = buf.data.shape[:2]
    return (float(w), float(h), float(buf.binning), buf.exposure_s, buf.pixel_size_um * 1e3,
            buf.conset)
