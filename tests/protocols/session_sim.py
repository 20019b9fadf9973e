"""A whole AutoCLEM session on the simulators, small enough for CI, and its ground truth.

The grid is the real 3.05 mm one (atlas registration needs the whole mesh and its finder
marks), but every camera is small and the magnifications are chosen so that few frames cover
it: the LM atlas at 5x (1.3 um pixels, 1024 px camera), the 100x field binned to 0.1 um
pixels so that one frame covers a square as the paper's 2048 px camera does, the EM atlas at
62x binned 8 (1.4 um pixels), square maps of 5 x 5 tiles at 1,600x binned 4 (27 nm pixels,
beads visible, ~115 um across), realign at the maps' preset, tilt series at the real 39,000x
binned 8. The time-lapse has
three time points 5 min apart with three planes, the tilt series five tilts from -6 to +6
degrees. Only tests and benchmarks import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_sim import FINE_MAG_INDEX, LOW_DOSE

from daemon.sim_truth import SimulatedTruthProbe
from drivers.clock import VirtualClock
from protocols.autoclem_params import AutoCLEMParams
from protocols.plan import StepContext, StepStore
from simulators.electron import SimulatedElectronMicroscope
from simulators.electron_config import mag_index_of
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen

SPECIMEN: dict[str, Any] = {"beads_per_square": (12, 24), "bead_loss": 0.2,
                            "cell_square_fraction": 0.3}
LM_OBJECTIVES = {"5x": {"magnification": 5, "numerical_aperture": 0.15, "pixel_size_um": 1.3},
                 "100x": {"pixel_size_um": 0.1}}
EM_LOW_DOSE: dict[str, Any] = {
    **LOW_DOSE,
    "search": {"mag_index": mag_index_of(62), "exposure_s": 0.5, "binning": 8,
               "dose_rate_e_per_a2_s": 0.002},
    "view": {"mag_index": mag_index_of(1600), "exposure_s": 1.0, "binning": 4,
             "dose_rate_e_per_a2_s": 0.02, "defocus_offset_um": -50.0},
}
TRACK = {"mag_index": FINE_MAG_INDEX, "dose_rate_e_per_a2_s": 1.0, "defocus_offset_um": -30.0}


def specimen(seed: int) -> Specimen:
    return Specimen.generate(seed=seed, **SPECIMEN)


def light(spec: Specimen, clock: VirtualClock, seed: int) -> SimulatedLightMicroscope:
    return SimulatedLightMicroscope.with_small_camera(spec, clock, shape=(1024, 1024), seed=seed,
                                                      objectives=LM_OBJECTIVES)


def electron(spec: Specimen, clock: VirtualClock, seed: int) -> SimulatedElectronMicroscope:
    return SimulatedElectronMicroscope.for_tests(spec, clock, camera=(4096, 4096), seed=seed,
                                                 low_dose=EM_LOW_DOSE)


def params(spec: Specimen, **changes: Any) -> AutoCLEMParams:
    """Paper defaults where the frames allow, small where time does (module docstring)."""
    centre = spec.truth.grid_to_lm_stage([0.0, 0.0])
    values: dict[str, Any] = {
        "n_squares": 2, "max_targets_per_square": 3,
        "tilt_scheme": {"kind": "bidirectional", "min_deg": -6, "max_deg": 6, "step_deg": 3},
        "lm_atlas": {"centre_um": (float(centre[0]), float(centre[1])), "objective": "5x",
                     "overlap": 0.15},
        "square_selection": {"centre_um": (float(centre[0]), float(centre[1])), "inspect": 5,
                             "inspection": {"z_range_um": 2.0, "focus_range_um": 8.0}},
        "live": {"interval_s": 300.0, "duration_s": 600.0, "z_range_um": 2.0},
        "em_atlas": {"grid_radius_um": 1650.0},
        "square_maps": {"tiles_xy": (5, 5)},
        # realign at the map's own preset every iteration (protocols/realign.py: a second look
        # at 4,700x aligned to a 1,600x map left targets 100-160 nm off where 1,600x gave 5-70)
        "tilt_series": {"track_settings": TRACK},
        **changes}
    return AutoCLEMParams.model_validate(values)


@dataclass
class World:
    """One simulated setup: specimen, both microscopes on one clock, a step context."""

    spec: Specimen
    clock: VirtualClock
    lm: SimulatedLightMicroscope
    em: SimulatedElectronMicroscope

    def context(self, data_dir: Path, store: StepStore) -> StepContext:
        probe = SimulatedTruthProbe(self.spec, self.em, self.lm)
        return StepContext(clock=self.clock, data_dir=data_dir, store=store, lm=self.lm,
                           em=self.em, params={"truth_probe": probe})


def world(spec: Specimen, *, seed: int = 1, start_s: float = 0.0) -> World:
    """Fresh instruments (as a restarted service builds them) on a clock from ``start_s``."""
    clock = VirtualClock(start_s)
    return World(spec, clock, light(spec, clock, seed), electron(spec, clock, seed + 100))
