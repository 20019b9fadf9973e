"""The device contracts every light and electron microscope backend implements.

Protocols are written only against these classes, so they run unchanged on the simulators
(simulators/) and on the real drivers (drivers/micromanager.py, drivers/serialem/). The
public methods check limits, names and state once, then call a ``_do_*`` hook that the
backend writes; a request outside the limits raises ``LimitViolation`` before anything is
sent to an instrument.

Units: micrometres for positions, degrees for tilt, seconds for time, electrons per square
ångström for dose. Defocus (``set_defocus``, ``AcquisitionSettings.defocus_offset_um``,
``Image.defocus_um``, ``autofocus``) is in micrometres with SerialEM's sign: negative is
underfocus (cryo-ET records at -2 to -8 um); ``Image.defocus_um`` is the intended defocus of
the frame, the lens setting plus its area's offset, not a measurement.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from numpy.typing import NDArray

from drivers.clock import Clock, RealClock, VirtualClock
from drivers.errors import (
    Aborted,
    AutofocusFailed,
    ClemdError,
    ConfigError,
    ConnectionLost,
    DeviceBusy,
    DeviceTimeout,
    HardwareFault,
    InvalidState,
    LimitViolation,
    ProtocolError,
)
from drivers.imaging import Image, affine_from, apply_affine, invert_affine

if TYPE_CHECKING:
    import useq

__all__ = [
    "Aborted", "AcquisitionSettings", "AutofocusFailed", "AxisLimits", "Channel", "ClemdError",
    "Clock", "ConfigError", "ConnectionLost", "DeviceBusy", "DeviceTimeout", "EMStatus",
    "ElectronMicroscope", "HardwareFault", "Image", "InvalidState", "LightMicroscope",
    "LimitViolation", "LowDoseArea", "Magnification", "NavItem", "Objective", "ProtocolError",
    "RealClock", "StageLimits", "VirtualClock", "affine_from", "apply_affine",
    "check_low_dose_presets", "focus_peak", "invert_affine",
]


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class AxisLimits:
    """Inclusive range of one axis; ``setting`` names the config key for error messages."""

    lower: float
    upper: float
    name: str
    unit: str = "um"
    setting: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)) or self.lower > self.upper:
            raise ConfigError(self.setting or self.name,
                              f"limits [{self.lower}, {self.upper}] are not a finite range")

    def check(self, value: float) -> float:
        """Return ``value`` as float, or raise LimitViolation naming value, limit and setting."""
        v = float(value)
        if not math.isfinite(v) or v < self.lower or v > self.upper:
            where = f" ({self.setting})" if self.setting else ""
            raise LimitViolation(f"{self.name} {v:g} {self.unit} outside "
                                 f"[{self.lower:g}, {self.upper:g}]{where}")
        return v

    def contains(self, value: float) -> bool:
        return math.isfinite(value) and self.lower <= value <= self.upper


@dataclass(frozen=True)
class StageLimits:
    """Travel of an XYZ stage."""

    x: AxisLimits
    y: AxisLimits
    z: AxisLimits

    @classmethod
    def symmetric(cls, xy_um: float, z_um: float, prefix: str) -> StageLimits:
        """Limits +-xy_um in X and Y and +-z_um in Z, named after config key ``prefix``."""
        return cls(
            x=AxisLimits(-xy_um, xy_um, "stage x", setting=f"{prefix}.stage_limits_um"),
            y=AxisLimits(-xy_um, xy_um, "stage y", setting=f"{prefix}.stage_limits_um"),
            z=AxisLimits(-z_um, z_um, "stage z", setting=f"{prefix}.z_limits_um"),
        )

    def check_xy(self, x_um: float, y_um: float) -> tuple[float, float]:
        return self.x.check(x_um), self.y.check(y_um)


def _positive(value: float, field_name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(field_name, f"must be a positive number, got {value!r}")


# --------------------------------------------------------------------------- light microscope


@dataclass(frozen=True)
class Objective:
    """An objective and the camera geometry it gives.

    ``rotation_deg`` and ``mirror`` describe how camera axes sit on stage axes (measured
    once per microscope; Micro-Manager's pixel-size affine holds the same information).
    """

    name: str
    magnification: float
    numerical_aperture: float
    pixel_size_um: float
    rotation_deg: float = 0.0
    mirror: bool = False

    def __post_init__(self) -> None:
        _positive(self.pixel_size_um, f"objectives.{self.name}.pixel_size_um")
        _positive(self.magnification, f"objectives.{self.name}.magnification")
        _positive(self.numerical_aperture, f"objectives.{self.name}.numerical_aperture")


@dataclass(frozen=True)
class Channel:
    """An illumination/filter preset; ``excitation_nm`` None means transmitted light."""

    name: str
    exposure_s: float
    excitation_nm: float | None = None

    def __post_init__(self) -> None:
        _positive(self.exposure_s, f"channels.{self.name}.exposure_s")


class _Abortable:
    """Abort flag shared by both contracts: set from any thread, checked between steps."""

    def __init__(self) -> None:
        self._abort = threading.Event()

    def abort(self) -> None:
        """Ask the running operation to stop at its next check; hardware is told at once."""
        self._abort.set()
        self._do_abort()

    def clear_abort(self) -> None:
        """Forget an abort that found nothing to stop.

        The runner calls this before a new step, so an abort that landed just as the
        previous step finished cannot make an unrelated step raise ``Aborted``.
        """
        self._abort.clear()

    @property
    def abort_pending(self) -> bool:
        return self._abort.is_set()

    def _do_abort(self) -> None:
        """Backend hook: stop what the instrument is doing (default: nothing to stop)."""

    def _check_abort(self) -> None:
        if self._abort.is_set():
            self._abort.clear()
            raise Aborted("aborted by request")


class LightMicroscope(_Abortable, ABC):
    """A widefield/confocal light microscope with an XY stage, focus, objectives, channels."""

    def __init__(self, *, objectives: Sequence[Objective], channels: Sequence[Channel],
                 limits: StageLimits, clock: Clock) -> None:
        super().__init__()
        if not objectives:
            raise ConfigError("lm.objectives", "at least one objective is required")
        if not channels:
            raise ConfigError("lm.channels", "at least one channel is required")
        self.objectives: Mapping[str, Objective] = {o.name: o for o in objectives}
        self.channels: Mapping[str, Channel] = {c.name: c for c in channels}
        self.limits = limits
        self.clock = clock
        self._objective = objectives[0].name
        self._channel = channels[0].name

    # -- state -----------------------------------------------------------------------------

    @property
    def objective(self) -> Objective:
        return self.objectives[self._objective]

    @property
    def channel(self) -> Channel:
        return self.channels[self._channel]

    def set_objective(self, name: str) -> None:
        if name not in self.objectives:
            raise LimitViolation(f"objective {name!r} not available (lm.objectives: "
                                 f"{sorted(self.objectives)})")
        if name != self._objective:
            self._do_set_objective(self.objectives[name])
            self._objective = name

    def set_channel(self, name: str) -> None:
        if name not in self.channels:
            raise LimitViolation(f"channel {name!r} not available (lm.channels: "
                                 f"{sorted(self.channels)})")
        if name != self._channel:
            self._do_set_channel(self.channels[name])
            self._channel = name

    def move_xy(self, x_um: float, y_um: float) -> None:
        """Move the XY stage; refused before moving if outside ``limits``."""
        x, y = self.limits.check_xy(x_um, y_um)
        self._check_abort()
        self._do_move_xy(x, y)

    def move_z(self, z_um: float) -> None:
        z = self.limits.z.check(z_um)
        self._check_abort()
        self._do_move_z(z)

    def position_xy(self) -> tuple[float, float]:
        return self._do_get_xy()

    def position_z(self) -> float:
        return self._do_get_z()

    # -- acquisition -----------------------------------------------------------------------

    def camera_shape(self) -> tuple[int, int]:
        """(height, width) of frames at the current settings."""
        return self._do_camera_shape()

    def snap(self, channel: str | None = None, exposure_s: float | None = None) -> Image:
        """Acquire one frame in ``channel`` (default: current) with its full metadata."""
        if channel is not None:
            self.set_channel(channel)
        exposure = self.channel.exposure_s if exposure_s is None else float(exposure_s)
        _positive(exposure, "exposure_s")
        self._check_abort()
        data = self._do_snap(self.channel, exposure)
        return self._wrap(data, exposure)

    def _wrap(self, data: NDArray[Any], exposure_s: float, **extra: Any) -> Image:
        obj = self.objective
        x, y = self.position_xy()
        z = self.position_z()
        h, w = data.shape
        return Image(
            data=data, pixel_size_um=obj.pixel_size_um,
            pixel_to_stage=affine_from(obj.pixel_size_um, obj.rotation_deg, (x, y), (h, w),
                                       obj.mirror),
            instrument="lm", stage_um=(x, y, z), time_s=self.clock.now(),
            channel=self.channel.name, objective=obj.name, z_um=z, exposure_s=exposure_s,
            magnification=obj.magnification, extra=dict(extra),
        )

    def validate_events(self, events: Sequence[useq.MDAEvent]) -> None:
        """Refuse a whole sequence whose channels or positions the microscope cannot do."""
        for ev in events:
            if ev.channel is not None and ev.channel.config not in self.channels:
                raise LimitViolation(f"event {dict(ev.index)}: channel {ev.channel.config!r} not "
                                     f"available (lm.channels: {sorted(self.channels)})")
            if ev.x_pos is not None or ev.y_pos is not None:
                x0, y0 = self.position_xy()
                self.limits.check_xy(x0 if ev.x_pos is None else ev.x_pos,
                                     y0 if ev.y_pos is None else ev.y_pos)
            if ev.z_pos is not None:
                self.limits.z.check(ev.z_pos)
            if ev.exposure is not None:
                _positive(ev.exposure / 1000.0, "event.exposure")

    def run_events(self, events: Iterable[useq.MDAEvent]) -> Iterator[Image]:
        """Run a multi-dimensional acquisition, yielding each image as it arrives.

        Every event is validated before the first one runs. ``min_start_time`` (seconds from
        the start, as in useq-schema) is honoured on the clock; a time point that starts late
        runs at once, and all its frames record how late it started in
        ``Image.extra["late_s"]`` (logged, never silently skipped). useq exposures are
        milliseconds; ``z_pos`` is absolute, so relative z plans need a position with z.
        """
        evs = list(events)
        self.validate_events(evs)
        self._abort.clear()
        t0 = self.clock.now()
        late_s = 0.0
        current_start: float | None = None
        for ev in evs:
            self._check_abort()
            if ev.min_start_time is not None and ev.min_start_time != current_start:
                current_start = float(ev.min_start_time)
                due = t0 + current_start
                late_s = max(0.0, self.clock.now() - due)
                self._wait_until(due)
            self.apply_event(ev)
            exposure = self.channel.exposure_s if ev.exposure is None else ev.exposure / 1000.0
            self._check_abort()
            data = self._do_snap(self.channel, exposure)
            img = self._wrap(data, exposure, late_s=late_s)
            yield replace(img, index={str(k): int(v) for k, v in ev.index.items()})

    def apply_event(self, ev: useq.MDAEvent) -> None:
        """Put stage, focus and channel where ``ev`` wants them (what it leaves unset stays)."""
        if ev.x_pos is not None or ev.y_pos is not None:
            x0, y0 = self.position_xy()
            self.move_xy(x0 if ev.x_pos is None else ev.x_pos,
                         y0 if ev.y_pos is None else ev.y_pos)
        if ev.z_pos is not None:
            self.move_z(ev.z_pos)
        if ev.channel is not None:
            self.set_channel(ev.channel.config)

    def _wait_until(self, due: float, poll_s: float = 0.2) -> None:
        """Wait on the clock until ``due`` in short slices, so an abort is not held up."""
        while self.clock.now() < due:
            self._check_abort()
            self.clock.sleep(min(poll_s, due - self.clock.now()))

    def autofocus(self, range_um: float = 10.0, step_um: float = 1.0) -> float:
        """Move focus to the sharpest plane within +-range_um/2 and return that z.

        The default works on image sharpness (normalised variance of the Laplacian) with a
        coarse scan and a parabolic refinement, so it needs no hardware autofocus; backends
        with one may override.
        """
        zs = self.focus_planes(range_um, step_um)
        scores = []
        for z in zs:
            self.move_z(float(z))
            scores.append(sharpness(self.snap().data))
        best = focus_peak(zs, scores, step_um)
        self.move_z(best)
        return best

    def focus_planes(self, range_um: float, step_um: float) -> NDArray[np.float64]:
        """The planes an autofocus scan visits: +-range_um/2 around the current z in steps,
        those within the z limits. Raises ConfigError for a bad range or step, LimitViolation
        when no plane is within the limits."""
        _positive(range_um, "autofocus.range_um")
        _positive(step_um, "autofocus.step_um")
        z0 = self.position_z()
        zs = np.arange(-range_um / 2, range_um / 2 + 1e-9, step_um) + z0
        zs = np.array([z for z in zs if self.limits.z.contains(float(z))], dtype=np.float64)
        if zs.size == 0:
            raise LimitViolation(f"autofocus range around z {z0:g} um lies outside the z limits")
        return zs

    def close(self) -> None:
        """Release the instrument; the object is unusable afterwards."""
        self._do_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------------------

    @abstractmethod
    def _do_move_xy(self, x_um: float, y_um: float) -> None: ...

    @abstractmethod
    def _do_get_xy(self) -> tuple[float, float]: ...

    @abstractmethod
    def _do_move_z(self, z_um: float) -> None: ...

    @abstractmethod
    def _do_get_z(self) -> float: ...

    @abstractmethod
    def _do_set_objective(self, objective: Objective) -> None: ...

    @abstractmethod
    def _do_set_channel(self, channel: Channel) -> None: ...

    @abstractmethod
    def _do_snap(self, channel: Channel, exposure_s: float) -> NDArray[Any]: ...

    @abstractmethod
    def _do_camera_shape(self) -> tuple[int, int]: ...

    def _do_close(self) -> None:
        """Backend hook: release resources (default: nothing)."""


def focus_peak(zs: NDArray[np.float64], scores: Sequence[float], step_um: float) -> float:
    """The sharpest plane of a scan, refined by a parabola through it and its neighbours
    (between planes: a coarse scan need not hit the focus)."""
    i = int(np.argmax(scores))
    best = float(zs[i])
    if 0 < i < len(zs) - 1:
        s0, s1, s2 = scores[i - 1], scores[i], scores[i + 1]
        denom = s0 - 2 * s1 + s2
        if denom < 0:
            best = float(zs[i] + 0.5 * step_um * (s0 - s2) / denom)
    return best


def sharpness(data: NDArray[Any]) -> float:
    """Focus score: variance of the Laplacian over the squared mean (robust to brightness)."""
    a = np.asarray(data, dtype=np.float64)
    lap = (a[1:-1, 2:] + a[1:-1, :-2] + a[2:, 1:-1] + a[:-2, 1:-1] - 4 * a[1:-1, 1:-1])
    mean = float(a.mean()) or 1.0
    return float(lap.var() / (mean * mean))


# --------------------------------------------------------------------------- electron microscope


class LowDoseArea(str, Enum):
    """SerialEM's low-dose areas; the value is the letter SerialEM uses."""

    VIEW = "V"
    FOCUS = "F"
    TRIAL = "T"
    RECORD = "R"
    SEARCH = "S"


@dataclass(frozen=True)
class Magnification:
    """One entry of the magnification table: index as SerialEM numbers it.

    ``pixel_size_um`` is the unbinned specimen pixel; ``rotation_deg`` the image-to-stage
    rotation at this magnification (it changes between LM and SA ranges on real scopes).
    """

    index: int
    magnification: float
    pixel_size_um: float
    rotation_deg: float = 0.0

    def __post_init__(self) -> None:
        _positive(self.pixel_size_um, f"em.magnifications.{self.index}.pixel_size_um")
        _positive(self.magnification, f"em.magnifications.{self.index}.magnification")


@dataclass(frozen=True)
class AcquisitionSettings:
    """What one low-dose area (or the plain camera) does: mag, exposure, binning, dose rate.

    ``defocus_offset_um`` is added to the lens defocus for shots in the area (View at
    -50 um shows beads at 4,700x); negative = more underfocus, as SerialEM's.
    """

    mag_index: int
    exposure_s: float
    binning: int = 1
    dose_rate_e_per_a2_s: float = 1.0
    defocus_offset_um: float = 0.0

    def __post_init__(self) -> None:
        _positive(self.exposure_s, "exposure_s")
        if self.binning < 1:
            raise ConfigError("binning", f"must be >= 1, got {self.binning}")
        if self.dose_rate_e_per_a2_s < 0:
            raise ConfigError("dose_rate_e_per_a2_s", "must be >= 0")


@dataclass(frozen=True)
class NavItem:
    """A navigator item as protocols need it (drivers/serialem/navigator.py has the file form)."""

    item_id: int
    label: str
    stage_um: tuple[float, float, float]
    kind: str = "point"            # point | polygon | map
    note: str = ""
    acquire: bool = False
    map_image: Image | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EMStatus:
    """Interlock state; protocols suspend when ``ready`` is false."""

    vacuum_ok: bool
    column_valve_open: bool
    high_voltage_kv: float
    dewar_filling: bool = False

    @property
    def ready(self) -> bool:
        return self.vacuum_ok and not self.dewar_filling


def check_low_dose_presets(low_dose: Mapping[str, Any], mag_indices: Iterable[int]) -> None:
    """Refuse low-dose presets keyed by an unknown area name or using a magnification index
    that is not in the table. Shared by every EM config model (real and simulated), so both
    refuse the same mistakes with the same words; raises ValueError for pydantic validators.
    """
    indices = sorted(mag_indices)
    areas = {a.name.lower() for a in LowDoseArea}
    for key, preset in low_dose.items():
        if key not in areas:
            raise ValueError(f"low_dose.{key} is not a low-dose area; use one of "
                             f"{sorted(areas)}")
        if preset.mag_index not in indices:
            raise ValueError(f"low_dose.{key}.mag_index {preset.mag_index} is not in the "
                             f"magnification table {indices}")


class ElectronMicroscope(_Abortable, ABC):
    """A (cryo-)TEM with stage, tilt, magnifications, low dose, camera and navigator."""

    #: True when ``montage`` runs as the instrument's own montage (SerialEM's ``Montage`` into
    #: a montage file, pieces read back with the stage positions SerialEM recorded) rather
    #: than the contract's tile loop. A protocol uses it to choose one montage step (one
    #: journal entry, restarted whole after a crash) over one keyed step per tile (resumed
    #: tile by tile). Either way ``montage`` returns the same unstitched tiles in the order
    #: of ``montage_positions``.
    native_montage: bool = False

    def __init__(self, *, magnifications: Sequence[Magnification], limits: StageLimits,
                 tilt_limits: AxisLimits, clock: Clock,
                 low_dose: Mapping[LowDoseArea, AcquisitionSettings]) -> None:
        super().__init__()
        if not magnifications:
            raise ConfigError("em.magnifications", "at least one magnification is required")
        self.magnifications: Mapping[int, Magnification] = {m.index: m for m in magnifications}
        self.limits = limits
        self.tilt_limits = tilt_limits
        self.clock = clock
        for area, settings in low_dose.items():
            if settings.mag_index not in self.magnifications:
                raise ConfigError(f"em.low_dose.{area.name.lower()}.mag_index",
                                  f"{settings.mag_index} not in the magnification table "
                                  f"{sorted(self.magnifications)}")
        self.low_dose: dict[LowDoseArea, AcquisitionSettings] = dict(low_dose)

    # -- checks ------------------------------------------------------------------------------

    def magnification(self, index: int) -> Magnification:
        if index not in self.magnifications:
            raise LimitViolation(f"magnification index {index} not in the table "
                                 f"(em.magnifications: {sorted(self.magnifications)})")
        return self.magnifications[index]

    # -- stage and optics --------------------------------------------------------------------

    def move_stage(self, x_um: float, y_um: float, z_um: float | None = None) -> None:
        x, y = self.limits.check_xy(x_um, y_um)
        z = None if z_um is None else self.limits.z.check(z_um)
        self._check_abort()
        self._do_move_stage(x, y, z)

    def stage_position(self) -> tuple[float, float, float]:
        return self._do_get_stage()

    def tilt_to(self, tilt_deg: float) -> None:
        t = self.tilt_limits.check(tilt_deg)
        self._check_abort()
        self._do_tilt_to(t)

    def tilt(self) -> float:
        return self._do_get_tilt()

    def set_mag_index(self, index: int) -> None:
        self._do_set_mag(self.magnification(index))

    def mag_index(self) -> int:
        return self._do_get_mag_index()

    def set_defocus(self, defocus_um: float) -> None:
        """Set the lens defocus (um, negative = underfocus, relative to eucentric focus)."""
        d = float(defocus_um)
        if not math.isfinite(d) or abs(d) > 500:
            raise LimitViolation(f"defocus {d:g} um outside [-500, 500]")
        self._do_set_defocus(d)

    def defocus(self) -> float:
        return self._do_get_defocus()

    def set_image_shift(self, x_um: float, y_um: float) -> None:
        """Shift the image by specimen micrometres (beam/image-shift coils, no stage move)."""
        for v, n in ((x_um, "x"), (y_um, "y")):
            if not math.isfinite(v) or abs(v) > 20.0:
                raise LimitViolation(f"image shift {n} {v:g} um outside [-20, 20]")
        self._do_set_image_shift(float(x_um), float(y_um))

    def image_shift(self) -> tuple[float, float]:
        return self._do_get_image_shift()

    # -- acquisition -------------------------------------------------------------------------

    def acquire(self, area: LowDoseArea = LowDoseArea.RECORD,
                settings: AcquisitionSettings | None = None) -> Image:
        """Acquire one image in low-dose ``area`` (SerialEM: View/Record/...).

        ``settings`` replaces the area's preset for this one shot (an intermediate
        magnification for realignment, a tracking shot at lower dose); the area still decides
        where the beam is (Focus and Trial sit beside the target on the tilt axis) and the
        preset in ``low_dose`` is left as it was. Checked before anything is sent: the area
        is configured, the magnification index is in the table, binning >= 1 and exposure > 0
        (LimitViolation naming the setting).
        """
        use = self._settings_for(area, settings)
        self._check_abort()
        return self._do_acquire(area, use)

    def autofocus(self, area: LowDoseArea = LowDoseArea.FOCUS, *, apply: bool = True) -> float:
        """Measure the defocus error at ``area`` and, with ``apply``, correct it.

        Why: the defocus a record really has depends on the specimen height under the beam,
        which neither the stage Z nor a height model knows to better than ~0.5 um at tilt.
        SerialEM measures it from the image displacement between beam-tilted shots
        (AutoFocus), in the Focus area beside the target so that the target is not exposed.

        Returns the error in um: the measured defocus at the area minus the defocus intended
        there (``defocus()`` + the area's ``defocus_offset_um``). Sign as SerialEM's defocus:
        negative = underfocus, so a negative error means the specimen there is more
        underfocused than the lens setting says. The error belongs to the place (its height
        against the lens scale), not to the lens: with ``apply`` the lens is changed by minus
        the error, so that the true defocus equals the one intended at the call, and
        ``defocus()`` then reads that corrected lens value; measured again, the error is the
        same. A protocol that wants defocus ``d`` at a place sets ``d - error``. Exposes the
        area (dose and time as for its shots); never the target unless ``area`` is on it.

        Raises ``AutofocusFailed`` when nothing could be measured (no contrast: an empty
        hole, a grid bar), LimitViolation if the area is not configured or the correction
        would take the defocus outside [-500, 500] um (nothing changed then).
        """
        settings = self._settings_for(area, None)
        self._check_abort()
        error = float(self._do_autofocus(area, settings))
        if not math.isfinite(error):
            raise AutofocusFailed(f"autofocus in {area.name} measured no finite defocus")
        if apply:
            self.set_defocus(self.defocus() - error)
        return error

    def _settings_for(self, area: LowDoseArea,
                      settings: AcquisitionSettings | None) -> AcquisitionSettings:
        """The settings a shot in ``area`` uses: ``settings`` checked, else the preset."""
        if area not in self.low_dose:
            raise LimitViolation(f"low-dose area {area.name} is not configured (em.low_dose)")
        if settings is None:
            return self.low_dose[area]
        self.magnification(settings.mag_index)
        if not (math.isfinite(settings.exposure_s) and settings.exposure_s > 0):
            raise LimitViolation(f"exposure {settings.exposure_s:g} s must be > 0 "
                                 f"(settings.exposure_s)")
        if int(settings.binning) != settings.binning or settings.binning < 1:
            raise LimitViolation(f"binning {settings.binning} must be an integer >= 1 "
                                 f"(settings.binning)")
        h, w = self._do_camera_shape()
        if settings.binning > min(h, w):
            raise LimitViolation(f"binning {settings.binning} exceeds the camera {(h, w)} "
                                 f"(settings.binning)")
        if not math.isfinite(settings.defocus_offset_um) or abs(settings.defocus_offset_um) > 500:
            raise LimitViolation(f"defocus offset {settings.defocus_offset_um:g} um outside "
                                 f"[-500, 500] (settings.defocus_offset_um)")
        return settings

    def montage(self, centre_um: tuple[float, float], tiles_xy: tuple[int, int],
                overlap: float = 0.2, area: LowDoseArea = LowDoseArea.VIEW,
                settings: AcquisitionSettings | None = None) -> list[Image]:
        """Acquire a tiles_xy montage around ``centre_um``; tiles come back unstitched.

        ``settings`` replaces the area's preset for every tile, as in ``acquire``. Every tile
        position is checked against the stage limits before the first move.
        """
        use = self._settings_for(area, settings)
        positions = self.check_montage(centre_um, tiles_xy, overlap, area, use)
        self._check_abort()
        return self._do_montage(positions, area, use)

    def check_montage(self, centre_um: tuple[float, float], tiles_xy: tuple[int, int],
                      overlap: float = 0.2, area: LowDoseArea = LowDoseArea.VIEW,
                      settings: AcquisitionSettings | None = None) -> list[tuple[float, float]]:
        """Everything ``montage`` would refuse, refused now without moving (a plan's
        ``validate``); returns the tile positions. Backends add their own limits through
        ``_check_montage`` (SerialEM lays its pieces out itself and has its own)."""
        nx, ny = tiles_xy
        if nx < 1 or ny < 1:
            raise LimitViolation(f"montage tiles {tiles_xy} must be >= 1 in each direction")
        if not 0.0 <= overlap < 0.9:
            raise LimitViolation(f"montage overlap {overlap} outside [0, 0.9)")
        use = self._settings_for(area, settings)
        positions = self.montage_positions(centre_um, tiles_xy, overlap, use)
        for x, y in positions:
            self.limits.check_xy(x, y)
        self._check_montage(positions, area, use)
        return positions

    def montage_positions(self, centre_um: tuple[float, float], tiles_xy: tuple[int, int],
                          overlap: float, settings: AcquisitionSettings) -> list[tuple[float, float]]:
        """Stage positions of a montage's tiles, row by row, in the camera's axes."""
        mag = self.magnification(settings.mag_index)
        h, w = self.camera_shape(settings.binning)
        px = mag.pixel_size_um * settings.binning
        step = np.array([w * px * (1 - overlap), h * px * (1 - overlap)])
        a = affine_from(1.0, mag.rotation_deg, (0.0, 0.0), (1, 1))[:, :2]
        nx, ny = tiles_xy
        out = []
        for j in range(ny):
            for i in range(nx):
                local = np.array([(i - (nx - 1) / 2) * step[0], (j - (ny - 1) / 2) * step[1]])
                d = a @ local
                out.append((float(centre_um[0] + d[0]), float(centre_um[1] + d[1])))
        return out

    def camera_shape(self, binning: int = 1) -> tuple[int, int]:
        """(height, width) of a frame at ``binning``."""
        h, w = self._do_camera_shape()
        return h // binning, w // binning

    # -- navigator ---------------------------------------------------------------------------

    def nav_items(self) -> list[NavItem]:
        return self._do_nav_items()

    def add_nav_point(self, x_um: float, y_um: float, z_um: float = 0.0, *, label: str = "",
                      note: str = "", acquire: bool = False) -> NavItem:
        """Add a point item; it must lie within stage travel (it will be driven to)."""
        self.limits.check_xy(x_um, y_um)
        return self._do_add_nav_point(float(x_um), float(y_um), float(z_um), label, note, acquire)

    def realign_to_item(self, item_id: int) -> tuple[float, float]:
        """Move to an item and realign to its map; return the residual shift applied (um)."""
        if item_id not in {i.item_id for i in self.nav_items()}:
            raise LimitViolation(f"navigator item {item_id} does not exist")
        self._check_abort()
        return self._do_realign_to_item(item_id)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> EMStatus:
        return self._do_status()

    def close(self) -> None:
        self._do_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------------------

    @abstractmethod
    def _do_move_stage(self, x_um: float, y_um: float, z_um: float | None) -> None: ...

    @abstractmethod
    def _do_get_stage(self) -> tuple[float, float, float]: ...

    @abstractmethod
    def _do_tilt_to(self, tilt_deg: float) -> None: ...

    @abstractmethod
    def _do_get_tilt(self) -> float: ...

    @abstractmethod
    def _do_set_mag(self, mag: Magnification) -> None: ...

    @abstractmethod
    def _do_get_mag_index(self) -> int: ...

    @abstractmethod
    def _do_set_defocus(self, defocus_um: float) -> None: ...

    @abstractmethod
    def _do_get_defocus(self) -> float: ...

    @abstractmethod
    def _do_set_image_shift(self, x_um: float, y_um: float) -> None: ...

    @abstractmethod
    def _do_get_image_shift(self) -> tuple[float, float]: ...

    @abstractmethod
    def _do_acquire(self, area: LowDoseArea, settings: AcquisitionSettings) -> Image: ...

    @abstractmethod
    def _do_autofocus(self, area: LowDoseArea, settings: AcquisitionSettings) -> float:
        """Measure (never change) the defocus at ``area`` with its preset ``settings``;
        return measured minus intended (lens defocus + ``settings.defocus_offset_um``), um,
        negative = more underfocused than intended. Raise AutofocusFailed when the images
        hold nothing to measure."""

    @abstractmethod
    def _do_camera_shape(self) -> tuple[int, int]: ...

    def _check_montage(self, positions: list[tuple[float, float]], area: LowDoseArea,
                       settings: AcquisitionSettings) -> None:
        """Backend limits of ``_do_montage`` (raise LimitViolation); the tile loop has none."""

    def _do_montage(self, positions: list[tuple[float, float]], area: LowDoseArea,
                    settings: AcquisitionSettings) -> list[Image]:
        """Move and acquire tile by tile, the tiles in the order of ``positions``.

        A backend with its own montage (``native_montage``) overrides this: the SerialEM
        driver runs SerialEM's ``Montage`` when a montage folder is configured and falls back
        to this loop otherwise (drivers/serialem/montage.py)."""
        tiles = []
        for i, (x, y) in enumerate(positions):
            self._check_abort()
            self.move_stage(x, y)
            img = self.acquire(area, settings)
            tiles.append(replace(img, index={"tile": i}))
        return tiles

    @abstractmethod
    def _do_nav_items(self) -> list[NavItem]: ...

    @abstractmethod
    def _do_add_nav_point(self, x_um: float, y_um: float, z_um: float, label: str, note: str,
                          acquire: bool) -> NavItem: ...

    @abstractmethod
    def _do_realign_to_item(self, item_id: int) -> tuple[float, float]: ...

    @abstractmethod
    def _do_status(self) -> EMStatus: ...

    def _do_close(self) -> None:
        """Backend hook: release resources (default: nothing)."""

