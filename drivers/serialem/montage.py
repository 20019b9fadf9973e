"""SerialEM's own montage for ``SerialEMElectronMicroscope.montage`` (``native_montage``).

Why SerialEM's montage rather than the contract's tile loop: SerialEM takes up stage
backlash, settles and records every piece with the stage position it read back, in one
command, and writes a montage file (with its .mdoc) that SerialEM and IMOD can reopen. The
contract still wants the tiles, unstitched, each with its pixel-to-stage affine, so the
pieces are read back one by one.

Commands, in order (arguments and replies as read in SerialEM's source, see
docs/serialem-commands-verified.md section 11):

1. ``MoveStageTo`` the montage centre: a stage montage is laid out around the stage position
   at its start (EMmontageController::StartMontage takes ``mBaseStageX/Y`` from
   GetStagePosition) and returns there at the end.
2. the low-dose area with its mag, exposure and binning (as for ``acquire``), then
   ``ParamSetToUseForMontage`` so that the montage shoots in that area: 2 View, 3 Search,
   -2 and -3 (neither) for Record, -1 (no Mont-map parameters) always. SerialEM wants these
   before the montage file is opened.
3. ``MakeDirectory`` ``montage_dir`` (only logs when it exists), ``OpenNewMontage nx ny
   file`` into a new file (SerialEM refuses an existing name), then ``SetMontageParams 1
   ovx ovy fx fy 1 binning``: stage montage, overlaps and frame in binned pixels, skip
   SerialEM's correlations (clemd registers overlaps itself), binning.
4. ``Montage``; then ``ReportNumMontagePieces`` must be nx * ny (nothing skipped).
5. per piece ``ReadMontagePiece ix iy 0 buf`` (1-based piece, section 0 of the new file),
   ``ReportMetadataValues buf StagePosition`` and ``... PieceCoordinates`` (the piece's
   autodoc values: stage X Y where SerialEM recorded the piece, and its pixel position in
   the montage), ``ImageProperties buf`` and the buffer's pixels.
6. ``CloseFile``, also when anything above failed (the first error is the one raised).

How the contract's positions map onto SerialEM's layout: SerialEM places the pieces itself
from nx, ny, the frame and the overlap in pixels, centred on the start position, along its
own stage-to-camera calibration. ``plan_grid`` recovers nx, ny, the centre and the spacing
from ``positions`` (row by row along the camera axes of the magnification table, as
``ElectronMicroscope.montage_positions`` lays them out), refuses positions that are no such
grid, rounds the overlap to whole pixels within SerialEM's limits (16 <= overlap <= frame /
2), and checks the resulting layout against the stage limits before any command is sent.
Piece (ix, iy) is matched to the requested tile by its reported stage position: of the four
ways SerialEM's piece axes can run along the grid's (x and y each as they are or reversed),
the one that fits best is used; if even that misses by more than half a tile step plus
``STAGE_SLACK_UM``, SerialEM's layout is not the requested one (its stage calibration and
the table's ``rotation_deg`` disagree) and HardwareFault is raised.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.base import Image, LowDoseArea, Magnification, StageLimits, affine_from
from drivers.errors import ClemdError, HardwareFault, LimitViolation, ProtocolError
from drivers.serialem.client import Result, SerialEMLink

log = structlog.get_logger(__name__)

#: SetMontageParams: "The X overlap must be at least 16", "X overlap is more than half the
#: frame size" (CMacCmd::SetMontageParams).
MIN_OVERLAP_PX = 16
#: How far a piece may land from its requested position beyond half a tile step (stage
#: repeatability and backlash on the microscope, ~1 um rms).
STAGE_SLACK_UM = 3.0
#: ParamSetToUseForMontage values per low-dose area (CMacCmd::ParamSetToUseForMontage:
#: 1 Mont-map parameters, 2 View, 3 Search; negative turns the choice off).
PARAM_SETS = {LowDoseArea.VIEW: (-1, 2), LowDoseArea.SEARCH: (-1, 3),
              LowDoseArea.RECORD: (-1, -2, -3)}
_GRID_TOL_UM = 1e-3


@dataclass(frozen=True)
class MontageGrid:
    """The requested tiles as SerialEM lays out a montage.

    ``frame_px`` and ``overlap_px`` are (x, y) in binned camera pixels; ``positions`` the
    requested tile centres in order (row by row), ``step_um`` their spacing along the
    camera's x and y.
    """

    nx: int
    ny: int
    centre_um: tuple[float, float]
    frame_px: tuple[int, int]
    overlap_px: tuple[int, int]
    binning: int
    positions: tuple[tuple[float, float], ...]
    step_um: tuple[float, float]


@dataclass(frozen=True)
class Piece:
    """One piece as read back from SerialEM's montage file."""

    ix: int                       # 1-based, as SerialEM numbers pieces
    iy: int
    stage_xy: tuple[float, float]
    piece_xy: tuple[int, int]     # pixel position in the montage (PieceCoordinates)
    data: NDArray[Any]
    binning: int
    exposure_s: float
    serialem_pixel_nm: float


