"""The ``lm`` section of benchmarks/protocols.py: LM protocols on the simulated microscope.

- ``atlas``: the paper's whole-grid atlas (3.05 mm grid, 5 x 5 tiles at 20x, 10 % overlap,
  focus map) with a 1024 x 1024 camera of 0.65 um pixels (a 2k camera binned 2x), the
  simulator's stage error, camera rotation and tilted film. Error vs truth: every tile's
  placed corners against the frame's true pose (and the stage's nominal ones), and atlas
  patches against the specimen rendered through the atlas affine at bar edges. Patches that
  show a single edge (the grid's smooth outer rim, one straight bar) are left out and
  counted: they cannot measure a shift along the edge, where phase correlation returns any
  value (tens of um on the rim).
- ``time_lapse``: the paper's time-lapse (488 + 640 every 5 min for 40 min, 8 um at 1 um,
  + 405 at the end) at one position: interval drift per time point; and the same after a
  700 s outage after the third time point (late and missed points, nothing lost).

Protocol overhead (issue 5, target <= 1.05) is ``overhead`` = modelled run time / modelled
hardware time, both on a ``CriticalPathClock`` (drivers/clock.py):

- hardware time (``hardware_s``): what the instrument's waits add up to, as on the virtual
  clock: moves and settling, filter and objective changes, exposures and readout, waits
  between time points (the simulator's timing, simulators/light_config.py);
- run time (``critical_path_s``): the instrument thread's timeline, which advances by those
  waits *and* by the wall time the protocol computes on that thread between them, and which
  catches up with a background thread whenever it takes a result that thread had not
  finished yet on the modelled timeline (a job starts no earlier than it was queued). So
  compute that runs while the stage moves and the camera exposes costs nothing, as on the
  microscope, and compute the next hardware step waits for, or that comes after the last
  frame, costs its full duration. The simulator's rendering is not counted: it produces
  what the camera delivers at the end of the exposure it models.

Why this and not wall time on a real-time clock: rendering a 1024 x 1024 frame takes ~0.1 s,
five times the 20 ms exposure and readout it stands for, so a simulated microscope paced in
real time runs late by its own rendering, and background threads would get that extra time
for free. Here a background job costs its own measured duration, placed on the modelled
timeline from the moment it was queued, so the wall time the simulator spends rendering gives
it nothing. The accounting gives each thread its own core (an acquisition PC has several) and
measures compute as wall time on this machine, shared with other work and with the
simulator's own rendering: if anything it overstates compute. The simulator's rendering is
excluded by the simulator itself (``Clock.uncounted``, simulators/light.py), not by this
benchmark; the protocol runs as in the service.

``serial_overhead`` is the old figure: every thread's compute added to the hardware time as if
nothing overlapped ((hardware + compute) / hardware); its compute is measured while threads
share the cores, so it reads somewhat higher than the same work done alone.
``instrument_thread_by_step`` and ``worst_stalls`` say where the run time above the hardware
time comes from (compute on the instrument thread, and waits for background results).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drivers.clock import CriticalPathClock, ThreadTimeline
from drivers.imaging import Image, apply_affine
from protocols.lm_atlas import LMAtlasParams, LMAtlasPlan
from protocols.ome_tiff import read_ome_tiff
from protocols.overlap_registration import structure
from protocols.plan import (
    MemoryStepStore,
    Paused,
    RunControl,
    StepContext,
    run_plan,
)
from protocols.time_lapse import (
    LatePolicy,
    StagePositionUm,
    TimeLapseParams,
    TimeLapsePlan,
)
from simulators.light import SimulatedLightMicroscope
from simulators.light_config import LightSimConfig
from simulators.light_render import View
from simulators.specimen import Specimen


class TimedScope(SimulatedLightMicroscope):
    """The simulator, counting the wall time spent rendering frames (not the protocol's)."""

    render_s = 0.0

    def _do_snap(self, channel: Any, exposure_s: float) -> NDArray[Any]:
        t0 = time.perf_counter()
        try:
            return super()._do_snap(channel, exposure_s)
        finally:
            self.render_s += time.perf_counter() - t0


def _timing(clock: CriticalPathClock, start: ThreadTimeline, wall0: float, render0: float,
            lm: TimedScope) -> dict[str, float]:
    """Overheads of a run on a fresh ``clock`` since ``start`` (the instrument thread's
    account then; called on that thread at the end)."""
    main = clock.timeline()
    compute = sum(t.compute_s for t in clock.timelines().values()) - start.compute_s
    hardware = main.waited_s - start.waited_s
    critical = main.now_s - start.now_s
    return {"hardware_s": hardware, "critical_path_s": critical,
            "instrument_thread_compute_s": main.compute_s - start.compute_s,
            "stalled_s": main.stalled_s - start.stalled_s,
            "protocol_compute_s": compute, "wall_s": time.perf_counter() - wall0,
            "render_s": lm.render_s - render0,
            "overhead": critical / hardware if hardware > 0 else float("nan"),
            "serial_overhead": (hardware + compute) / hardware if hardware > 0 else float("nan")}


def _run(plan: Any, ctx: StepContext, lm: TimedScope) -> dict[str, Any]:
    """Run ``plan``; its overheads, and where the instrument thread computed or waited for
    background work, per kind of step (``focus``, ``tile``, ``stitch``) and the worst steps."""
    clock = lm.clock
    assert isinstance(clock, CriticalPathClock)
    wall0, render0 = time.perf_counter(), lm.render_s
    start = clock.timeline()
    marks: list[tuple[str, ThreadTimeline]] = []
    run_plan(plan, ctx, on_step_start=lambda step: marks.append((step.key, clock.timeline())))
    marks.append(("end", clock.timeline()))
    by_kind: dict[str, dict[str, float]] = {}
    stalls = []
    for (key, a), (_, b) in pairwise(marks):
        kind = key.rsplit("/", 1)[-1].split("-")[0]
        k = by_kind.setdefault(kind, {"compute_s": 0.0, "stalled_s": 0.0})
        k["compute_s"] += b.compute_s - a.compute_s
        k["stalled_s"] += b.stalled_s - a.stalled_s
        stalls.append((b.stalled_s - a.stalled_s, key))
    worst = sorted(stalls, reverse=True)[:3]
    return {**_timing(clock, start, wall0, render0, lm), "instrument_thread_by_step": by_kind,
            "worst_stalls": [{"step": key, "stalled_s": v} for v, key in worst]}


def _corner_error(a: NDArray[np.float64], b: NDArray[np.float64], shape: tuple[int, int]
                  ) -> float:
    h, w = shape
    c = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
    return float(np.hypot(*(apply_affine(a, c) - apply_affine(b, c)).T).max())


def _two_dimensional(expected: NDArray[Any], min_ratio: float = 0.1) -> bool:
    """Whether a patch's structure fixes a shift in both directions: the smaller eigenvalue
    of its gradient structure tensor is at least ``min_ratio`` of the larger. A patch showing
    one edge (the grid's smooth outer rim, one straight bar) cannot measure the shift along
    it: phase correlation then returns any shift along the edge (tens of um on the rim)."""
    g = cv2.GaussianBlur(np.asarray(expected, np.float32), (0, 0), 1.5)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
    tensor = np.array([[np.sum(gx * gx), np.sum(gx * gy)], [np.sum(gx * gy), np.sum(gy * gy)]],
                      dtype=np.float64)
    low, high = np.linalg.eigvalsh(tensor)
    return bool(high > 0 and low / high >= min_ratio)


def _patch_errors(lm: TimedScope, spec: Specimen, atlas: Image, affine: NDArray[np.float64],
                  size: int = 128) -> tuple[list[float], int]:
    """Shifts (um) between atlas patches and the specimen rendered through the atlas affine,
    at 6 x 6 places with structure; and the number of one-edge patches left out."""
    h, w = atlas.shape
    out, one_edge = [], 0
    for fy in np.linspace(0.15, 0.85, 6):
        for fx in np.linspace(0.15, 0.85, 6):
            r, c = int(fy * h) - size // 2, int(fx * w) - size // 2
            patch = np.asarray(atlas.data[r:r + size, c:c + size], np.float32)
            if patch.std() < 0.1 * patch.mean():
                continue
            a = affine.copy()
            a[:, 2] = apply_affine(affine, np.array([c, r], float))
            g = spec.truth.lm_stage_to_grid(apply_affine(a, np.array([[0, 0], [1, 0], [0, 1]],
                                                                     float)))
            centre = apply_affine(a, np.array([size / 2, size / 2]))
            view = View(pixel_to_grid=np.column_stack([g[1] - g[0], g[2] - g[0], g[0]]),
                        pixel_to_stage=a, shape=(size, size),
                        focal_plane_um=float(spec.truth.lm_focus.height(centre)), time_s=0.0)
            expected = lm.render_expected("BF", 0.01, view)
            if not _two_dimensional(expected):
                one_edge += 1
                continue
            window = cv2.createHanningWindow((size, size), cv2.CV_32F)
            (dx, dy), _ = cv2.phaseCorrelate(structure(expected, 1.5), structure(patch, 1.5),
                                             window)
            out.append(float(np.hypot(dx, dy) * atlas.pixel_size_um))
    return out, one_edge


def atlas_case(seed: int) -> dict[str, Any]:
    spec = Specimen.generate(seed=seed)
    cfg = LightSimConfig.build(camera={"shape": (1024, 1024)},
                               objectives={"20x": {"pixel_size_um": 0.65}})
    lm = TimedScope(spec, CriticalPathClock(), cfg, seed=seed)
    centre = spec.truth.grid_to_lm_stage(np.zeros(2))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StepContext(clock=lm.clock, data_dir=Path(tmp), store=MemoryStepStore(), lm=lm)
        params = LMAtlasParams(centre_um=(float(centre[0]), float(centre[1])))
        timing = _run(LMAtlasPlan(params), ctx, lm)
        stitch = ctx.result("lm-atlas/stitch")
        stitched, nominal = [], []
        for key in stitch["tile_keys"]:
            tile = ctx.result(key)
            frame = tile["frames"][0]
            stub = Image(data=np.zeros((2, 2)), pixel_size_um=1.0,
                         pixel_to_stage=np.zeros((2, 3)), instrument="lm",
                         extra=dict(frame["extra"]))
            truth = lm.true_pixel_to_stage(stub)
            nominal.append(_corner_error(np.array(frame["pixel_to_stage"]), truth, (1024, 1024)))
        report = _report(ctx, stitch)
        report_tiles = {t["key"]: t for t in report["tiles"]}
        for key in stitch["tile_keys"]:
            frame = ctx.result(key)["frames"][0]
            stub = Image(data=np.zeros((2, 2)), pixel_size_um=1.0,
                         pixel_to_stage=np.zeros((2, 3)), instrument="lm",
                         extra=dict(frame["extra"]))
            stitched.append(_corner_error(np.array(report_tiles[key]["pixel_to_stage"]),
                                          lm.true_pixel_to_stage(stub), (1024, 1024)))
        atlas = next(im for im in read_ome_tiff(Path(tmp) / stitch["path"]) if im.channel == "BF")
        patches, one_edge = _patch_errors(lm, spec, atlas, np.array(stitch["pixel_to_stage"]))
        focus_err = [abs(ctx.result(k)["z_um"] - lm.focus_z_for(
            tuple(ctx.result(k)["stage_um"][:2]), objective="20x")) for k in stitch["tile_keys"]]
    return {
        "seed": seed, "tiles": len(stitched), "atlas_shape": stitch["shape"],
        "atlas_pixel_um": stitch["pixel_size_um"],
        "tile_error_um": {"max": max(stitched), "median": float(np.median(stitched))},
        "nominal_tile_error_um": {"max": max(nominal), "median": float(np.median(nominal))},
        "patch_error_um": {"max": max(patches, default=float("nan")),
                           "median": float(np.median(patches)) if patches else float("nan"),
                           "n": len(patches), "one_edge_patches_left_out": one_edge},
        "focus_error_um": {"max": max(focus_err), "median": float(np.median(focus_err))},
        "flagged_tiles": stitch["flagged_tiles"], "stitch_stats": stitch["stats"],
        "assembly": report["assembly"],
        "within_1um": max(stitched) < 1.0 and max(patches, default=0.0) < 1.0,
        **timing,
    }


def _report(ctx: StepContext, stitch: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((ctx.data_dir / stitch["report"]).read_text())
    return result


def time_lapse_case(outage_s: float, policy: LatePolicy) -> dict[str, Any]:
    spec = Specimen.generate(seed=3)
    lm = TimedScope(spec, CriticalPathClock(), LightSimConfig.build(camera={"shape": (512, 512)}),
                    seed=1)
    keys = np.array(spec.viruses.square_keys)
    g = spec.viruses.at(0.0)[keys == keys[0]].mean(axis=0)
    x, y = (float(v) for v in spec.truth.grid_to_lm_stage(g))
    params = TimeLapseParams(positions=(StagePositionUm(x_um=x, y_um=y),),
                             focus_centre_um=lm.focus_z_for((x, y), objective="100x") + 3.0,
                             late_policy=policy)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StepContext(clock=lm.clock, data_dir=Path(tmp), store=MemoryStepStore(), lm=lm)
        clock = lm.clock
        assert isinstance(clock, CriticalPathClock)
        wall0, render0 = time.perf_counter(), lm.render_s
        start = clock.timeline()
        control = RunControl()
        done = 0

        def on_progress(_: Any) -> None:
            nonlocal done
            done += 1
            if outage_s and done == 4:          # focus, t00, t01, t02
                control.request_pause()
        try:
            run_plan(TimeLapsePlan(params), ctx, control, on_progress=on_progress)
        except Paused:                           # the planned outage
            control.clear_pause()
            lm.clock.sleep(outage_s)
            run_plan(TimeLapsePlan(params), ctx, control)
        timing = _timing(clock, start, wall0, render0, lm)
        summary = ctx.result("timelapse/summary")
    return {"outage_s": outage_s, "late_policy": policy,
            "time_points": summary["time_points"], "acquired": summary["acquired"],
            "missed": summary["missed"], "late": summary["late"],
            "max_abs_drift_s": summary["max_abs_drift_s"],
            "mean_abs_drift_s": summary["mean_abs_drift_s"], "max_late_s": summary["max_late_s"],
            **timing}


def lm_section(seeds: int) -> dict[str, Any]:
    """LM atlas error vs truth, time-lapse drift, and protocol overhead (target <= 1.05)."""
    atlas = [atlas_case(seed) for seed in range(max(1, min(seeds, 3)))]
    lapse = [time_lapse_case(0.0, "acquire"), time_lapse_case(700.0, "acquire"),
             time_lapse_case(700.0, "skip_superseded")]
    return {
        "unit": "um, s", "criterion": "atlas within 1 um of truth; overhead <= 1.05",
        "atlas": {"summary": {
            "worst_tile_error_um": max(a["tile_error_um"]["max"] for a in atlas),
            "worst_nominal_tile_error_um": max(a["nominal_tile_error_um"]["max"] for a in atlas),
            "worst_patch_error_um": max(a["patch_error_um"]["max"] for a in atlas),
            "all_within_1um": all(a["within_1um"] for a in atlas),
            "max_overhead": max(a["overhead"] for a in atlas),
            "max_serial_overhead": max(a["serial_overhead"] for a in atlas)}, "runs": atlas},
        "time_lapse": {"summary": {
            "max_abs_drift_s_without_outage": lapse[0]["max_abs_drift_s"],
            "frames_lost_after_outage": [9 - t["acquired"] - len(t["missed"]) for t in lapse],
            "max_overhead": max(t["overhead"] for t in lapse),
            "max_serial_overhead": max(t["serial_overhead"] for t in lapse)}, "runs": lapse},
    }
