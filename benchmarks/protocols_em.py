"""The ``em`` section of benchmarks/protocols.py: EM protocols on the simulated TEM vs truth.

Per seed (a fresh simulated TEM: stage error 1 um rms with backlash, tilt runout, a ~7 um
eucentric error, magnification calibration errors; frames binned to 256-512 px with the real
fields of view, tests/protocols/em_sim.py):

- ``square_map``: a 4 x 4 map at 4,700x of a square without cells and of one with cells
  (cell bodies are too thick to show anything, their overlaps are blank), anchored to one
  overview at the highest magnification holding the map (580x here): worst and median
  tile-corner error against the simulator's true affines, after stitching and nominal; the
  worst over tiles placed by content, and every flagged tile (opaque, or nothing matched)
  with its true and expected error;
- ``realign``: six targets picked on a 3 x 3 map; miss (nm) of the target from the centre of a
  39,000x record before (plain stage move) and after realign (every iteration at the map's own
  View preset, the default), and for comparison after a realign whose later iterations use
  11,500x (``fine``, as before): aligning across magnifications is what limited realign;
- ``tracking``: a full bidirectional series (0 -> +60, -3 -> -60, 3 degree steps, 100 e/A^2) at
  one target with tracking (each tilt aligned to the nearest tilt and to an anchor 15 deg back
  towards 0), and one without (no eucentric step): miss per tilt (nm); the miss at 0 deg is
  realign's, the growth beyond it tracking's;
- ``focus``: for the tracked series, the true record defocus against the target (um; the
  simulator's defocus at the frame centre, which follows the height of the film point under
  the beam at tilt), how each tilt was focused (autofocus at the Focus area, the previous
  measurement, the height model), and the same error had the height model alone set the lens
  (the lens enters the defocus linearly, so this needs no second series);
- ``overhead``: for the tracked series, (modelled hardware time on the virtual clock + the
  protocol's own computing time, i.e. wall time not spent inside the simulator) / modelled
  hardware time. Also the hardware time a bare series would need (tilt moves and records
  only), to show what tracking shots, eucentric and realign cost.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from em_sim import (
    FINE_MAG_INDEX,
    LOW_DOSE,
    MappedSquare,
    context,
    em_xy,
    good_squares,
    miss_nm,
    tile_errors_um,
)

from drivers.base import AcquisitionSettings, Image, LowDoseArea, Magnification
from drivers.clock import VirtualClock
from protocols.em_acquire import load_frame
from protocols.em_focus import model_correction
from protocols.em_montage import map_image
from protocols.em_params import SettingsOverride
from protocols.plan import run_plan
from protocols.realign import RealignParams, realign
from protocols.square_map import SquareMapParams, SquareMapPlan, map_key
from protocols.tilt_series import TiltSeriesParams, TiltSeriesPlan, tilt_key
from simulators.electron import SimulatedElectronMicroscope
from simulators.specimen import Specimen

FINE = SettingsOverride(mag_index=FINE_MAG_INDEX, dose_rate_e_per_a2_s=0.1,
                        defocus_offset_um=-10.0)
TRACK = {"mag_index": FINE_MAG_INDEX, "dose_rate_e_per_a2_s": 1.0, "defocus_offset_um": -30.0}
OFFSETS = [(3.0, 2.0), (-4.0, 1.0), (0.0, -5.0), (6.0, 6.0), (-7.0, -3.0), (8.0, -8.0)]


class TimedEM(SimulatedElectronMicroscope):
    """The simulator, counting the wall time spent inside its hooks (rendering, bookkeeping),
    so that the rest of a run's wall time is the protocol's own computing."""

    inside_s = 0.0

    def _timed(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.inside_s += time.perf_counter() - t0

    def _do_acquire(self, area: LowDoseArea, settings: AcquisitionSettings) -> Image:
        out: Image = self._timed(super()._do_acquire, area, settings)
        return out

    def _do_autofocus(self, area: LowDoseArea, settings: AcquisitionSettings) -> float:
        out: float = self._timed(super()._do_autofocus, area, settings)
        return out

    def _do_move_stage(self, x_um: float, y_um: float, z_um: float | None) -> None:
        self._timed(super()._do_move_stage, x_um, y_um, z_um)

    def _do_tilt_to(self, tilt_deg: float) -> None:
        self._timed(super()._do_tilt_to, tilt_deg)

    def _do_set_mag(self, mag: Magnification) -> None:
        self._timed(super()._do_set_mag, mag)


def _em(spec: Specimen, seed: int) -> TimedEM:
    em = TimedEM.for_tests(spec, VirtualClock(), camera=(4096, 4096), seed=seed, low_dose=LOW_DOSE)
    assert isinstance(em, TimedEM)
    return em


def _square_map(spec: Specimen, seed: int, cells: bool) -> dict[str, Any]:
    em = _em(spec, seed)
    square = good_squares(spec, cells=cells)[seed % 5]
    c = em_xy(spec, square.centre_um)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ctx = context(em, d)
        t0 = time.perf_counter()
        run_plan(SquareMapPlan(SquareMapParams(squares=({"id": "b", "x_um": c[0], "y_um": c[1]},),
                                               tiles_xy=(4, 4))), ctx)
        wall = time.perf_counter() - t0
        res = ctx.result(map_key("b"))
        side = json.loads((d / res["json"]).read_text())
        tiles = [load_frame(d, ctx.result(f"square-b/map/tile-{k:03d}")) for k in range(16)]
        placed = []
        for tile, corr in zip(tiles, side["tile_corrections_um"], strict=True):
            a = tile.pixel_to_stage.copy()
            a[:, 2] += corr
            placed.append(a)
        err = tile_errors_um(em, tiles, placed)
        nom = tile_errors_um(em, tiles, [t.pixel_to_stage for t in tiles])
    flagged = {f["index"]: f for f in res["flagged_tiles"]}
    by_content = [float(e) for k, e in enumerate(err) if k not in flagged]
    return {"square": square.key, "cells": cells, "tile_error_um": {
        "max": float(err.max()), "median": float(np.median(err))},
        "placed_by_content_max_um": max(by_content, default=float("nan")),
        "nominal_tile_error_um": {"max": float(nom.max()), "median": float(np.median(nom))},
        "within_1um": bool(err.max() < 1.0), "flagged_tiles": len(flagged),
        "flagged": [{"index": k, "error_um": round(float(err[k]), 3),
                     "expected_error_um": f["expected_error_um"],
                     "reason": f["reason"].split(":")[0]} for k, f in flagged.items()],
        "overview": res["overview"], "wall_s": round(wall, 2)}


def _realign(spec: Specimen, seed: int, d: Path) -> dict[str, Any]:
    em = _em(spec, seed)
    mapped = MappedSquare(em, spec, d, square=seed % 5)
    reference = map_image(mapped.result, d)
    before, after, estimate, with_fine = [], [], [], []
    for k, offset in enumerate(OFFSETS):
        nominal, truth = mapped.target(offset)
        em.set_image_shift(0.0, 0.0)
        em.move_stage(nominal[0] - 40 + 10 * k, nominal[1] + 30)
        em.move_stage(*nominal)
        before.append(miss_nm(em, em.acquire(LowDoseArea.RECORD), truth))
        res = realign(em, (float(nominal[0]), float(nominal[1])), reference, RealignParams())
        after.append(miss_nm(em, em.acquire(LowDoseArea.RECORD), truth))
        estimate.append(None if res.residual_um is None else res.residual_um * 1e3)
        # the same target realigned again (fresh approach), later iterations at 11,500x
        realign(em, (float(nominal[0]), float(nominal[1])), reference, RealignParams(fine=FINE))
        with_fine.append(miss_nm(em, em.acquire(LowDoseArea.RECORD), truth))
    return {"miss_before_nm": [round(v, 1) for v in before],
            "miss_after_nm": [round(v, 1) for v in after],
            "residual_estimate_nm": [None if v is None else round(v, 1) for v in estimate],
            "median_nm": float(np.median(after)), "max_nm": float(max(after)),
            "miss_after_with_fine_11500x_nm": [round(v, 1) for v in with_fine]}


def _series(spec: Specimen, seed: int, d: Path, tracking: bool) -> dict[str, Any]:
    em = _em(spec, seed)
    mapped = MappedSquare(em, spec, d, square=seed % 5)
    nominal, truth = mapped.target((3.0, 2.0))
    params = TiltSeriesParams.model_validate({
        "targets": [{"id": "t", "x_um": float(nominal[0]), "y_um": float(nominal[1]),
                     "square_id": "m"}],
        "track_settings": TRACK, "tracking": tracking,
        "eucentric": {} if tracking else None})
    plan = TiltSeriesPlan(params)
    ctx = context(em, d, mapped.store)
    em.inside_s = 0.0
    v0, t0 = em.clock.now(), time.perf_counter()
    run_plan(plan, ctx)
    wall, hardware = time.perf_counter() - t0, em.clock.now() - v0
    compute = wall - em.inside_s
    miss, focus_err, model_err, methods = {}, [], [], {}
    for step in plan.tilts.steps:
        res = ctx.result(tilt_key("t", step.tilt_deg))
        img = load_frame(d, res["record"])
        miss[f"{step.tilt_deg:+.0f}"] = round(miss_nm(em, img, truth), 1)
        true_defocus = em.frame_record(img).defocus_um
        focus_err.append(true_defocus - params.target_defocus_um)
        method = res["focus"]["method"]
        methods[method] = methods.get(method, 0) + 1
        # the height model's correction (0 until 3 tilts are done), as the protocol computes it
        model_corr = (model_correction(res["model"]["b"], res["model"]["c"], step.tilt_deg)
                      if step.index >= 3 else 0.0)
        model_err.append(focus_err[-1] - res["focus"]["correction_um"] + model_corr)
    t = em.config.timing
    record = em.low_dose[LowDoseArea.RECORD]
    n = len(plan.tilts.steps)
    readout = t.readout_base_s + t.readout_s_per_mpix * 4096 * 4096 / 1e6
    exposure = 100.0 / n / record.dose_rate_e_per_a2_s
    angles = [0.0, *(s.tilt_deg for s in plan.tilts.steps)]
    travel = sum(abs(b - a) for a, b in itertools.pairwise(angles))
    bare = n * (exposure + readout) + (n - 1) * t.tilt_settle_s + travel / t.tilt_speed_deg_s
    out: dict[str, Any] = {"miss_per_tilt_nm": miss, "max_nm": max(miss.values()),
                           "median_nm": float(np.median(list(miss.values()))),
                           "growth_beyond_0deg_nm": round(max(abs(v - miss["+0"])
                                                              for v in miss.values()), 1)}
    if tracking:
        out["focus"] = {
            "methods": methods,
            "record_defocus_error_um": {"max": round(float(np.max(np.abs(focus_err))), 3),
                                        "median": round(float(np.median(np.abs(focus_err))), 3)},
            "height_model_only_error_um": {
                "max": round(float(np.max(np.abs(model_err))), 3),
                "median": round(float(np.median(np.abs(model_err))), 3)}}
    if tracking:
        out["overhead"] = {"hardware_s": round(hardware, 1), "compute_s": round(compute, 2),
                           "ratio": round((hardware + compute) / hardware, 4),
                           "bare_series_hardware_s": round(bare, 1),
                           "hardware_vs_bare": round(hardware / bare, 3)}
    return out


def em_section(seeds: int) -> dict[str, Any]:
    """EM protocols vs simulator truth, per seed, with a summary."""
    spec = Specimen.generate(seed=4)
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c:
            runs.append({
                "seed": seed,
                "square_map": [_square_map(spec, seed, False), _square_map(spec, seed, True)],
                "realign": _realign(spec, seed, Path(a)),
                "tracking_on": _series(spec, seed, Path(b), True),
                "tracking_off": _series(spec, seed, Path(c), False),
            })
    return {
        "unit": {"map": "um", "realign": "nm", "tracking": "nm"},
        "criteria": {"square map": "< 1 um everywhere", "realign": "< 100 nm at 39,000x",
                     "tracking": "< 50 nm every tilt", "overhead": "<= 1.05"},
        "unit_focus": "um",
        "summary": {
            "square_map_no_cells_worst_um": max(r["square_map"][0]["tile_error_um"]["max"]
                                                for r in runs),
            "square_map_cells_worst_um": max(r["square_map"][1]["tile_error_um"]["max"]
                                             for r in runs),
            "square_map_cells_placed_by_content_worst_um": max(
                r["square_map"][1]["placed_by_content_max_um"] for r in runs),
            "square_map_flagged_tiles": [
                [m["flagged_tiles"] for m in r["square_map"]] for r in runs],
            "realign_median_nm": float(np.median([v for r in runs
                                                  for v in r["realign"]["miss_after_nm"]])),
            "realign_max_nm": max(r["realign"]["max_nm"] for r in runs),
            "realign_with_fine_11500x_median_nm": float(np.median(
                [v for r in runs for v in r["realign"]["miss_after_with_fine_11500x_nm"]])),
            "realign_with_fine_11500x_max_nm": max(
                v for r in runs for v in r["realign"]["miss_after_with_fine_11500x_nm"]),
            "tracking_0deg_max_nm": max(r["tracking_on"]["miss_per_tilt_nm"]["+0"] for r in runs),
            "tracking_max_nm": max(r["tracking_on"]["max_nm"] for r in runs),
            "tracking_growth_beyond_0deg_max_nm": max(r["tracking_on"]["growth_beyond_0deg_nm"]
                                                      for r in runs),
            "focus_error_max_um": max(r["tracking_on"]["focus"]["record_defocus_error_um"]["max"]
                                      for r in runs),
            "focus_error_height_model_only_max_um": max(
                r["tracking_on"]["focus"]["height_model_only_error_um"]["max"] for r in runs),
            "untracked_max_nm": max(r["tracking_off"]["max_nm"] for r in runs),
            "overhead_ratio_max": max(r["tracking_on"]["overhead"]["ratio"] for r in runs),
        },
        "runs": runs,
    }
