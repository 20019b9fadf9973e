"""Simulated cryo-TEM on the virtual specimen: the ``ElectronMicroscope`` contract's twin.

It writes only the ``_do_*`` hooks of drivers/base.py (limits are checked there), on the
shared ``Specimen`` and an injected ``Clock``:

- stage X/Y/Z and tilt that report the commanded position while the specimen really sits
  off by a repeatability error and backlash (electron_stage.py);
- autofocus as SerialEM's beam-tilt pair: the true defocus error at the focus area with
  50-100 nm noise, failing on fields with nothing to correlate (electron_focus.py);
- magnification table, low-dose areas, defocus, image shift; frames rendered from the
  true pose with tilt projection, mass-thickness and phase contrast and electron counting
  noise (electron_render.py, electron_optics.py);
- dose bookkeeping per place (electron_dose.py), navigator with RealignToNavItem
  (electron_navigator.py), vacuum / column valve / dewar status with typed faults, and a
  timing model on the clock.

Ground truth (true pixel-to-stage of a frame, true stage pose, dose map) is offered for
tests and benchmarks; protocols receive this object as an ``ElectronMicroscope`` and never
call those methods.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import ArrayLike, NDArray

from drivers.base import (
    AcquisitionSettings,
    AutofocusFailed,
    AxisLimits,
    ElectronMicroscope,
    EMStatus,
    HardwareFault,
    Image,
    InvalidState,
    LowDoseArea,
    Magnification,
    NavItem,
    StageLimits,
    affine_from,
)
from drivers.clock import Clock, VirtualClock
from simulators.electron_config import ElectronSimConfig
from simulators.electron_dose import DoseLedger, Exposure
from simulators.electron_focus import judge_field, measure_error
from simulators.electron_geometry import FrameGeometry
from simulators.electron_navigator import Navigator, measure_shift
from simulators.electron_optics import PhaseContrast, electron_counts, intensity
from simulators.electron_render import SpecimenSampler
from simulators.electron_stage import StageMechanics, StageMove
from simulators.specimen import Specimen

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FrameRecord:
    """Ground truth of one acquired frame."""

    frame_id: int
    geometry: FrameGeometry
    defocus_um: float          # effective defocus at the frame centre (incl. height error)
    area: str


class SimulatedElectronMicroscope(ElectronMicroscope):
    """A 300 kV cryo-TEM with a counting camera, simulated on ``specimen``.

    ``config`` is an ``ElectronSimConfig`` or a mapping validated into one (a bad value
    raises ConfigError naming ``em.<field>``); ``seed``, if given, replaces ``config.seed``.
    The same specimen, config, seed and call sequence give the same images.
    """

    def __init__(self, specimen: Specimen, clock: Clock,
                 config: ElectronSimConfig | Mapping[str, Any] | None = None, *,
                 seed: int | None = None) -> None:
        cfg = (config if isinstance(config, ElectronSimConfig)
               else ElectronSimConfig.build(**dict(config or {})))
        if seed is not None:
            cfg = cfg.replace(seed=seed)
        st = cfg.stage
        setting_xy, setting_z = "em.stage.limits_xy_um", "em.stage.limits_z_um"
        limits = StageLimits(
            x=AxisLimits(-st.limits_xy_um, st.limits_xy_um, "stage x", setting=setting_xy),
            y=AxisLimits(-st.limits_xy_um, st.limits_xy_um, "stage y", setting=setting_xy),
            z=AxisLimits(-st.limits_z_um, st.limits_z_um, "stage z", setting=setting_z))
        tilt = AxisLimits(-st.tilt_limit_deg, st.tilt_limit_deg, "tilt", unit="deg",
                          setting="em.stage.tilt_limit_deg")
        super().__init__(
            magnifications=[m.to_magnification() for m in cfg.magnifications],
            limits=limits, tilt_limits=tilt, clock=clock,
            low_dose={LowDoseArea[k.upper()]: p.to_settings() for k, p in cfg.low_dose.items()})
        self.config = cfg
        self.specimen = specimen
        rng_stage, rng_calib = np.random.default_rng(cfg.seed).spawn(2)
        self._stage = StageMechanics(st, rng_stage)
        o = cfg.optics
        self._calibration = {
            m.index: (1.0 + float(rng_calib.normal(0, o.pixel_size_error_rms)),
                      float(rng_calib.normal(0, o.rotation_error_rms_deg)))
            for m in sorted(cfg.magnifications, key=lambda m: m.index)}
        self._lm = {m.index: m.lm for m in cfg.magnifications}
        view = cfg.low_dose.get("view")
        self._mag_index = view.mag_index if view else cfg.magnifications[0].index
        self._defocus_um = cfg.initial_defocus_um
        self._image_shift = (0.0, 0.0)
        self._valve_open = True
        self._closed = False
        self._moves = 0
        self._t0 = clock.now()
        self._frames: dict[int, FrameRecord] = {}
        self._next_frame = 1
        self._navigator = Navigator()
        self.dose = DoseLedger()
        self._sampler = SpecimenSampler(specimen, o)
        self._phase = PhaseContrast(o)
        self._lock = threading.RLock()

    @classmethod
    def for_tests(cls, specimen: Specimen, clock: Clock | None = None, *,
                  camera: tuple[int, int] = (512, 512), seed: int = 0,
                  **overrides: Any) -> SimulatedElectronMicroscope:
        """Small frames for fast tests: ``camera`` pixels, other fields as ``overrides``
        (nested models as dicts, e.g. ``stage={"repeatability_rms_um": 0}``)."""
        cfg = ElectronSimConfig().replace(camera_shape=camera, seed=seed, **overrides)
        return cls(specimen, clock or VirtualClock(), cfg)

    # ------------------------------------------------------------------ stage

    def _do_move_stage(self, x_um: float, y_um: float, z_um: float | None) -> None:
        with self._lock:
            self._check_open()
            f = self.config.faults
            if f.stage_fault_after_moves is not None and self._moves >= f.stage_fault_after_moves:
                raise HardwareFault(f"stage does not respond after {self._moves} moves "
                                    "(em.faults.stage_fault_after_moves)")
            move = self._stage.move(x_um, y_um, z_um)
            self._moves += 1
            self.clock.sleep(self._move_time(move))

    def _move_time(self, move: StageMove) -> float:
        if not move.moved:
            return 0.0
        t = self.config.timing
        xy = max(abs(move.dx_um), abs(move.dy_um)) / t.stage_speed_um_s
        return t.stage_settle_s + xy + abs(move.dz_um) / t.z_speed_um_s

    def _do_get_stage(self) -> tuple[float, float, float]:
        c = self._stage.command
        return (round(c[0], 3), round(c[1], 3), round(c[2], 3))

    def _do_tilt_to(self, tilt_deg: float) -> None:
        with self._lock:
            self._check_open()
            travelled = self._stage.tilt(tilt_deg)
            if travelled > 0:
                t = self.config.timing
                self.clock.sleep(t.tilt_settle_s + travelled / t.tilt_speed_deg_s)

    def _do_get_tilt(self) -> float:
        return self._stage.tilt_command

    # ------------------------------------------------------------------ optics

    def _do_set_mag(self, mag: Magnification) -> None:
        with self._lock:
            self._switch_mag(mag.index)

    def _switch_mag(self, index: int) -> None:
        if index == self._mag_index:
            return
        t = self.config.timing
        switch = self._lm.get(index) != self._lm.get(self._mag_index)
        self.clock.sleep(t.mag_change_s + (t.lm_sa_switch_s if switch else 0.0))
        self._mag_index = index

    def _do_get_mag_index(self) -> int:
        return self._mag_index

    def _do_set_defocus(self, defocus_um: float) -> None:
        with self._lock:
            if defocus_um != self._defocus_um:
                self.clock.sleep(self.config.timing.defocus_change_s)
            self._defocus_um = defocus_um

    def _do_get_defocus(self) -> float:
        return self._defocus_um

    def _do_set_image_shift(self, x_um: float, y_um: float) -> None:
        with self._lock:
            if (x_um, y_um) != self._image_shift:
                self.clock.sleep(self.config.timing.image_shift_settle_s)
            self._image_shift = (x_um, y_um)

    def _do_get_image_shift(self) -> tuple[float, float]:
        return self._image_shift

    # ------------------------------------------------------------------ camera

    def _do_camera_shape(self) -> tuple[int, int]:
        return self.config.camera_shape

    def _do_acquire(self, area: LowDoseArea, settings: AcquisitionSettings) -> Image:
        with self._lock:
            self._check_open()
            self._switch_mag(settings.mag_index)
            return self._expose(area, settings)

    def _expose(self, area: LowDoseArea, settings: AcquisitionSettings) -> Image:
        cfg = self.config
        mag = self.magnification(settings.mag_index)
        b = settings.binning
        h, w = self.camera_shape(b)
        frame_id = self._next_frame
        self._next_frame += 1
        geom = self._geometry(mag, b, (h, w), area)
        defocus = self._true_defocus(geom, settings)
        beam_on = self._beam_on()
        start = self.clock.now()
        px_nominal = mag.pixel_size_um * b
        if beam_on:
            maps = self._sampler.sample(geom)
            # LM mode has the objective lens off: mass-thickness contrast only
            contrast = (None if self._lm.get(mag.index) else
                        self._phase.apply(maps.phase, geom.pixel_size_um * 1e3, defocus))
            rel = intensity(maps.transmission, contrast, cfg.optics)
            electrons = settings.dose_rate_e_per_a2_s * settings.exposure_s * (px_nominal * 1e4) ** 2
            rng = np.random.default_rng([cfg.seed, 7, frame_id])
            data = electron_counts(rel, electrons, rng)
        else:
            data = np.zeros((h, w), np.uint16)
        self.clock.sleep(settings.exposure_s + self._readout_s())
        dose = settings.dose_rate_e_per_a2_s * settings.exposure_s if beam_on else 0.0
        corners = geom.footprint_um()
        self.dose.record(Exposure(frame_id=frame_id, area=area.value, dose_e_per_a2=dose,
                                  time_s=start, corners_stage_um=corners,
                                  corners_grid_um=self.specimen.truth.em_stage_to_grid(corners)))
        self._frames[frame_id] = FrameRecord(frame_id, geom, defocus, area.value)
        x, y, z = self._do_get_stage()
        sx, sy = geom.beam_offset_um
        log.debug("em.acquire", frame_id=frame_id, area=area.name, mag_index=mag.index,
                  binning=b, dose_e_per_a2=dose, beam_on=beam_on)
        return Image(
            data=data, pixel_size_um=px_nominal,
            pixel_to_stage=affine_from(px_nominal, mag.rotation_deg, (x + sx, y + sy), (h, w)),
            instrument="em", stage_um=(x, y, z), time_s=start, exposure_s=settings.exposure_s,
            magnification=mag.magnification, mag_index=mag.index, binning=b,
            tilt_deg=self._stage.tilt_command, defocus_um=self._defocus_um + settings.defocus_offset_um,
            dose_e_per_a2=dose, low_dose_area=area.value,
            extra={"frame_id": frame_id, "image_shift_um": self._image_shift,
                   "beam_on": beam_on, "counting_mode": True,
                   "saturated_fraction": float(np.mean(data == 65535))})

    def _readout_s(self) -> float:
        """Camera readout of one frame (the whole chip is read whatever the binning)."""
        t, (h, w) = self.config.timing, self.config.camera_shape
        return t.readout_base_s + t.readout_s_per_mpix * h * w / 1e6

    def _true_defocus(self, geom: FrameGeometry, settings: AcquisitionSettings) -> float:
        """Effective defocus (um, negative = underfocus) at the frame centre: the lens and the
        area's offset, less the height of the film point there along the optical axis.

        That height is the film's eucentric error ``dz`` and its offset ``d`` from the stage
        position rotated about the tilt axis, ``dz cos t - (d.v) sin t`` (the rotation
        ``FrameGeometry.project`` uses): a point beside the axis rises or sinks as the stage
        tilts, so the defocus of a target reached by image shift changes with tilt."""
        centre = geom.unproject_film(np.array([geom.beam_offset_um]))[0]
        dz = float(self.specimen.truth.em_height.height(centre)) - geom.stage_z_um
        _, v = geom.axes
        across = float((centre - np.asarray(geom.stage_xy_um)) @ v)
        t = math.radians(geom.tilt_deg)
        return (self._defocus_um + settings.defocus_offset_um
                - (dz * math.cos(t) - across * math.sin(t)))

    # ------------------------------------------------------------------ autofocus

    def _do_autofocus(self, area: LowDoseArea, settings: AcquisitionSettings) -> float:
        """Two (or three) beam-tilted shots at ``area``: clock and dose as for any shot, then
        the true error with the noise the field allows (electron_focus.py)."""
        with self._lock:
            self._check_open()
            self._switch_mag(settings.mag_index)
            cfg, model = self.config, self.config.autofocus
            mag = self.magnification(settings.mag_index)
            geom = self._geometry(mag, settings.binning, self.camera_shape(settings.binning),
                                  area)
            error = self._true_defocus(geom, settings) - (self._defocus_um
                                                          + settings.defocus_offset_um)
            beam_on = self._beam_on()
            dose = settings.dose_rate_e_per_a2_s * settings.exposure_s if beam_on else 0.0
            corners = geom.footprint_um()
            grid = self.specimen.truth.em_stage_to_grid(corners)
            first = self._next_frame
            for _ in range(model.shots):
                start = self.clock.now()
                self.clock.sleep(model.beam_tilt_settle_s + settings.exposure_s
                                 + self._readout_s())
                self.dose.record(Exposure(frame_id=self._next_frame, area=area.value,
                                          dose_e_per_a2=dose, time_s=start,
                                          corners_stage_um=corners, corners_grid_um=grid))
                self._next_frame += 1
            x, y, _ = self._do_get_stage()
            where = f"{area.name} area, stage ({x:.2f}, {y:.2f}) um"
            if not beam_on:
                raise AutofocusFailed(f"autofocus failed at {where}: no beam (column valves "
                                      f"closed)")
            field = judge_field(self._sampler.sample(geom))
            rng = np.random.default_rng([cfg.seed, 11, first])
            measured = measure_error(field, error, model, rng, where)
            log.debug("em.autofocus", area=area.name, true_error_um=round(error, 4),
                      measured_um=round(measured, 4), contrast=round(field.contrast, 4),
                      dose_e_per_a2=dose * model.shots)
            return measured

    def _geometry(self, mag: Magnification, binning: int, shape: tuple[int, int],
                  area: LowDoseArea) -> FrameGeometry:
        st = self.config.stage
        scale, rot_err = self._calibration[mag.index]
        preset = self.config.area_preset(area)
        offset = preset.axis_offset_um if preset is not None else 0.0
        a = math.radians(st.tilt_axis_deg)
        x, y, z = self._stage.true_xyz
        return FrameGeometry(
            shape=shape, pixel_size_um=mag.pixel_size_um * binning * scale,
            rotation_deg=mag.rotation_deg + rot_err, stage_xy_um=(x, y), stage_z_um=z,
            tilt_deg=self._stage.true_tilt_deg, axis_deg=st.tilt_axis_deg,
            beam_offset_um=(self._image_shift[0] + offset * math.cos(a),
                            self._image_shift[1] + offset * math.sin(a)),
            height=self.specimen.truth.em_height)

    # ------------------------------------------------------------------ navigator

    def _do_nav_items(self) -> list[NavItem]:
        return self._navigator.items()

    def _do_add_nav_point(self, x_um: float, y_um: float, z_um: float, label: str, note: str,
                          acquire: bool) -> NavItem:
        return self._navigator.add((x_um, y_um, z_um), kind="point", label=label, note=note,
                                   acquire=acquire)

    def add_nav_map(self, image: Image, *, label: str = "", note: str = "") -> NavItem:
        """Make ``image`` a map item at the stage position it was taken (SerialEM NewMap)."""
        if image.instrument != "em" or image.mag_index not in self.magnifications:
            raise InvalidState("a navigator map needs an EM image from this microscope")
        return self._navigator.add(image.stage_um, kind="map", label=label, note=note,
                                   map_image=image)

    def add_nav_point_on_map(self, map_item_id: int, x_um: float, y_um: float,
                             z_um: float = 0.0, *, label: str = "", note: str = "",
                             acquire: bool = False) -> NavItem:
        """Add a point drawn on a map item, so that realign_to_item can use that map."""
        self.limits.check_xy(x_um, y_um)
        parent = self._navigator.get(map_item_id)
        if parent.map_image is None:
            raise InvalidState(f"navigator item {map_item_id} is not a map")
        return self._navigator.add((float(x_um), float(y_um), float(z_um)), kind="point",
                                   label=label, note=note, acquire=acquire,
                                   map_image=parent.map_image)

    def _do_realign_to_item(self, item_id: int) -> tuple[float, float]:
        """Move to the item; with a map, image at the map's settings, correlate, and
        correct with image shift. Returns the image shift applied (um)."""
        item = self._navigator.get(item_id)
        self.set_image_shift(0.0, 0.0)
        self.move_stage(item.stage_um[0], item.stage_um[1])
        ref = item.map_image
        if ref is None or ref.mag_index is None:
            return (0.0, 0.0)
        area = LowDoseArea(ref.low_dose_area) if ref.low_dose_area else LowDoseArea.VIEW
        settings = self.low_dose.get(area)
        if settings is None or settings.mag_index != ref.mag_index or \
                settings.binning != ref.binning:
            # not taken in a configured low-dose area: repeat the map's own conditions
            exposure = ref.exposure_s if ref.exposure_s else 1.0
            defocus = self._defocus_um if ref.defocus_um is None else ref.defocus_um
            settings = AcquisitionSettings(
                mag_index=ref.mag_index, exposure_s=exposure, binning=ref.binning,
                dose_rate_e_per_a2_s=ref.dose_e_per_a2 / exposure,
                defocus_offset_um=defocus - self._defocus_um)
        self._check_abort()
        with self._lock:
            self._switch_mag(settings.mag_index)
            image = self._expose(area, settings)
        shift = measure_shift(ref, image)
        self.set_image_shift(*shift.stage_um)
        log.info("em.realign", item_id=item_id, shift_um=shift.stage_um, score=shift.score)
        return shift.stage_um

    # ------------------------------------------------------------------ status

    def _do_status(self) -> EMStatus:
        f = self.config.faults
        elapsed = self.clock.now() - self._t0
        vacuum = f.vacuum_fault_after_s is None or elapsed < f.vacuum_fault_after_s
        filling = (f.dewar_fill_period_s is not None and
                   elapsed % f.dewar_fill_period_s
                   >= f.dewar_fill_period_s - f.dewar_fill_duration_s)
        return EMStatus(vacuum_ok=vacuum, column_valve_open=self._valve_open and vacuum,
                        high_voltage_kv=self.config.optics.high_voltage_kv,
                        dewar_filling=filling)

    def set_column_valve(self, open_: bool) -> None:
        """Open or close the column valves; with them closed frames are dark and dose-free."""
        self._valve_open = bool(open_)

    def _beam_on(self) -> bool:
        return self._do_status().column_valve_open

    def _do_close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidState("simulated electron microscope is closed")

    # ------------------------------------------------------------------ ground truth

    def frame_record(self, image: Image) -> FrameRecord:
        """Ground truth of a frame this microscope acquired (tests only)."""
        frame_id = image.extra.get("frame_id")
        if frame_id not in self._frames:
            raise InvalidState(f"image has no frame_id of this microscope ({frame_id!r})")
        return self._frames[frame_id]

    def true_pixel_to_stage(self, image: Image) -> NDArray[np.float64]:
        """True 2x3 pixel -> EM stage affine of a frame, for points on the film (exact at
        zero tilt; at tilt it is the foreshortened, height-shifted film mapping)."""
        return self.frame_record(image).geometry.pixel_to_stage_affine()

    def true_stage_to_pixel(self, image: Image, xy_um: ArrayLike,
                            object_height_um: ArrayLike = 0.0) -> NDArray[np.float64]:
        """Pixels where EM stage points ``object_height_um`` above the film appeared."""
        return self.frame_record(image).geometry.stage_to_pixel(xy_um, object_height_um)

    def true_stage_position(self) -> tuple[float, float, float]:
        """Where the stage really is (commanded + error + runout), um."""
        return self._stage.true_xyz

    def true_tilt(self) -> float:
        return self._stage.true_tilt_deg

    def dose_at_item(self, item_id: int) -> float:
        """Cumulative dose (e/A^2) at a navigator item's nominal stage position."""
        item = self._navigator.get(item_id)
        return float(self.dose.at_stage(np.array(item.stage_um[:2])))
