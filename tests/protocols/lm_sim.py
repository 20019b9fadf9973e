"""Helpers for the LM protocol tests: a small simulated grid, contexts, truth and interruptions.

The grids are 700 um across (a real one is 3.05 mm) so that a whole-grid atlas needs a few
tiles of a small camera; everything else (bars, pitch, cells, beads, viruses, stage error,
camera rotation, tilted film, non-parfocal objectives) is the simulator's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.clock import VirtualClock
from drivers.imaging import Image, apply_affine
from protocols.plan import (
    MemoryStepStore,
    Paused,
    Plan,
    RunControl,
    Step,
    StepContext,
    StepResult,
    run_plan,
)
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen

GRID_UM = 700.0
RIM_UM = 100.0


def small_grid(seed: int = 3, **config: Any) -> Specimen:
    values: dict[str, Any] = {"grid_diameter_um": GRID_UM, "rim_width_um": RIM_UM,
                              "cell_square_fraction": 0.6, **config}
    return Specimen.generate(seed=seed, **values)


def scope(spec: Specimen, shape: tuple[int, int], *, clock: VirtualClock | None = None,
          seed: int = 1, exact: bool = False) -> SimulatedLightMicroscope:
    return SimulatedLightMicroscope.with_small_camera(spec, clock or VirtualClock(), shape=shape,
                                                      seed=seed, exact_stage=exact)


def context(lm: SimulatedLightMicroscope, data_dir: Path,
            store: MemoryStepStore | None = None) -> StepContext:
    return StepContext(clock=lm.clock, data_dir=data_dir, store=store or MemoryStepStore(),
                       lm=lm)


def grid_centre(spec: Specimen) -> tuple[float, float]:
    c = spec.truth.grid_to_lm_stage(np.zeros(2))
    return float(c[0]), float(c[1])


def virus_site(spec: Specimen) -> tuple[float, float]:
    """LM stage position of the middle of the first square with viruses."""
    keys = np.array(spec.viruses.square_keys)
    g = spec.viruses.at(0.0)[keys == keys[0]].mean(axis=0)
    xy = spec.truth.grid_to_lm_stage(g)
    return float(xy[0]), float(xy[1])


def true_affine(lm: SimulatedLightMicroscope, frame: dict[str, Any]) -> NDArray[np.float64]:
    """The simulator's true pixel-to-stage affine of a frame recorded in a step result."""
    stub = Image(data=np.zeros((2, 2)), pixel_size_um=1.0, pixel_to_stage=np.zeros((2, 3)),
                 instrument="lm", extra=dict(frame["extra"]))
    return lm.true_pixel_to_stage(stub)


def corner_error_um(a: NDArray[np.float64], b: NDArray[np.float64],
                    shape: tuple[int, int]) -> float:
    h, w = shape
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
    return float(np.hypot(*(apply_affine(a, corners) - apply_affine(b, corners)).T).max())


class Crash(Exception):
    """Raised by ``CrashingStore`` right after a commit: the service died between steps."""


@dataclass
class CrashingStore:
    """A MemoryStepStore that 'kills the service' once, right after its n-th commit."""

    crash_after: int
    inner: MemoryStepStore = field(default_factory=MemoryStepStore)
    crashed: bool = False

    def get(self, key: str) -> StepResult | None:
        return self.inner.get(key)

    def put(self, key: str, result: StepResult) -> None:
        self.inner.put(key, result)
        if not self.crashed and len(self.inner.order) >= self.crash_after:
            self.crashed = True
            raise Crash(f"killed after committing {key}")

    @property
    def order(self) -> list[str]:
        return self.inner.order


def run_to_end(make_plan: Any, ctx: StepContext, *, pause_every: int = 0,
               downtime_s: float = 0.0, max_pauses: int | None = None) -> tuple[list[str], int]:
    """Run a plan to the end through pauses or crashes; return every step start and the
    number of interruptions (at most ``max_pauses`` pauses). ``make_plan()`` builds a fresh plan object for each attempt, as a
    restarted service would; ``downtime_s`` passes on the clock at each interruption."""
    started: list[str] = []
    interruptions = 0
    while True:
        control = RunControl()
        done_here = 0
        may_pause = max_pauses is None or interruptions < max_pauses

        def on_progress(_: Any, control: RunControl = control, may_pause: bool = may_pause
                        ) -> None:
            nonlocal done_here
            done_here += 1
            if pause_every and may_pause and done_here % pause_every == 0:
                control.request_pause()

        def on_start(step: Step) -> None:
            started.append(step.key)

        plan: Plan = make_plan()
        try:
            run_plan(plan, ctx, control, on_progress=on_progress, on_step_start=on_start)
            return started, interruptions
        except (Paused, Crash) as err:    # both mean: start again where the journal ends
            interruptions += 1
            if interruptions > 500:
                raise AssertionError("plan does not finish") from err
            ctx.clock.sleep(downtime_s)
