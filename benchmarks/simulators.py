"""Benchmark of the simulated world: specimen generation and frame render times.

Prints one JSON object. Targets (issue 2): a 1024 x 1024 LM frame under 100 ms and a
2048 x 2048 EM frame under 300 ms on one core. Run from the repository root as a module so
that ``benchmarks/drivers.py`` cannot shadow the ``drivers`` package::

    taskset -c 0 .venv/bin/python -m benchmarks.simulators

CPU time is reported beside wall time: on a shared machine wall time is inflated by load.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import cv2
import numpy as np

from benchmarks import electron_render
from drivers.clock import VirtualClock
from simulators.light import SimulatedLightMicroscope, time_render_ms
from simulators.specimen import Specimen

SEEDS = (0, 1, 2, 3, 4)
LM_CHANNELS = ("BF", "DIC", "405", "488", "640")


def specimen_generation() -> dict[str, float]:
    """Seconds to generate a grid, and to build its finder-mark raster on first use."""
    gen, marks = [], []
    for seed in SEEDS:
        t0 = time.perf_counter()
        spec = Specimen.generate(seed=seed)
        gen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _ = spec.mark_raster
        marks.append(time.perf_counter() - t0)
    return {"generate_median_s": round(statistics.median(gen), 3),
            "mark_raster_median_s": round(statistics.median(marks), 3),
            "seeds": len(SEEDS)}


def light_render() -> dict[str, object]:
    """Median ms per 1024 x 1024 frame, per objective and channel, over a cell square."""
    spec = Specimen.generate(seed=0)
    lm = SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), shape=(1024, 1024))
    xy = spec.truth.grid_to_lm_stage(np.array(spec.cells[0].centre_um))
    out: dict[str, dict[str, float]] = {}
    for objective in ("20x", "100x"):
        lm.set_objective(objective)
        lm.move_xy(float(xy[0]), float(xy[1]))
        lm.move_z(lm.focus_z_for(lm.position_xy()))
        out[objective] = {}
        for ch in LM_CHANNELS:
            out[objective][ch] = round(time_render_ms(lm, ch, repeats=5), 1)
    worst = max(v for o in out.values() for v in o.values())
    return {"frame": [1024, 1024], "target_ms": 100, "worst_median_ms": worst, "ms": out}


def main(argv: list[str] | None = None) -> int:
    cv2.setNumThreads(1)
    result = {
        "benchmark": "simulators",
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "specimen": specimen_generation(),
        "light_1024": light_render(),
        "electron_2048": electron_render.measure(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
