"""The light microscope through Micro-Manager, driven by pycromanager.

``MicroManagerLightMicroscope`` writes the ``_do_*`` hooks of ``LightMicroscope`` against a
Micro-Manager core (in-process pymmcore, or the facility's running Micro-Manager over the
Java bridge; see drivers/micromanager_core.py) and streams multi-dimensional acquisitions
through pycromanager's ``Acquisition`` (drivers/micromanager_stream.py), so the engine can
merge events into hardware sequences and frames reach the caller as they arrive.

Objectives and channels are Micro-Manager config-group presets named in clemd's config
(drivers/micromanager_config.py); the names are checked against the core when connecting,
and the first objective and channel are applied then, so the driver's state matches the
hardware from the start.

Locking: one re-entrant lock per core serialises clemd's calls. A streamed acquisition holds
it for its whole run on behalf of pycromanager's engine threads, which call the core
directly; ``abort()`` does not take it, because it must interrupt such a run.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from numpy.typing import NDArray

from drivers.base import Channel, LightMicroscope, Objective
from drivers.clock import Clock
from drivers.errors import Aborted, ClemdError, ConfigError, HardwareFault
from drivers.imaging import Image, affine_from
from drivers.micromanager_config import MicroManagerConfig
from drivers.micromanager_core import MMConnection, strings, unsigned_frame
from drivers.micromanager_events import PlannedEvent, plan_events, time_groups, to_pycromanager
from drivers.micromanager_stream import Frame, FrameStream

if TYPE_CHECKING:
    import useq

__all__ = ["MicroManagerLightMicroscope"]

log = structlog.get_logger(__name__)

#: Longest single Clock wait between abort checks while waiting for a time point.
_ABORT_POLL_S = 0.2


class MicroManagerLightMicroscope(LightMicroscope):
    """A light microscope whose stage, presets and camera are Micro-Manager devices.

    Build it on an open ``MMConnection`` (several drivers may share one in turn, as tests
    do), or with ``from_config()``, which also opens, owns and closes the connection. Raises
    ``ConfigError`` naming the field when a configured device, group, preset or pixel-size
    configuration does not exist in the core.
    """

    def __init__(self, config: MicroManagerConfig, connection: MMConnection, clock: Clock, *,
                 owns_connection: bool = False, prefix: str = "lm") -> None:
        self.config = config
        self._conn = connection
        self._core: Any = connection.core
        self._owns_connection = owns_connection
        self._stream: FrameStream | None = None
        with connection.lock, connection.errors("checking the configuration against the core"):
            self._xy, self._focus = self._select_devices(prefix)
            self._check_presets(prefix)
            objectives = [self._objective_from_config(name, prefix)
                          for name in config.objectives]
        self._presets = {name: (c.group, c.preset) for name, c in config.channels.items()}
        super().__init__(objectives=objectives,
                         channels=[c.to_channel(name) for name, c in config.channels.items()],
                         limits=config.stage_limits.to_limits(prefix), clock=clock)
        self._do_set_objective(self.objective)
        self._do_set_channel(self.channel)
        log.info("mm.driver.ready", objective=self.objective.name, channel=self.channel.name,
                 bridge=connection.is_bridge)

    @classmethod
    def from_config(cls, config: MicroManagerConfig, clock: Clock,
                    prefix: str = "lm") -> MicroManagerLightMicroscope:
        """Open the configured connection and a driver that closes it on ``close()``."""
        connection = MMConnection.open(config.connection)
        try:
            return cls(config, connection, clock, owns_connection=True, prefix=prefix)
        except BaseException as err:
            _close_keeping_first_error(connection.close, err)
            raise

    # -- connecting ----------------------------------------------------------------------

    def _select_devices(self, prefix: str) -> tuple[str, str]:
        core, cfg = self._core, self.config
        loaded = strings(core.get_loaded_devices())
        chosen = {"camera_device": cfg.camera_device, "xy_stage_device": cfg.xy_stage_device,
                  "focus_device": cfg.focus_device, "autofocus_device": cfg.autofocus_device}
        for key, name in chosen.items():
            if name is not None and name not in loaded:
                raise ConfigError(f"{prefix}.{key}", f"device {name!r} is not loaded in "
                                  f"Micro-Manager (loaded: {sorted(loaded)})")
        if cfg.camera_device is not None:
            core.set_camera_device(cfg.camera_device)
        if cfg.xy_stage_device is not None:
            core.set_xy_stage_device(cfg.xy_stage_device)
        if cfg.focus_device is not None:
            core.set_focus_device(cfg.focus_device)
        if cfg.autofocus_device is not None:
            core.set_auto_focus_device(cfg.autofocus_device)
        xy, focus = str(core.get_xy_stage_device()), str(core.get_focus_device())
        for key, name in (("xy_stage_device", xy), ("focus_device", focus)):
            if not name:
                raise ConfigError(f"{prefix}.{key}", "the core has no default device of this "
                                  "kind; name one")
        return xy, focus

    def _check_presets(self, prefix: str) -> None:
        core = self._core
        groups = set(strings(core.get_available_config_groups()))
        entries = [(f"objectives.{n}", o.group, o.preset) for n, o in self.config.objectives.items()]
        entries += [(f"channels.{n}", c.group, c.preset) for n, c in self.config.channels.items()]
        for where, group, preset in entries:
            if group not in groups:
                raise ConfigError(f"{prefix}.{where}.group", f"config group {group!r} does not "
                                  f"exist in Micro-Manager (groups: {sorted(groups)})")
            presets = set(strings(core.get_available_configs(group)))
            if preset not in presets:
                raise ConfigError(f"{prefix}.{where}.preset", f"preset {preset!r} is not in "
                                  f"group {group!r} (presets: {sorted(presets)})")

    def _objective_from_config(self, name: str, prefix: str) -> Objective:
        o = self.config.objectives[name]
        pixel_size = o.pixel_size_um
        if o.pixel_size_config is not None:
            available = set(strings(self._core.get_available_pixel_size_configs()))
            if o.pixel_size_config not in available:
                raise ConfigError(f"{prefix}.objectives.{name}.pixel_size_config",
                                  f"pixel-size configuration {o.pixel_size_config!r} does not "
                                  f"exist in Micro-Manager (available: {sorted(available)})")
            pixel_size = float(self._core.get_pixel_size_um_by_id(o.pixel_size_config))
        assert pixel_size is not None  # the config model requires one of the two sources
        return Objective(name=name, magnification=o.magnification,
                         numerical_aperture=o.numerical_aperture, pixel_size_um=pixel_size,
                         rotation_deg=o.rotation_deg, mirror=o.mirror)

    # -- stage ------------------------------------------------------------------------------

    def _do_move_xy(self, x_um: float, y_um: float) -> None:
        with self._conn.lock, self._conn.errors(f"moving XY stage to ({x_um:g}, {y_um:g}) um"):
            self._core.set_xy_position(self._xy, x_um, y_um)
            self._core.wait_for_device(self._xy)

    def _do_get_xy(self) -> tuple[float, float]:
        with self._conn.lock, self._conn.errors("reading the XY stage"):
            return float(self._core.get_x_position(self._xy)), \
                float(self._core.get_y_position(self._xy))

    def _do_move_z(self, z_um: float) -> None:
        with self._conn.lock, self._conn.errors(f"moving focus to {z_um:g} um"):
            self._core.set_position(self._focus, z_um)
            self._core.wait_for_device(self._focus)

    def _do_get_z(self) -> float:
        with self._conn.lock, self._conn.errors("reading the focus drive"):
            return float(self._core.get_position(self._focus))

    def _read_stage_unlocked(self) -> tuple[float, float, float]:
        """Stage read-back for the acquisition engine's thread (the run holds the lock)."""
        core = self._core
        return (float(core.get_x_position(self._xy)), float(core.get_y_position(self._xy)),
                float(core.get_position(self._focus)))

    def _set_properties_unlocked(self, properties: Sequence[tuple[str, str, str]]) -> None:
        """An event's device properties, from the engine's thread (the run holds the lock)."""
        for device, name, value in properties:
            self._core.set_property(device, name, value)

    # -- presets ----------------------------------------------------------------------------

    def _do_set_objective(self, objective: Objective) -> None:
        o = self.config.objectives[objective.name]
        with self._conn.lock, self._conn.errors(f"selecting objective {objective.name!r}"):
            self._core.set_config(o.group, o.preset)
            self._core.wait_for_config(o.group, o.preset)
            if o.pixel_size_config is not None:
                active = str(self._core.get_current_pixel_size_config())
                if active != o.pixel_size_config:
                    raise HardwareFault(
                        f"objective {objective.name!r}: Micro-Manager's active pixel-size "
                        f"configuration is {active!r}, not {o.pixel_size_config!r}; fix the "
                        f"pixel-size configuration or lm.objectives.{objective.name}")

    def _do_set_channel(self, channel: Channel) -> None:
        group, preset = self._presets[channel.name]
        with self._conn.lock, self._conn.errors(f"selecting channel {channel.name!r}"):
            self._core.set_config(group, preset)
            self._core.wait_for_config(group, preset)
            self._core.set_exposure(channel.exposure_s * 1000.0)

    # -- camera -----------------------------------------------------------------------------

    def _do_camera_shape(self) -> tuple[int, int]:
        with self._conn.lock, self._conn.errors("reading the camera size"):
            return int(self._core.get_image_height()), int(self._core.get_image_width())

    def _do_snap(self, channel: Channel, exposure_s: float) -> NDArray[Any]:
        with self._conn.lock, self._conn.errors(f"snapping in channel {channel.name!r}"):
            self._core.set_exposure(exposure_s * 1000.0)
            self._core.snap_image()
            data = self._core.get_image()
            shape = (int(self._core.get_image_height()), int(self._core.get_image_width()))
        return unsigned_frame(data, shape)

    # -- acquisition ------------------------------------------------------------------------

    def run_events(self, events: Iterable[useq.MDAEvent]) -> Generator[Image, None, None]:
        """Stream a multi-dimensional acquisition through pycromanager, frame by frame.

        As the contract says, and: events sharing a start time go to the engine together
        (it may run them as one hardware sequence); waiting for ``min_start_time`` happens on
        the Clock, in steps short enough that ``abort()`` lands within ``_ABORT_POLL_S``;
        ``reset_event_timer`` restarts the timer as useq-schema defines. Each Image carries
        the stage as read back before its exposure, and Micro-Manager's tags in
        ``extra["mm_tags"]``. Consume it on one thread and do not call the driver from the
        loop body: the run holds the core for pycromanager's engine.
        """
        evs = list(events)
        self.validate_events(evs)
        self._abort.clear()
        if not evs:
            return
        with self._conn.lock:
            planned = plan_events(evs, self.channels, self._presets, self._channel,
                                  self.position_xy())
            self._prepare_hardware(planned[0])
            prepare = None
            if any(p.properties for p in planned):
                def prepare(number: int) -> None:
                    self._set_properties_unlocked(planned[number].properties)
            stream = FrameStream(self._conn, self.clock, self._read_stage_unlocked, prepare)
            self._stream = stream
            last_channel = planned[0].channel.name if planned[0].set_channel else self._channel
            self._channel = last_channel
            try:
                for image, channel in self._run_groups(stream, planned):
                    self._channel = channel
                    yield image
            except BaseException as err:
                if isinstance(err, Aborted):
                    self._abort.clear()
                self._stream = None
                _close_keeping_first_error(stream.abort, err)
                _close_keeping_first_error(stream.close, err)
                # The engine may have switched presets past the last frame we saw.
                _close_keeping_first_error(lambda: self._do_set_channel(self.channel), err)
                raise
            self._stream = None
            stream.close()

    def _run_groups(self, stream: FrameStream,
                    planned: Sequence[PlannedEvent]) -> Iterator[tuple[Image, str]]:
        t0 = self.clock.now()
        last_channel = self._channel
        for group in time_groups(planned):
            self._check_abort()
            late_s = 0.0
            if group[0].reset_timer:
                t0 = self.clock.now()
            if group[0].min_start_time_s is not None:
                due = t0 + group[0].min_start_time_s
                late_s = max(0.0, self.clock.now() - due)
                self._wait_until(due)
            stream.submit([to_pycromanager(p) for p in group])
            timeout_s = max(p.exposure_s for p in group) + self.config.frame_timeout_s
            for frame in stream.frames(len(group), timeout_s):
                self._check_abort()
                p = planned[frame.event_number]
                if p.set_channel:
                    last_channel = p.channel.name
                lateness = late_s if p.min_start_time_s is not None else 0.0
                yield self._image(frame, p, lateness), last_channel

    def _prepare_hardware(self, first: PlannedEvent) -> None:
        """Put the hardware where the first event wants it before the engine starts.

        pycromanager's engine skips setting an exposure it believes is already in place,
        remembering the last event of the *previous* acquisition; a snap in between changes
        the camera behind its back (frames would then carry the wrong exposure, and say the
        right one). Applying the first event's whole state here means nothing depends on
        what the engine remembers.
        """
        if first.set_channel:
            self._do_set_channel(first.channel)
        with self._conn.lock, self._conn.errors("setting the exposure"):
            self._core.set_exposure(first.exposure_s * 1000.0)
        if first.x_um is not None and first.y_um is not None:
            self._do_move_xy(first.x_um, first.y_um)
        if first.z_um is not None:
            self._do_move_z(first.z_um)

    def _wait_until(self, due: float) -> None:
        while True:
            self._check_abort()
            remaining = due - self.clock.now()
            if remaining <= 0:
                return
            self.clock.sleep(min(remaining, _ABORT_POLL_S))

    def _image(self, frame: Frame, p: PlannedEvent, late_s: float) -> Image:
        obj = self.objective
        x, y, z = frame.stage_um
        exposure_ms = frame.tags.get("Exposure")
        return Image(
            data=frame.data, pixel_size_um=obj.pixel_size_um,
            pixel_to_stage=affine_from(obj.pixel_size_um, obj.rotation_deg, (x, y),
                                       frame.data.shape, obj.mirror),
            instrument="lm", stage_um=(x, y, z), time_s=frame.time_s, channel=p.channel.name,
            objective=obj.name, z_um=z,
            exposure_s=p.exposure_s if exposure_ms is None else float(exposure_ms) / 1000.0,
            magnification=obj.magnification, index=dict(p.index),
            extra={"late_s": late_s, "mm_tags": frame.tags},
        )

    # -- focus, abort, lifetime -----------------------------------------------------------

    def autofocus(self, range_um: float = 10.0, step_um: float = 1.0) -> float:
        """With ``autofocus_device`` configured, run its full focus; else clemd's search.

        The device decides where focus is; if it lands outside +-range_um/2 of the start or
        outside the z limits, focus goes back to the start and ``HardwareFault`` is raised.
        """
        if self.config.autofocus_device is None:
            return super().autofocus(range_um, step_um)
        self._check_abort()
        z0 = self.position_z()
        with self._conn.lock, self._conn.errors("running hardware autofocus"):
            self._core.full_focus()
            z = float(self._core.get_position(self._focus))
        if abs(z - z0) > range_um / 2 or not self.limits.z.contains(z):
            self._do_move_z(z0)
            raise HardwareFault(f"autofocus ({self.config.autofocus_device}) found z {z:g} um, "
                                f"outside +-{range_um / 2:g} um of {z0:g} or the z limits; "
                                f"focus restored to {z0:g} um")
        return z

    def _do_abort(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.abort()
            return
        with self._conn.errors("stopping the camera and stage"):
            if self._core.is_sequence_running():
                self._core.stop_sequence_acquisition()
            self._core.stop(self._xy)

    def _do_close(self) -> None:
        if self._owns_connection:
            self._conn.close()


def _close_keeping_first_error(cleanup: Any, first: BaseException) -> None:
    """Run ``cleanup``; if it fails too, note that on ``first`` instead of hiding it."""
    try:
        cleanup()
    except ClemdError as err:
        first.add_note(f"cleanup after this error also failed: {err!r}")