def plan_grid(positions: Sequence[tuple[float, float]], mag: Magnification,
              frame_hw: tuple[int, int], binning: int, limits: StageLimits) -> MontageGrid:
    """SerialEM's layout for ``positions``; LimitViolation before anything is sent."""
    pts = np.asarray(positions, dtype=float)
    centre = pts.mean(axis=0)
    rot = affine_from(1.0, mag.rotation_deg, (0.0, 0.0), (1, 1))[:, :2]
    local = (pts - centre) @ rot              # camera axes (rot is orthonormal)
    xs, ys = _levels(local[:, 0]), _levels(local[:, 1])
    nx, ny = len(xs), len(ys)
    order = [(x, y) for y in ys for x in xs]
    if nx * ny != len(pts) or not np.allclose(local, order, atol=_GRID_TOL_UM):
        raise LimitViolation(f"montage positions {len(pts)} are not a row-by-row grid along "
                             f"the camera axes of mag index {mag.index}; SerialEM lays out "
                             f"montage pieces itself and can only take such a grid")
    h, w = frame_hw
    px = mag.pixel_size_um * binning
    step_x, step_y = _step(xs, "x"), _step(ys, "y")
    ov_x = None if step_x is None else w - round(step_x / px)
    ov_y = None if step_y is None else h - round(step_y / px)
    ov_x = _overlap(ov_x, ov_y, w, h, "x")
    ov_y = _overlap(ov_y, ov_x, h, w, "y")
    grid = MontageGrid(nx, ny, (float(centre[0]), float(centre[1])), (w, h), (ov_x, ov_y),
                       binning, tuple((float(x), float(y)) for x, y in pts),
                       ((w - ov_x) * px, (h - ov_y) * px))
    for x, y in layout_um(grid, mag):
        limits.check_xy(x, y)
    return grid


def param_sets(area: LowDoseArea) -> tuple[int, ...]:
    """ParamSetToUseForMontage values for ``area``; LimitViolation for Focus and Trial."""
    sets = PARAM_SETS.get(area)
    if sets is None:
        raise LimitViolation(f"SerialEM montages only in View, Search or Record in low dose, "
                             f"not {area.name} (ParamSetToUseForMontage)")
    return sets


def layout_um(grid: MontageGrid, mag: Magnification) -> list[tuple[float, float]]:
    """Stage centres of SerialEM's pieces (whole-pixel overlaps), row by row."""
    rot = affine_from(1.0, mag.rotation_deg, (0.0, 0.0), (1, 1))[:, :2]
    out = []
    for j in range(grid.ny):
        for i in range(grid.nx):
            local = np.array([(i - (grid.nx - 1) / 2) * grid.step_um[0],
                              (j - (grid.ny - 1) / 2) * grid.step_um[1]])
            d = rot @ local
            out.append((grid.centre_um[0] + float(d[0]), grid.centre_um[1] + float(d[1])))
    return out


def montage_path(folder: str) -> str:
    """A new file name in ``folder`` on the SerialEM PC (Windows separators when it has any)."""
    sep = "\\" if ("\\" in folder or ":" in folder) else "/"
    return f"{folder.rstrip('/').rstrip(chr(92))}{sep}clemd-montage-{uuid.uuid4().hex[:12]}.mrc"


