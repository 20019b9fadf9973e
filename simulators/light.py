"""The simulated light microscope: the LightMicroscope contract on the virtual specimen.

It writes only the ``_do_*`` hooks of drivers/base.py, so protocols cannot tell it from
the Micro-Manager driver. What makes it a fair test bench rather than a toy: the XY stage
lands off target (repeatability and backlash) while its encoder reports the commanded
position, the camera sits rotated on the stage, objectives are not parfocal, images are
blurred by defocus against a tilted film, fluorophores bleach where light fell, the camera
adds shot and read noise, and every move, filter change and exposure costs virtual time.

Ground truth (the true pose of each frame) stays here and in tests: ``true_pixel_to_stage``
and friends exist for tests and benchmarks, never for protocols.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.base import Channel, Image, LightMicroscope, Objective, StageLimits
from drivers.clock import Clock, VirtualClock
from drivers.errors import InvalidState
from drivers.imaging import affine_from
from simulators.light_bleach import BleachLedger
from simulators.light_camera import read_out
from simulators.light_config import TRANSMITTED, LightSimConfig
from simulators.light_render import Optics, View, render_frame
from simulators.specimen import Specimen

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FrameTruth:
    """What one acquired frame really showed (simulator and tests only)."""

    view: View
    objective: str
    channel: str
    exposure_s: float


class SimulatedLightMicroscope(LightMicroscope):
    """A widefield microscope with 20x and 100x objectives over a ``Specimen``.

    Parameters
    ----------
    specimen : the virtual grid (its ``truth`` places it on this stage).
    clock : the only source of time; every move and exposure sleeps on it.
    config : a validated ``LightSimConfig`` (default: the AutoCLEM instrument).
    seed : makes stage errors and camera noise reproducible: the same seed and the same
        sequence of calls give identical images.
    """

    def __init__(self, specimen: Specimen, clock: Clock, config: LightSimConfig | None = None,
                 *, seed: int = 0) -> None:
        cfg = config if config is not None else LightSimConfig.build()
        objectives = [Objective(name, o.magnification, o.numerical_aperture, o.pixel_size_um,
                                o.rotation_deg, o.mirror) for name, o in cfg.objectives.items()]
        objectives.sort(key=lambda o: o.name != cfg.start_objective)
        channels = [Channel(name, c.exposure_s, c.excitation_nm)
                    for name, c in cfg.channels.items()]
        channels.sort(key=lambda c: c.name != cfg.start_channel)
        super().__init__(objectives=objectives, channels=channels, clock=clock,
                         limits=StageLimits.symmetric(cfg.stage.xy_limit_um,
                                                      cfg.stage.z_limit_um, "lm"))
        self.specimen = specimen
        self.config = cfg
        self.seed = int(seed)
        self._stage_rng = np.random.default_rng([self.seed, 1])
        self._cmd_xy = np.zeros(2)
        self._true_xy = np.zeros(2)
        self._approach = np.zeros(2)          # sign of the last move per axis (backlash)
        self._cmd_z = 0.0
        self._true_z = 0.0
        self._bleach = BleachLedger()
        self._frames: dict[int, FrameTruth] = {}
        self._last_frame_id = -1
        self._closed = False

    @classmethod
    def with_small_camera(cls, specimen: Specimen | None = None, clock: Clock | None = None, *,
                          shape: tuple[int, int] = (256, 256), seed: int = 0,
                          exact_stage: bool = False, **config: Any) -> SimulatedLightMicroscope:
        """A microscope with a small camera for fast tests (``config`` deep-merges)."""
        spec = specimen if specimen is not None else Specimen.generate(seed=seed)
        cfg = LightSimConfig.build(**{"camera": {"shape": shape},
                                      "stage": {"exact": exact_stage}, **config})
        return cls(spec, clock if clock is not None else VirtualClock(), cfg, seed=seed)

    # -- ground truth (tests and benchmarks only) ---------------------------------------------

    def frame_truth(self, image: Image) -> FrameTruth:
        try:
            return self._frames[int(image.extra["frame_id"])]
        except KeyError as err:
            raise InvalidState("image was not acquired by this simulator") from err

    def true_pixel_to_stage(self, image: Image) -> NDArray[np.float64]:
        """The 2x3 affine that really maps this image's pixels to LM stage micrometres."""
        return self.frame_truth(image).view.pixel_to_stage.copy()

    def true_pixel_to_grid(self, image: Image) -> NDArray[np.float64]:
        return self.frame_truth(image).view.pixel_to_grid.copy()

    def true_xy(self) -> tuple[float, float]:
        """Where the stage really is (the encoder reports the commanded position)."""
        return float(self._true_xy[0]), float(self._true_xy[1])

    def focus_z_for(self, lm_xy: tuple[float, float], height_um: float = 0.0,
                    objective: str | None = None) -> float:
        """Focus-drive reading that brings height ``height_um`` above the film at stage
        ``lm_xy`` into focus with ``objective`` (default: the current one)."""
        obj = self.config.objectives[objective or self.objective.name]
        film = float(self.specimen.truth.lm_focus.height(np.asarray(lm_xy, dtype=float)))
        return film + height_um + obj.parfocal_offset_um

    # -- hooks: stage ---------------------------------------------------------------------

    def _do_move_xy(self, x_um: float, y_um: float) -> None:
        target = np.array([x_um, y_um])
        delta = target - self._cmd_xy
        if not delta.any():
            return
        t = self.config.timing
        self.clock.sleep(t.xy_settle_s + float(np.abs(delta).max()) / t.xy_speed_um_s)
        st = self.config.stage
        self._cmd_xy = target
        if st.exact:
            self._true_xy = target.copy()
            return
        self._approach = np.where(delta != 0, np.sign(delta), self._approach)
        self._true_xy = (target - self._approach * st.backlash_um / 2
                         + self._stage_rng.normal(0.0, st.repeatability_um, size=2))

    def _do_get_xy(self) -> tuple[float, float]:
        return float(self._cmd_xy[0]), float(self._cmd_xy[1])

    def _do_move_z(self, z_um: float) -> None:
        delta = z_um - self._cmd_z
        if delta == 0:
            return
        t = self.config.timing
        self.clock.sleep(t.z_settle_s + abs(delta) / t.z_speed_um_s)
        self._cmd_z = z_um
        err = 0.0 if self.config.stage.exact else self._stage_rng.normal(
            0.0, self.config.stage.z_repeatability_um)
        self._true_z = z_um + err

    def _do_get_z(self) -> float:
        return self._cmd_z

    # -- hooks: optics ----------------------------------------------------------------------

    def _do_set_objective(self, objective: Objective) -> None:
        _log.info("lm_sim.objective", objective=objective.name)
        self.clock.sleep(self.config.timing.objective_change_s)

    def _do_set_channel(self, channel: Channel) -> None:
        self.clock.sleep(self.config.timing.channel_change_s)

    def _do_camera_shape(self) -> tuple[int, int]:
        h, w = self.config.camera.shape
        return int(h), int(w)

    # -- hooks: acquisition -----------------------------------------------------------------

    def current_view(self) -> View:
        """The true geometry the camera sees now (simulator, tests and benchmarks only)."""
        obj = self.objective
        ocfg = self.config.objectives[obj.name]
        shape = self._do_camera_shape()
        to_stage = affine_from(obj.pixel_size_um, obj.rotation_deg,
                               (float(self._true_xy[0]), float(self._true_xy[1])), shape,
                               obj.mirror)
        truth = self.specimen.truth
        origin = truth.lm_stage_to_grid(to_stage[:, 2])
        ex = truth.lm_stage_to_grid(to_stage[:, 2] + to_stage[:, 0]) - origin
        ey = truth.lm_stage_to_grid(to_stage[:, 2] + to_stage[:, 1]) - origin
        to_grid = np.column_stack([ex, ey, origin])
        return View(pixel_to_grid=to_grid, pixel_to_stage=to_stage, shape=shape,
                    focal_plane_um=self._true_z - ocfg.parfocal_offset_um,
                    time_s=self.clock.now())

    def render_expected(self, channel: str, exposure_s: float,
                        view: View | None = None) -> NDArray[np.float32]:
        """Noise-free expected photo-electrons of a frame here (benchmarks, tests)."""
        ocfg = self.config.objectives[self.objective.name]
        optics = Optics(ocfg.magnification, ocfg.numerical_aperture, ocfg.immersion_index,
                        ocfg.pixel_size_um)
        return render_frame(self.specimen, view or self.current_view(), optics,
                            self.config.channels[channel], exposure_s, self._bleach,
                            self.config.dic_shear_deg, self.config.camera.vignetting)

    def _do_snap(self, channel: Channel, exposure_s: float) -> NDArray[Any]:
        if self._closed:
            raise InvalidState("simulated light microscope is closed")
        # The frame is rendered inside the exposure and readout it models, and the camera
        # delivers it when they end: rendering is the hardware's time, not the caller's
        # (``uncounted``), and on a real-time clock only the remainder is slept.
        with self.clock.uncounted():
            start = self.clock.now()
            view = self.current_view()
            frame_id = len(self._frames)
            data = self._expose(channel.name, exposure_s, view, frame_id)
            cam = self.config.camera
            self.clock.sleep_until(start + exposure_s + cam.shape[0] * cam.line_time_s)
        self._frames[frame_id] = FrameTruth(view, self.objective.name, channel.name, exposure_s)
        self._last_frame_id = frame_id
        return data

    def _expose(self, channel: str, exposure_s: float, view: View, frame_id: int
                ) -> NDArray[np.uint16]:
        """Render, read out and bleach one frame; its temporaries (tens of MB for a large
        camera) are freed on return, inside the caller's exposure."""
        electrons = self.render_expected(channel, exposure_s, view)
        cam = self.config.camera
        data = read_out(electrons, read_noise_e=cam.read_noise_e, e_per_adu=cam.e_per_adu,
                        offset_adu=cam.offset_adu, full_well_e=cam.full_well_e,
                        bit_depth=cam.bit_depth,
                        rng=np.random.default_rng([self.seed, 2, frame_id]))
        ccfg = self.config.channels[channel]
        if ccfg.contrast not in TRANSMITTED:
            self._bleach.expose(ccfg.contrast, view.pixel_to_grid, view.shape, exposure_s,
                                self.objective.magnification)
        return data

    def _wrap(self, data: NDArray[Any], exposure_s: float, **extra: Any) -> Image:
        return super()._wrap(data, exposure_s, frame_id=self._last_frame_id, **extra)

    def _do_abort(self) -> None:
        # Moves and exposures complete instantly in virtual time, so nothing is in flight;
        # the base class's flag stops run_events and autofocus at their next check.
        _log.info("lm_sim.abort", frames=len(self._frames))

    def _do_close(self) -> None:
        self._closed = True


def time_render_ms(microscope: SimulatedLightMicroscope, channel: str,
                   repeats: int = 5) -> float:
    """Median wall time (ms) of one noisy frame in ``channel`` at the current pose.

    For benchmarks: construct with a 1024 x 1024 camera, set objective and position, call
    this. It times rendering and readout only (no clock, no bookkeeping).
    """
    cam = microscope.config.camera
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        e = microscope.render_expected(channel, microscope.config.channels[channel].exposure_s)
        read_out(e, read_noise_e=cam.read_noise_e, e_per_adu=cam.e_per_adu,
                 offset_adu=cam.offset_adu, full_well_e=cam.full_well_e,
                 bit_depth=cam.bit_depth, rng=np.random.default_rng(i))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


__all__ = ["FrameTruth", "SimulatedLightMicroscope", "time_render_ms"]
