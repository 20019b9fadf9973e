"""The ElectronMicroscope contract over SerialEM's external-Python link.

drivers/base.py checks limits, magnifications and areas before a hook runs; each hook here is
a short, fixed sequence of SerialEM script commands sent through a ``SerialEMLink`` (the
socket client, the compiled module, or anything speaking the same calls). The command names
live in this module's mapping and nowhere else above the codec.

Choices, and why:

- Acquisition goes through SerialEM's low-dose areas. Before each shot the driver goes to the
  area and pushes the configured mag, exposure and binning, so the image metadata (pixel size
  from the magnification table times the binning SerialEM reports) describes what SerialEM
  really did rather than what it was last set to by hand.
- Image shift is set in specimen micrometres as the contract wants: SerialEM's absolute
  ``SetImageShift`` takes uncalibrated IS units, so the driver reads the shift in specimen
  um with ``ReportSpecimenShift`` and moves by the difference with ``ImageShiftByMicrons``.
  (``ReportImageShift`` is no help here: it reports IS units, then unbinned camera pixels,
  then a stage move, never specimen um.) ``ImageShiftByMicrons`` reports 1 and does nothing
  when the shift would pass SerialEM's limit; the driver raises LimitViolation then.
- Montages: with ``montage_dir`` configured, SerialEM's own ``Montage`` into a new montage
  file there, the pieces read back with the stage positions SerialEM recorded for them
  (drivers/serialem/montage.py says how the requested positions map onto SerialEM's
  layout); ``native_montage`` is then True. Without it, the contract's tile loop.
- Navigator items are SerialEM's table, numbered from 1 as SerialEM numbers them; labels
  and notes are read back from the ``navLabel`` / ``navNote`` variables ``ReportOtherItem``
  sets. A realignment returns the stage error SerialEM found (``GetRealignToItemError``'s
  first pair), with the imaging state restored afterwards (``RealignToOtherItem i 1``).
- Image rows: SerialEM sends a buffer's pixels in memory order, and writes MRC files with
  the rows reversed (KStoreMRC::WriteSection -> convertForWriting(image, needFlipped=true)).
  So ``Image.data`` row 0 is the top row as SerialEM displays the image and the LAST row of
  the same image saved to an MRC file. ``pixel_to_stage`` maps (column, row) of these rows;
  the magnification table's ``rotation_deg`` must be calibrated on images fetched through
  this driver, not on saved MRC files, and SerialEM's own stage-to-camera matrices use a
  right-handed camera frame (y up, i.e. decreasing row), so one copied from SerialEM needs
  its y axis flipped.
- Per-shot settings (``acquire(area, settings)``) go the same way: mag, exposure and binning
  are pushed before the shot, so the next plain shot in the area pushes the preset back.
  A defocus offset differing from the area's configured one is applied with ``ChangeFocus``
  around the shot (and undone after it, also when the shot fails): SerialEM keeps defocus
  offsets only for View and Search, as low-dose settings the operator owns.
- ``autofocus``: ``AutoFocus -1 a`` measures without changing focus (FocusManager
  AutoFocusStart with change -1), ``ReportAutoFocus`` gives the measured defocus and an
  error code (0 ok, -1 failed, 1-4 aborted: MacroCommands.cpp CMacCmd::ReportAutoFocus);
  the error is the measurement minus ``ReportDefocus`` (plus the area's offset), and the
  contract applies the correction with ``SetDefocus``. Why not SerialEM's own change
  (``AutoFocus 1``): it aims at SerialEM's target defocus, a setting the operator owns; the
  contract's target is the defocus already set. Only the Focus (``a`` 0) and Record (-1)
  areas are offered: they have no low-dose defocus offset in SerialEM, so the measurement
  and ``ReportDefocus`` compare directly (View and Search would need the offset SerialEM
  subtracts, which ``ReportDefocus`` in those areas may or may not include).
- ``abort``: SerialEM takes no external abort while a command runs (the link is busy with
  it, and the operator's STOP button is the only way in). The contract's abort flag stops
  the next step; the command in flight finishes.

Every reply format and argument convention used here was checked against SerialEM's source
(MacroCommands.cpp, MacroProcessor.cpp, NavHelper.cpp, PythonServer.cpp, the serialem
module's SerialEMModule.cpp); docs/serialem-commands-verified.md lists what each command
reports, where in the source it was read, and what could not be verified (the meaning of a
vacuum gauge's status, which comes from the scope plugin: see ``vacuum_ok_statuses``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from numpy.typing import NDArray

from drivers.base import (
    AcquisitionSettings,
    AutofocusFailed,
    ElectronMicroscope,
    EMStatus,
    Image,
    LowDoseArea,
    Magnification,
    NavItem,
    affine_from,
)
from drivers.clock import Clock
from drivers.errors import HardwareFault, LimitViolation, ProtocolError
from drivers.serialem.client import Result, SerialEMLink, open_serialem
from drivers.serialem.config import SerialEMConfig
from drivers.serialem.montage import (
    TileContext,
    assign,
    montage_path,
    param_sets,
    plan_grid,
    run_montage,
    tile_image,
)

log = structlog.get_logger(__name__)

#: Camera command of each low-dose area; the image lands in buffer A.
_SHOT = {LowDoseArea.VIEW: "View", LowDoseArea.FOCUS: "Focus", LowDoseArea.TRIAL: "Trial",
         LowDoseArea.RECORD: "Record", LowDoseArea.SEARCH: "Search"}
_ITEM_KINDS = {0: "point", 1: "polygon", 2: "map"}
IMAGE_BUFFER = "A"
#: AutoFocus's second argument (low-dose area) for the areas the driver measures in.
_AUTOFOCUS_AREA = {LowDoseArea.FOCUS: 0, LowDoseArea.RECORD: -1}
# GetRealignToItemError's stage error before any realignment (CNavHelper's initial value).
_NO_REALIGN_ERROR = -999.0


class SerialEMElectronMicroscope(ElectronMicroscope):
    """A TEM driven through SerialEM.

    Parameters
    ----------
    config:
        The validated settings (magnification table, low-dose presets, limits, gauge).
    link:
        An open ``SerialEMLink``; the microscope owns it and closes it in ``close``.
    clock:
        Time source for image timestamps.
    """

    def __init__(self, config: SerialEMConfig, link: SerialEMLink, *, clock: Clock) -> None:
        super().__init__(magnifications=config.magnification_list(),
                         limits=config.stage_limits(), tilt_limits=config.tilt_limits(),
                         clock=clock, low_dose=config.low_dose_settings())
        self.config = config
        self.native_montage = config.montage_dir is not None
        self._link = link
        self._camera_shape = config.camera_shape

    @classmethod
    def from_config(cls, config: SerialEMConfig, *, clock: Clock,
                    environ: Mapping[str, str] | None = None) -> SerialEMElectronMicroscope:
        """Open the configured link (address from config, else PY_SERIALEM_IP/PORT)."""
        return cls(config, open_serialem(config, environ=environ), clock=clock)

    # -- stage ------------------------------------------------------------------------------

    def _do_move_stage(self, x_um: float, y_um: float, z_um: float | None) -> None:
        if z_um is None:
            self._link.call("MoveStageTo", x_um, y_um)
        else:
            self._link.call("MoveStageTo", x_um, y_um, z_um)

    def _do_get_stage(self) -> tuple[float, float, float]:
        x, y, z = _numbers(self._link.call("ReportStageXYZ"), 3, "ReportStageXYZ")
        return x, y, z

    def _do_tilt_to(self, tilt_deg: float) -> None:
        self._link.call("TiltTo", tilt_deg)

    def _do_get_tilt(self) -> float:
        return _numbers(self._link.call("ReportTiltAngle"), 1, "ReportTiltAngle")[0]

    # -- optics -----------------------------------------------------------------------------

    def _do_set_mag(self, mag: Magnification) -> None:
        self._link.call("SetMagIndex", mag.index)

    def _do_get_mag_index(self) -> int:
        return int(_numbers(self._link.call("ReportMagIndex"), 1, "ReportMagIndex")[0])

    def _do_set_defocus(self, defocus_um: float) -> None:
        self._link.call("SetDefocus", defocus_um)

    def _do_get_defocus(self) -> float:
        return _numbers(self._link.call("ReportDefocus"), 1, "ReportDefocus")[0]

    def _do_set_image_shift(self, x_um: float, y_um: float) -> None:
        cx, cy = self._do_get_image_shift()
        dx, dy = x_um - cx, y_um - cy
        if abs(dx) <= 1e-6 and abs(dy) <= 1e-6:
            return
        refused = _numbers(self._link.call("ImageShiftByMicrons", dx, dy), 1,
                           "ImageShiftByMicrons")[0]
        if refused:
            raise LimitViolation(f"image shift ({x_um:g}, {y_um:g}) um: SerialEM refused the "
                                 f"change of ({dx:g}, {dy:g}) um as past its image-shift "
                                 f"limit and did not shift")

    def _do_get_image_shift(self) -> tuple[float, float]:
        result = self._link.call("ReportSpecimenShift")
        if result is None:      # SerialEM only logs when it cannot convert
            raise HardwareFault(f"SerialEM has no image-shift-to-specimen calibration at mag "
                                f"index {self._do_get_mag_index()}; ReportSpecimenShift "
                                f"reported nothing")
        x, y = _numbers(result, 2, "ReportSpecimenShift")[:2]
        return x, y

    # -- camera -----------------------------------------------------------------------------

    def _do_camera_shape(self) -> tuple[int, int]:
        if self._camera_shape is None:
            width, height = _numbers(self._link.call("CameraProperties"), 2,
                                     "CameraProperties")[:2]
            self._camera_shape = (int(height), int(width))
        return self._camera_shape

    def _do_acquire(self, area: LowDoseArea, settings: AcquisitionSettings) -> Image:
        self._go_to_area(area, settings)
        with self._extra_defocus(area, settings):
            start = self.clock.now()
            self._link.call(_SHOT[area])
        # width, height, binning, exposure s, pixel nm (0 if unknown), parameter set used
        props = _numbers(self._link.call("ImageProperties", IMAGE_BUFFER), 6, "ImageProperties")
        data = self._link.get_image(IMAGE_BUFFER)
        return self._image(data, area, settings, start, binning=_binning(props[2]),
                           exposure_s=props[3], serialem_pixel_nm=props[4])

    def _check_montage(self, positions: list[tuple[float, float]], area: LowDoseArea,
                       settings: AcquisitionSettings) -> None:
        if self.config.montage_dir is None:
            return
        param_sets(area)
        plan_grid(positions, self.magnification(settings.mag_index),
                  self.camera_shape(settings.binning), settings.binning, self.limits)

    def _do_montage(self, positions: list[tuple[float, float]], area: LowDoseArea,
                    settings: AcquisitionSettings) -> list[Image]:
        folder = self.config.montage_dir
        if folder is None:
            return super()._do_montage(positions, area, settings)
        param_sets(area)
        mag = self.magnification(settings.mag_index)
        grid = plan_grid(positions, mag, self.camera_shape(settings.binning), settings.binning,
                         self.limits)
        path = montage_path(folder)
        log.info("serialem.montage", path=path, tiles=(grid.nx, grid.ny), area=area.name,
                 overlap_px=grid.overlap_px)
        self._link.call("MoveStageTo", *grid.centre_um)
        self._go_to_area(area, settings)
        with self._extra_defocus(area, settings):
            start = self.clock.now()
            pieces = run_montage(self._link, grid, area, folder, path,
                                 self.config.montage_read_buffer)
        index = self._do_get_mag_index()
        if index != mag.index:
            raise HardwareFault(f"SerialEM montaged at mag index {index}, not {mag.index}")
        ctx = TileContext(mag=mag, area=area,
                          dose_rate_e_per_a2_s=settings.dose_rate_e_per_a2_s, start_s=start,
                          stage_z_um=self._do_get_stage()[2], tilt_deg=self._do_get_tilt(),
                          defocus_um=self._do_get_defocus() + settings.defocus_offset_um,
                          image_shift_um=self._do_get_image_shift(), path=path)
        return [tile_image(piece, k, ctx) for k, piece in enumerate(assign(grid, pieces))]

    @contextmanager
    def _extra_defocus(self, area: LowDoseArea, settings: AcquisitionSettings) -> Iterator[None]:
        """Apply a per-shot defocus offset that differs from the area's configured one for
        the duration of the block, and undo it afterwards, also when the block fails."""
        configured = self.config.low_dose_settings().get(area)
        extra_um = settings.defocus_offset_um - (configured.defocus_offset_um
                                                 if configured is not None else 0.0)
        if extra_um:
            self._link.call("ChangeFocus", extra_um)
        try:
            yield
        finally:
            if extra_um:
                self._link.call("ChangeFocus", -extra_um)

    def _do_autofocus(self, area: LowDoseArea, settings: AcquisitionSettings) -> float:
        which = _AUTOFOCUS_AREA.get(area)
        if which is None:
            raise LimitViolation(f"autofocus in {area.name}: the SerialEM driver measures "
                                 f"defocus only in {sorted(a.name for a in _AUTOFOCUS_AREA)} "
                                 f"(AutoFocus's area argument; View and Search carry "
                                 f"SerialEM's low-dose defocus offsets)")
        self._go_to_area(area, settings)
        self._link.call("AutoFocus", -1, which)
        # last measured defocus (um), error code: 0 ok, -1 failed, 1-4 aborted
        measured, code = _numbers(self._link.call("ReportAutoFocus"), 2, "ReportAutoFocus")[:2]
        if code != 0:
            raise AutofocusFailed(f"SerialEM reports the autofocus in {area.name} "
                                  f"{'failed' if code < 0 else 'aborted'} (ReportAutoFocus "
                                  f"error {code:g}); focus left as it was")
        return measured - (self._do_get_defocus() + settings.defocus_offset_um)

    def _go_to_area(self, area: LowDoseArea, settings: AcquisitionSettings) -> None:
        """Low dose on, go to ``area``, and make its mag, exposure and binning the preset's.

        SetLowDoseMode changes nothing when low dose is already on, so it is sent before every
        shot: an operator who switched low dose off by hand would otherwise make
        GoToLowDoseArea fail ("You must be in low dose mode")."""
        self._link.call("SetLowDoseMode", 1)
        self._link.call("GoToLowDoseArea", area.value)
        if self._do_get_mag_index() != settings.mag_index:
            self._link.call("SetMagIndex", settings.mag_index)
        self._link.call("SetExposure", area.value, settings.exposure_s)
        self._link.call("SetBinning", area.value, settings.binning)

    def _image(self, data: NDArray[Any], area: LowDoseArea, settings: AcquisitionSettings,
               start: float, *, binning: int, exposure_s: float,
               serialem_pixel_nm: float) -> Image:
        index = self._do_get_mag_index()
        if index not in self.magnifications:
            raise HardwareFault(f"SerialEM acquired at mag index {index}, which is not in "
                                f"em.settings.magnifications {sorted(self.magnifications)}")
        mag = self.magnifications[index]
        x, y, z = self._do_get_stage()
        isx, isy = self._do_get_image_shift()
        if data.ndim != 2:
            raise ProtocolError(f"SerialEM buffer {IMAGE_BUFFER} holds an RGB image, "
                                f"not a camera frame")
        px = mag.pixel_size_um * binning
        h, w = data.shape
        return Image(
            data=data, pixel_size_um=px,
            pixel_to_stage=affine_from(px, mag.rotation_deg, (x + isx, y + isy), (h, w)),
            instrument="em", stage_um=(x, y, z), time_s=start, exposure_s=exposure_s,
            magnification=mag.magnification, mag_index=index, binning=binning,
            tilt_deg=self._do_get_tilt(),
            defocus_um=self._do_get_defocus() + settings.defocus_offset_um,
            dose_e_per_a2=settings.dose_rate_e_per_a2_s * exposure_s, low_dose_area=area.value,
            extra={"image_shift_um": (isx, isy), "serialem_pixel_nm": serialem_pixel_nm,
                   "buffer": IMAGE_BUFFER})

    # -- navigator --------------------------------------------------------------------------

    def _do_nav_items(self) -> list[NavItem]:
        count = int(_numbers(self._link.call("ReportNumTableItems"), 1,
                             "ReportNumTableItems")[0])
        return [self._nav_item(i) for i in range(1, count + 1)]

    def _nav_item(self, index: int) -> NavItem:
        # index, stage X, Y, Z, type; label and note come as the navLabel/navNote variables
        values = _numbers(self._link.call("ReportOtherItem", index), 5, "ReportOtherItem")
        label = self._link.call("GetVariable", "navLabel")
        note = self._link.call("GetVariable", "navNote")
        acquire = _numbers(self._link.call("ReportItemAcquire", index), 1, "ReportItemAcquire")
        return NavItem(item_id=int(values[0]), label=_text(label), note=_text(note),
                       stage_um=(values[1], values[2], values[3]),
                       kind=_ITEM_KINDS.get(int(values[4]), "point"), acquire=acquire[0] != 0)

    def _do_add_nav_point(self, x_um: float, y_um: float, z_um: float, label: str, note: str,
                          acquire: bool) -> NavItem:
        index = int(_numbers(self._link.call("AddStagePosAsNavPoint", x_um, y_um, z_um), 1,
                             "AddStagePosAsNavPoint")[0])
        if label:
            self._link.call("ChangeItemLabel", index, label)
        if note:
            self._link.call("ChangeItemNote", index, note)
        self._link.call("SetItemAcquire", index, 1 if acquire else 0)
        return self._nav_item(index)

    def _do_realign_to_item(self, item_id: int) -> tuple[float, float]:
        # second argument 1: restore the imaging state SerialEM changes to image the map
        self._link.call("RealignToOtherItem", item_id, 1)
        # stage error X, Y (final disparity from the item), then the local error X, Y found
        # in the alignment at the target
        values = _numbers(self._link.call("GetRealignToItemError"), 4, "GetRealignToItemError")
        if values[0] == _NO_REALIGN_ERROR and values[1] == _NO_REALIGN_ERROR:
            raise HardwareFault(f"SerialEM reports no realignment error after realigning to "
                                f"item {item_id}")
        return values[0], values[1]

    # -- status -----------------------------------------------------------------------------

    def _do_status(self) -> EMStatus:
        # gauge: status (passed through from the scope plugin), pressure
        gauge = _numbers(self._link.call("ReportVacuumGauge", self.config.vacuum_gauge), 2,
                         "ReportVacuumGauge")
        valve = _numbers(self._link.call("ReportColumnOrGunValve"), 1, "ReportColumnOrGunValve")
        kv = _numbers(self._link.call("ReportHighVoltage"), 1, "ReportHighVoltage")
        # FEI: 0/1; JEOL: 0-3, stage tank 1 + transfer tank 2
        filling = _numbers(self._link.call("AreDewarsFilling"), 1, "AreDewarsFilling")
        return EMStatus(vacuum_ok=self.config.vacuum_is_ok(int(gauge[0]), gauge[1]),
                        column_valve_open=valve[0] > 0, high_voltage_kv=kv[0],
                        dewar_filling=filling[0] > 0)

    def _do_close(self) -> None:
        self._link.close()


def _numbers(result: Result, at_least: int, what: str) -> tuple[float, ...]:
    """The reported values of a call as floats; fewer than ``at_least`` is a ProtocolError."""
    values = result if isinstance(result, tuple) else (() if result is None else (result,))
    if len(values) < at_least or any(isinstance(v, str) for v in values[:at_least]):
        raise ProtocolError(f"{what} reported {values!r}; expected at least {at_least} numbers")
    return tuple(float(v) for v in values)


def _binning(reported: float) -> int:
    """ImageProperties' binning, which is fractional (0.5) for super-resolution frames."""
    if reported < 1 or reported != int(reported):
        raise HardwareFault(f"SerialEM reports binning {reported:g}; super-resolution "
                            f"(sub-pixel) binning is not supported by this driver")
    return int(reported)


def _text(result: Result) -> str:
    """A string result; SerialEM reports a numeric-looking variable as a number."""
    if result is None:
        return ""
    if isinstance(result, tuple):
        raise ProtocolError(f"expected one value, got {result!r}")
    if isinstance(result, float):
        return f"{result:g}"
    return result