def run_montage(link: SerialEMLink, grid: MontageGrid, area: LowDoseArea, folder: str,
                path: str, buffer: str) -> list[Piece]:
    """Steps 2 (ParamSetToUseForMontage) to 6 of the module docstring; the stage is at the
    centre and the low-dose area set up.

    Raises SerialEMScriptError (SerialEM refused or failed a command), ConnectionLost (the
    link dropped), HardwareFault (SerialEM acquired a different number of pieces). The file
    is closed in every case; a failure to close after an error is logged, not raised.
    """
    for value in param_sets(area):
        link.call("ParamSetToUseForMontage", value)
    link.call("MakeDirectory", folder)
    link.call("OpenNewMontage", grid.nx, grid.ny, path)
    try:
        link.call("SetMontageParams", 1, grid.overlap_px[0], grid.overlap_px[1],
                  grid.frame_px[0], grid.frame_px[1], 1, float(grid.binning))
        link.call("Montage")
        count = int(numbers(link.call("ReportNumMontagePieces"), 1,
                            "ReportNumMontagePieces")[0])
        if count != grid.nx * grid.ny:
            raise HardwareFault(f"SerialEM reports {count} montage pieces for a {grid.nx} x "
                                f"{grid.ny} montage in {path}")
        pieces = [read_piece(link, ix, iy, buffer)
                  for ix in range(1, grid.nx + 1) for iy in range(1, grid.ny + 1)]
    except BaseException:
        _close_after_error(link, path)
        raise
    link.call("CloseFile")
    log.info("serialem.montage_done", path=path, pieces=len(pieces))
    return pieces


def read_piece(link: SerialEMLink, ix: int, iy: int, buffer: str) -> Piece:
    """Piece (ix, iy) of section 0 of the open montage, into ``buffer`` and back."""
    link.call("ReadMontagePiece", ix, iy, 0, buffer)
    sx, sy = numbers(link.call("ReportMetadataValues", buffer, "StagePosition"), 2,
                     "ReportMetadataValues StagePosition")[:2]
    px, py = numbers(link.call("ReportMetadataValues", buffer, "PieceCoordinates"), 2,
                     "ReportMetadataValues PieceCoordinates")[:2]
    # width, height, binning, exposure s, pixel nm (0 if unknown), parameter set used
    props = numbers(link.call("ImageProperties", buffer), 6, "ImageProperties")
    binning = props[2]
    if binning < 1 or binning != int(binning):
        raise HardwareFault(f"SerialEM montage piece ({ix}, {iy}) has binning {binning:g}; "
                            f"the driver describes only whole binnings")
    return Piece(ix, iy, (sx, sy), (int(px), int(py)), link.get_image(buffer), int(binning),
                 props[3], props[4])


def assign(grid: MontageGrid, pieces: Sequence[Piece]) -> list[Piece]:
    """The pieces in the order of ``grid.positions`` (module docstring: how they map)."""
    want = np.asarray(grid.positions)
    got = {(p.ix - 1, p.iy - 1): p for p in pieces}
    best: tuple[float, list[Piece]] | None = None
    for flip_x, flip_y in itertools.product((False, True), repeat=2):
        ordered = []
        for j, i in itertools.product(range(grid.ny), range(grid.nx)):
            key = (grid.nx - 1 - i if flip_x else i, grid.ny - 1 - j if flip_y else j)
            ordered.append(got[key])
        miss = np.asarray([p.stage_xy for p in ordered]) - want
        worst = float(np.sqrt((miss ** 2).sum(axis=1)).max())
        if best is None or worst < best[0]:
            best = (worst, ordered)
    assert best is not None
    worst, ordered = best
    allowed = 0.5 * min(s for s, n in zip(grid.step_um, (grid.nx, grid.ny), strict=True)
                        if n > 1) if grid.nx * grid.ny > 1 else 0.0
    if worst > allowed + STAGE_SLACK_UM:
        raise HardwareFault(f"SerialEM's montage pieces land up to {worst:.2f} um from the "
                            f"requested positions (allowed {allowed + STAGE_SLACK_UM:.2f}); "
                            f"its stage calibration and the magnification table's "
                            f"rotation_deg disagree")
    return ordered


def numbers(result: Result, count: int, what: str) -> list[float]:
    """At least ``count`` numbers from a reply; numeric strings count (ReportMetadataValues
    reports the autodoc's words, which may come back flagged as strings)."""
    values: tuple[Any, ...] = result if isinstance(result, tuple) else (result,)
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            break
    if len(out) < count or not all(math.isfinite(v) for v in out[:count]):
        raise ProtocolError(f"{what}: expected {count} numbers, SerialEM reported {result!r}")
    return out


