"""What the simulated SerialEM does for its montage and montage-file commands.

Read in SerialEM's source (mastcu/SerialEM; docs/serialem-commands-verified.md section 11):

- ``ParamSetToUseForMontage n [..]`` (CMacCmd::ParamSetToUseForMontage): |n| 1 Mont-map
  parameters, 2 View, 3 Search in low dose; n > 0 turns it on, n < 0 off (View and Search
  exclude each other). In low dose, |n| > 1 while a montage file is open is refused.
- ``OpenNewMontage ix iy file`` (CMacCmd::OpenNewFile): 0 keeps the previous number of
  pieces; a name that exists is refused unless overwriting is allowed; the frame comes from
  the camera parameter set (CSerialEMDoc::GetMontageParamsAndFile with dialogs bypassed).
- ``SetMontageParams stage [ovx ovy fx fy skipCorr binning]`` (CMacCmd::SetMontageParams):
  only while montaging; frame and overlap fixed once the file has data; frame >= twice the
  current overlap, overlap <= half the frame and >= 16 (the Y check tests the X entry, as in
  SerialEM); binning checked as a camera binning.
- ``Montage`` (CMacCmd::Montage -> EMmontageController::StartMontage): needs an open
  montage; a stage montage is centred on the stage position at its start and returns there.
- ``ReportNumMontagePieces``: nx * ny while montaging (nothing skipped here), else 1.
- ``ReadMontagePiece ix iy z [buf]`` (CMacCmd::ReadFile): 1-based piece, section z, into
  ``buf`` (default: the read buffer); "Could not find piece in file for line:".
- ``ReportMetadataValues buf key`` (CMacCmd::ImageMetadataToVar): the image's autodoc value
  for ``key`` split into up to six reported values.
- ``ReportFileZsize``, ``CloseFile [s]``, ``MakeDirectory dir`` (CMacCmd::ReportFileZsize,
  CloseFile, SetDirectory).

Deviations, kept small on purpose: the twin keeps montage files in memory (no disk), one
montage (section 0) per file, stage montages of whole camera frames only (no image-shift
montages, no Mont-map parameters, no correlations: SerialEM's overview and aligned piece
coordinates do not exist here). Its stage-to-camera "calibration" is the magnification
table (pixel size and rotation), and piece y runs up the image, as SerialEM's montage files
do (they are written Y-flipped from the buffers; piece y = 0 is the bottom row of pieces).
A piece's autodoc holds StagePosition (the stage read back after the move), StageZ,
PieceCoordinates, TiltAngle, Magnification, ExposureTime, Binning and PixelSpacing (A).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from drivers.base import AcquisitionSettings, LowDoseArea, affine_from
from drivers.serialem.commands import ArgValue
from drivers.serialem.wire import NUM_BUFFERS
from simulators.serialem_state import (
    Buffer,
    Handlers,
    MontageFile,
    ScriptError,
    ScriptErrorNoLine,
    SerialEMState,
    Values,
    image_meta,
    registrar,
)

MONTAGE_COMMANDS: Handlers = {}
command = registrar(MONTAGE_COMMANDS)

MIN_OVERLAP_PX = 16
#: The buffer ReadMontagePiece reads into when none is named (SerialEM's "read buffer" is a
#: setting; the twin fixes it at P).
READ_BUFFER = "P"


def _int(args: tuple[ArgValue, ...], i: int) -> int:
    """SerialEM's mItemInt: the argument's double truncated, 0 when omitted."""
    return int(args[i]) if len(args) > i and not isinstance(args[i], str) else 0


def _montaging(state: SerialEMState) -> MontageFile:
    if state.montage is None:
        raise ScriptError("Montaging must be on already to use this command:")
    return state.montage


def _montage_area(state: SerialEMState) -> LowDoseArea:
    """The low-dose area a montage shoots in (MontageConSetNum): View or Search when chosen
    with ParamSetToUseForMontage, else Record."""
    if state.montage_use_view:
        return LowDoseArea.VIEW
    if state.montage_use_search:
        return LowDoseArea.SEARCH
    return LowDoseArea.RECORD


def _settings(state: SerialEMState, area: LowDoseArea) -> AcquisitionSettings:
    settings = state.em.low_dose.get(area)
    if settings is None:
        raise ScriptError(f"The {area.name.title()} parameter set is not set up")
    if not state.low_dose_on:      # outside low dose: the parameter set at the current mag
        settings = replace(settings, mag_index=state.em.mag_index(), defocus_offset_um=0.0)
    return settings


def _buffer_index(letter: str) -> int:
    text = (letter or READ_BUFFER).upper()
    index = ord(text[0]) - ord("A")
    if len(text) > 1 or not 0 <= index < NUM_BUFFERS:
        raise ScriptError(f"Improper buffer letter {text} in statement:")
    return index


@command("ParamSetToUseForMontage")
def _param_set(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    value = _int(args, 0)
    index = abs(value)
    if index > 1 and state.low_dose_on and state.montage is not None:
        raise ScriptError("The parameter set to use in Low Dose mode should be selected before "
                          "a montage is opened")
    if index == 1:
        state.montage_use_map_params = value > 0
    elif index == 2:
        state.montage_use_view = value > 0
        state.montage_use_search = state.montage_use_search and value <= 0
    elif index == 3:
        state.montage_use_search = value > 0
        state.montage_use_view = state.montage_use_view and value <= 0


@command("MakeDirectory")
def _make_directory(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    """SerialEM creates the folder or, when it exists, only logs; the twin has no disk."""


@command("OpenNewMontage")
def _open_new_montage(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    previous = state.montages[-1] if state.montages else None   # MontParam persists
    nx = _int(args, 0) or (previous.nx if previous else 0)
    ny = _int(args, 1) or (previous.ny if previous else 0)
    if nx < 1 or ny < 1:
        raise ScriptError("Number of montages pieces is missing or not positive in "
                          "statement:")
    path = str(args[2])
    if path in state.files_written:
        raise ScriptErrorNoLine(f"Script suspended opening new file because {path} already "
                                f"exists")
    binning = _settings(state, _montage_area(state)).binning
    h, w = state.em.camera_shape()
    frame = (w // binning, h // binning)
    # The overlap before SetMontageParams is the twin's (a tenth of the frame, as
    # SetupWaffleMontage sets it); SerialEM's InitMontParamsForDialog was not read.
    montage = MontageFile(
        path, nx, ny, frame, (frame[0] // 10, frame[1] // 10), binning,
        move_stage=previous.move_stage if previous else False,
        skip_correlations=previous.skip_correlations if previous else False)
    state.montage = montage
    state.files_written.add(path)
    state.montages.append(montage)


@command("SetMontageParams")
def _set_montage_params(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    m = _montaging(state)
    if m.pieces and any(_int(args, i) > 0 for i in range(1, 5)):
        raise ScriptError("After writing to the file, you cannot change frame size or "
                          "overlaps  in line:")
    if _int(args, 0) >= 0:
        m.move_stage = _int(args, 0) > 0
    fx, fy = _int(args, 3), _int(args, 4)
    if fx > 0:
        if fx < m.overlap[0] * 2:
            raise ScriptError("The X frame size is less than twice the overlap in statement:")
        m.frame = (fx, m.frame[1])
    if fy > 0:
        if fy < m.overlap[1] * 2:
            raise ScriptError("The Y frame size is less than twice the overlap in statement:")
        m.frame = (m.frame[0], fy)
    ovx, ovy = _int(args, 1), _int(args, 2)
    if ovx > 0:
        if ovx > m.frame[0] // 2:
            raise ScriptError("X overlap is more than half the frame size in statement:")
        if ovx < MIN_OVERLAP_PX:
            raise ScriptError("The X overlap must be at least 16 in line:")
        m.overlap = (ovx, m.overlap[1])
    if ovy > 0:
        if ovy > m.frame[1] // 2:
            raise ScriptError("Y overlap is more than half the frame size in statement:")
        if ovx < MIN_OVERLAP_PX:            # SerialEM tests the X entry here
            raise ScriptError("The Y overlap must be at least 16 in line:")
        m.overlap = (m.overlap[0], ovy)
    if len(args) > 5 and _int(args, 5) >= 0:
        m.skip_correlations = _int(args, 5) != 0
    if len(args) > 6 and not isinstance(args[6], str) and float(args[6]) >= 0.5:
        binning = int(args[6])
        h, w = state.em.camera_shape()
        if binning != float(args[6]) or not 1 <= binning <= min(h, w):
            raise ScriptError("Not a valid binning for camera in:")
        m.binning = binning


@command("Montage")
def _montage(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    m = state.montage
    if m is None:
        raise ScriptErrorNoLine("The script contains a montage statement and \nmontaging is "
                                "not activated")
    if not m.move_stage or state.montage_use_map_params or m.pieces:
        raise ScriptError("the simulated SerialEM does only one stage montage per file, "
                          "without Mont-map parameters")
    area = _montage_area(state)
    settings = replace(_settings(state, area), binning=m.binning)
    h, w = state.em.camera_shape()
    if (w // m.binning, h // m.binning) != m.frame:
        raise ScriptError(f"the simulated SerialEM montages whole camera frames only "
                          f"({w // m.binning} x {h // m.binning} at binning {m.binning})")
    em = state.em
    base = em.stage_position()
    mag = em.magnification(settings.mag_index)
    px = mag.pixel_size_um * m.binning
    rot = affine_from(1.0, mag.rotation_deg, (0.0, 0.0), (1, 1))[:, :2]
    step = ((m.frame[0] - m.overlap[0]) * px, (m.frame[1] - m.overlap[1]) * px)
    for ix in range(m.nx):
        column = range(m.ny) if ix % 2 == 0 else range(m.ny - 1, -1, -1)
        for iy in column:
            # piece y runs up the image (SerialEM's montage files), i.e. towards row 0
            local = np.array([(ix - (m.nx - 1) / 2) * step[0], -(iy - (m.ny - 1) / 2) * step[1]])
            d = rot @ local
            em.move_stage(base[0] + float(d[0]), base[1] + float(d[1]))
            image = em.acquire(area, settings)
            piece_xy = (ix * (m.frame[0] - m.overlap[0]), iy * (m.frame[1] - m.overlap[1]))
            m.pieces[(ix, iy)] = Buffer(image.data, image.binning, image.exposure_s or 0.0,
                                        image.pixel_size_um, -1.0,
                                        image_meta(image, em.stage_position(), piece_xy))
            m.images[(ix, iy)] = image
    state.area = area if state.low_dose_on else state.area
    em.move_stage(base[0], base[1])          # SerialEM returns to the centre at the end


@command("ReportNumMontagePieces")
def _num_pieces(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    m = state.montage
    return (float(m.nx * m.ny) if m is not None else 1.0,)


@command("ReportFileZsize")
def _file_z_size(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    m = state.montage
    if m is None:
        raise ScriptError("Script suspended because there is no open image file to report "
                          "for line:")
    return (float(len(m.pieces)), 1.0 if m.pieces else 0.0)


@command("ReadMontagePiece")
def _read_piece(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    m = state.montage
    if m is None:
        raise ScriptErrorNoLine("Script suspended on ReadMontagePiece because there is no "
                                "open file")
    target = _buffer_index(str(args[3]) if len(args) > 3 else "")
    piece = m.pieces.get((_int(args, 0) - 1, _int(args, 1) - 1)) if _int(args, 2) == 0 \
        else None
    if piece is None:
        raise ScriptError("Could not find piece in file for line:")
    state.buffers[target] = piece


@command("ReportMetadataValues")
def _metadata_values(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    buf = state.buffer(str(args[0]))
    key = str(args[1])
    values = buf.meta.get(key)
    if values is None:
        raise ScriptError(f"Key {key} does not exist in the metadata autodoc structure for "
                          f"line:")
    return tuple(float(v) for v in values[:6])


@command("CloseFile")
def _close_file(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if state.montage is not None:
        state.montage = None
    elif args and args[0] != "":
        raise ScriptError("Script suspended on CloseFile because there is no open file")
