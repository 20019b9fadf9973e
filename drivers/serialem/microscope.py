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
  ``SetImageShift`` takes uncalibrated IS units, so the driver reads the calibrated shift and
  moves by the difference with ``ImageShiftByMicrons``.
- Montages use the contract's tile loop (stage move + acquire per tile), not SerialEM's
  ``Montage``: that writes to a montage file and leaves only an overview in the buffers,
  while protocols want the tiles with their own affines (protocols/stitching.py).
- Navigator items are SerialEM's table, numbered from 1 as SerialEM numbers them; labels
  and notes are read back from the ``navLabel`` / ``navNote`` variables ``ReportOtherItem``
  sets.
- ``abort``: SerialEM takes no external abort while a command runs (the link is busy with
  it, and the operator's STOP button is the only way in). The contract's abort flag stops
  the next step; the command in flight finishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from numpy.typing import NDArray

from drivers.base import (
    AcquisitionSettings,
    ElectronMicroscope,
    EMStatus,
    Image,
    LowDoseArea,
    Magnification,
    NavItem,
    affine_from,
)
from drivers.clock import Clock
from drivers.errors import HardwareFault, ProtocolError
from drivers.serialem.client import Result, SerialEMLink, open_serialem
from drivers.serialem.config import SerialEMConfig

log = structlog.get_logger(__name__)

#: Camera command of each low-dose area; the image lands in buffer A.
_SHOT = {LowDoseArea.VIEW: "View", LowDoseArea.FOCUS: "Focus", LowDoseArea.TRIAL: "Trial",
         LowDoseArea.RECORD: "Record", LowDoseArea.SEARCH: "Search"}
_ITEM_KINDS = {0: "point", 1: "polygon", 2: "map"}
IMAGE_BUFFER = "A"


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
        self._link = link
        self._camera_shape = config.camera_shape
        self._low_dose_on = False

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
        if abs(dx) > 1e-6 or abs(dy) > 1e-6:
            self._link.call("ImageShiftByMicrons", dx, dy)

    def _do_get_image_shift(self) -> tuple[float, float]:
        values = _numbers(self._link.call("ReportImageShift"), 4, "ReportImageShift "
                          "(no image-shift calibration at this magnification?)")
        return values[2], values[3]

    # -- camera -----------------------------------------------------------------------------

    def _do_camera_shape(self) -> tuple[int, int]:
        if self._camera_shape is None:
            width, height = _numbers(self._link.call("CameraProperties"), 2,
                                     "CameraProperties")[:2]
            self._camera_shape = (int(height), int(width))
        return self._camera_shape

    def _do_acquire(self, area: LowDoseArea, settings: AcquisitionSettings) -> Image:
        self._go_to_area(area, settings)
        start = self.clock.now()
        self._link.call(_SHOT[area])
        props = _numbers(self._link.call("ImageProperties", IMAGE_BUFFER), 6, "ImageProperties")
        data = self._link.get_image(IMAGE_BUFFER)
        return self._image(data, area, settings, start, binning=int(props[2]),
                           exposure_s=props[3], serialem_pixel_nm=props[4])

    def _go_to_area(self, area: LowDoseArea, settings: AcquisitionSettings) -> None:
        """Low dose on, go to ``area``, and make its mag, exposure and binning the preset's."""
        if not self._low_dose_on:
            self._link.call("SetLowDoseMode", 1)
            self._low_dose_on = True
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
        self._link.call("RealignToOtherItem", item_id, 1)
        values = _numbers(self._link.call("GetRealignToItemError"), 2, "GetRealignToItemError")
        return values[-2], values[-1]

    # -- status -----------------------------------------------------------------------------

    def _do_status(self) -> EMStatus:
        gauge = _numbers(self._link.call("ReportVacuumGauge", self.config.vacuum_gauge), 2,
                         "ReportVacuumGauge")
        valve = _numbers(self._link.call("ReportColumnOrGunValve"), 1, "ReportColumnOrGunValve")
        kv = _numbers(self._link.call("ReportHighVoltage"), 1, "ReportHighVoltage")
        filling = _numbers(self._link.call("AreDewarsFilling"), 1, "AreDewarsFilling")
        return EMStatus(vacuum_ok=gauge[0] == 0, column_valve_open=valve[0] > 0,
                        high_voltage_kv=kv[0], dewar_filling=filling[0] > 0)

    def _do_close(self) -> None:
        self._link.close()


def _numbers(result: Result, at_least: int, what: str) -> tuple[float, ...]:
    """The reported values of a call as floats; fewer than ``at_least`` is a ProtocolError."""
    values = result if isinstance(result, tuple) else (() if result is None else (result,))
    if len(values) < at_least or any(isinstance(v, str) for v in values[:at_least]):
        raise ProtocolError(f"{what} reported {values!r}; expected at least {at_least} numbers")
    return tuple(float(v) for v in values)


def _text(result: Result) -> str:
    """A string result; SerialEM reports a numeric-looking variable as a number."""
    if result is None:
        return ""
    if isinstance(result, tuple):
        raise ProtocolError(f"expected one value, got {result!r}")
    if isinstance(result, float):
        return f"{result:g}"
    return result