def _close_after_error(link: SerialEMLink, path: str) -> None:
    """Close the montage file after a failure; a failure here must not hide the first."""
    try:
        link.call("CloseFile")
    except ClemdError as err:
        log.warning("serialem.montage_close_failed", path=path, error=str(err))


def _levels(values: NDArray[np.float64]) -> list[float]:
    """Distinct coordinates (within 1 nm), sorted."""
    out: list[float] = []
    for v in sorted(values.tolist()):
        if not out or v - out[-1] > _GRID_TOL_UM:
            out.append(v)
    return out


def _step(levels: list[float], axis: str) -> float | None:
    if len(levels) < 2:
        return None
    steps = np.diff(levels)
    if not np.allclose(steps, steps[0], atol=_GRID_TOL_UM):
        raise LimitViolation(f"montage positions are not evenly spaced along the camera {axis} "
                             f"axis; SerialEM can only space pieces evenly")
    return float(steps[0])


def _overlap(own: int | None, other: int | None, frame: int, other_frame: int,
             axis: str) -> int:
    """The axis' overlap in binned pixels; a single row/column takes the other axis'
    fraction (or a tenth of the frame), since SerialEM still wants a valid value."""
    if own is None:
        frac = 0.1 if other is None else other / other_frame
        own = max(MIN_OVERLAP_PX, min(frame // 2, round(frac * frame)))
    if frame < 2 * MIN_OVERLAP_PX:
        raise LimitViolation(f"montage frame of {frame} px along {axis} is too small for "
                             f"SerialEM's montage (SetMontageParams needs an overlap of at "
                             f"least {MIN_OVERLAP_PX} px and at most half the frame); use a "
                             f"smaller binning")
    if not MIN_OVERLAP_PX <= own <= frame // 2:
        raise LimitViolation(f"montage overlap along {axis} is {own} px of a {frame} px frame; "
                             f"SerialEM's SetMontageParams takes {MIN_OVERLAP_PX} to "
                             f"{frame // 2} px (overlap {MIN_OVERLAP_PX / frame:.3f} to "
                             f"{(frame // 2) / frame:.3f})")
    return own


@dataclass(frozen=True)
class TileContext:
    """What every tile of one montage shares: read once after the montage."""

    mag: Magnification
    area: LowDoseArea
    dose_rate_e_per_a2_s: float
    start_s: float
    stage_z_um: float
    tilt_deg: float
    defocus_um: float
    image_shift_um: tuple[float, float]
    path: str


def tile_image(piece: Piece, k: int, ctx: TileContext) -> Image:
    """The contract's tile ``k`` from a piece: its affine centred on the stage position
    SerialEM recorded for it (plus the image shift in force, which a stage montage leaves
    as it was), rows as the buffer holds them (as for ``acquire``)."""
    if piece.data.ndim != 2:
        raise ProtocolError(f"SerialEM montage piece ({piece.ix}, {piece.iy}) is RGB, not a "
                            f"camera frame")
    px = ctx.mag.pixel_size_um * piece.binning
    h, w = piece.data.shape
    sx, sy = piece.stage_xy
    isx, isy = ctx.image_shift_um
    return Image(
        data=piece.data, pixel_size_um=px,
        pixel_to_stage=affine_from(px, ctx.mag.rotation_deg, (sx + isx, sy + isy), (h, w)),
        instrument="em", stage_um=(sx, sy, ctx.stage_z_um), time_s=ctx.start_s,
        exposure_s=piece.exposure_s, magnification=ctx.mag.magnification,
        mag_index=ctx.mag.index, binning=piece.binning, tilt_deg=ctx.tilt_deg,
        defocus_um=ctx.defocus_um,
        dose_e_per_a2=ctx.dose_rate_e_per_a2_s * piece.exposure_s,
        low_dose_area=ctx.area.value, index={"tile": k},
        extra={"serialem_piece": (piece.ix, piece.iy), "piece_coordinates_px": piece.piece_xy,
               "montage_file": ctx.path, "image_shift_um": ctx.image_shift_um,
               "serialem_pixel_nm": piece.serialem_pixel_nm})
