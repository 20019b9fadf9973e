"""Atlas registration benchmark on the simulators (part of correlation.py).

Each grid: a simulated specimen (mirrored in the EM half the time, any rotations), an fLM
transmitted-light overview of the whole grid as one frame (a 5x/0.15 objective with 1.3 um
pixels on a 2400 px camera, standing in for the stitched 20x atlas) and an EM atlas as one
frame (62x, 16k camera binned 8: 1.4 um pixels, standing in for the 200x montage). Every
non-partial square centre is a point; right = mapped within half a pitch of its true EM
position. A few grids from tests/protocols/grid_render.py (another grid design and other
renderers, 5 um pixels) are judged the same way, so that a choice tuned to the simulator's
finder pattern shows up as a failure there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.base import LowDoseArea
from drivers.clock import VirtualClock
from protocols.correlation.atlas import register_atlas
from protocols.correlation.errors import CorrelationInputError
from simulators.electron import SimulatedElectronMicroscope
from simulators.electron_config import ElectronSimConfig, LowDosePreset, mag_index_of
from simulators.light import SimulatedLightMicroscope
from simulators.light_config import LightSimConfig
from simulators.specimen import Specimen


def _to_px(a: NDArray[np.float64], q: NDArray[np.float64]) -> NDArray[np.float64]:
    return (q - a[:, 2]) @ np.linalg.inv(a[:, :2]).T


@dataclass(frozen=True)
class AtlasCase:
    """One rendered grid: both overviews, pixel sizes, and the true square centres in each
    image's pixels (every non-partial square)."""

    lm_image: NDArray[np.float64]
    lm_pixel_um: float
    em_image: NDArray[np.float64]
    em_pixel_um: float
    lm_centres_px: NDArray[np.float64]
    em_centres_px: NDArray[np.float64]
    pitch_um: float
    mirrored: bool


def render_atlas_case(seed: int) -> AtlasCase:
    """Render one simulated grid in both instruments (rotation and mirror from the seed)."""
    spec = Specimen.generate(seed=seed, flip_fraction=0.5)
    cfg = LightSimConfig.build(objectives={"5x": {"magnification": 5, "numerical_aperture": 0.15,
                                                  "pixel_size_um": 1.3}},
                               camera={"shape": (2400, 2400)}, start_objective="5x")
    lm = SimulatedLightMicroscope(spec, VirtualClock(), cfg, seed=seed)
    lm.set_channel("BF")
    c_lm = spec.truth.grid_to_lm_stage(np.zeros(2))
    lm.move_xy(float(c_lm[0]), float(c_lm[1]))
    lm.move_z(lm.focus_z_for((float(c_lm[0]), float(c_lm[1]))))
    lm_img = lm.snap()
    em = SimulatedElectronMicroscope(spec, VirtualClock(), ElectronSimConfig().replace(
        camera_shape=(16384, 16384), low_dose={"search": LowDosePreset(
            mag_index=mag_index_of(62), exposure_s=0.5, binning=8,
            dose_rate_e_per_a2_s=0.002)}), seed=seed)
    c_em = spec.truth.grid_to_em_stage(np.zeros(2))
    em.move_stage(float(c_em[0]), float(c_em[1]))
    em_img = em.acquire(LowDoseArea.SEARCH)
    cen = np.array([s.centre_um for s in spec.squares if not s.partial])
    lm_c = _to_px(lm.true_pixel_to_stage(lm_img), spec.truth.grid_to_lm_stage(cen))
    a_em = em.true_pixel_to_stage(em_img)
    em_c = _to_px(a_em, spec.truth.grid_to_em_stage(cen))
    return AtlasCase(lm_image=np.asarray(lm_img.data, np.float64),
                     lm_pixel_um=float(lm_img.pixel_size_um),
                     em_image=np.asarray(em_img.data, np.float64),
                     em_pixel_um=float(em_img.pixel_size_um), lm_centres_px=lm_c,
                     em_centres_px=em_c, pitch_um=float(spec.config.pitch_um),
                     mirrored=bool(spec.truth.em.mirrored))


def judge_atlas(case: AtlasCase, seed: int, source: str = "simulator") -> dict[str, Any]:
    """Register one case and judge every square centre: right = within half a pitch."""
    t0 = time.perf_counter()
    base: dict[str, Any] = {"seed": seed, "source": source, "mirrored_truth": case.mirrored}
    try:
        res = register_atlas(case.lm_image, case.lm_pixel_um, case.em_image, case.em_pixel_um,
                             case.lm_centres_px)
    except CorrelationInputError as err:
        return {**base, "status": "unusable_input", "reason": str(err),
                "seconds": time.perf_counter() - t0}
    row: dict[str, Any] = {**base, "status": res.status, "confidence": res.confidence,
                           "seconds": time.perf_counter() - t0, "reason": res.reason}
    if res.points_em_px is not None:
        err = np.linalg.norm(res.points_em_px - case.em_centres_px, axis=1) * case.em_pixel_um
        row.update(fraction_right=float(np.mean(err < case.pitch_um / 2)),
                   median_error_um=float(np.median(err)), squares_fitted=len(res.lm_squares_px))
    return row


def render_synthetic_case(seed: int) -> AtlasCase:
    """A grid from tests/protocols/grid_render.py (a second, different grid design: other
    marks, torn and thick-ice squares, cells), random rotations and mirror from the seed."""
    from tests.protocols.grid_render import PITCH_UM, render_overview

    rng = np.random.default_rng(seed)
    mirrored = bool(rng.random() < 0.5)

    def lin(deg: float, scale: float, mirror: bool) -> NDArray[np.float64]:
        t = np.deg2rad(deg)
        m = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        return m @ np.diag([-1.0, 1.0]) if mirror else m

    l1 = lin(rng.uniform(0, 360), 1.0, False)
    l2 = lin(rng.uniform(0, 360), rng.uniform(0.95, 1.05), mirrored)
    s1, s2 = rng.uniform(1500, 1700, 2), rng.uniform(1550, 1750, 2)
    grid_seed = int(rng.integers(2 ** 31))
    lm = render_overview(l1, s1, 5.0, 660, "lm", seed=grid_seed)
    em = render_overview(l2, s2, 5.5, 640, "em", seed=grid_seed)
    n = 8
    ij = np.stack(np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1)), -1).reshape(-1, 2)
    cen = ij[np.hypot(*ij.T) <= n] * PITCH_UM
    return AtlasCase(lm_image=np.asarray(lm, np.float64), lm_pixel_um=5.0,
                     em_image=np.asarray(em, np.float64), em_pixel_um=5.5,
                     lm_centres_px=(cen @ l1.T + s1) / 5.0, em_centres_px=(cen @ l2.T + s2) / 5.5,
                     pitch_um=PITCH_UM, mirrored=mirrored)


def atlas_benchmark(n_grids: int, seed: int, n_synthetic: int = 4) -> dict[str, Any]:
    """Summary over ``n_grids`` simulated grids and ``n_synthetic`` grid_render grids."""
    rng = np.random.default_rng(seed)
    seeds = [int(rng.integers(2 ** 31)) for _ in range(n_grids)]
    rows = [judge_atlas(render_atlas_case(s), s) for s in seeds]
    syn = [int(rng.integers(2 ** 31)) for _ in range(n_synthetic)]
    rows += [judge_atlas(render_synthetic_case(s), s, "grid_render") for s in syn]
    ok = [r for r in rows if r["status"] == "ok"]
    wrong = [r for r in ok if r.get("fraction_right", 0.0) < 1.0]
    answered = [r for r in rows if "fraction_right" in r]
    return {
        "grids": len(rows),
        "grids_by_source": {src: sum(r["source"] == src for r in rows)
                            for src in ("simulator", "grid_render")},
        "fraction_right_grids": sum(r["status"] == "ok" and r.get("fraction_right") == 1.0
                                    for r in rows) / max(len(rows), 1),
        "confidence_sigmas_min_when_ok": (float(min(r["confidence"] for r in ok))
                                          if ok else None),
        "fraction_ok": len(ok) / max(len(rows), 1),
        "confidently_wrong": len(wrong),
        "fraction_right_squares_when_ok": (float(np.mean([r["fraction_right"] for r in ok]))
                                           if ok else None),
        "fraction_right_squares_best_answer_all_grids": (
            float(np.mean([r["fraction_right"] for r in answered])) if answered else None),
        "median_square_centre_error_um_when_ok": (
            float(np.median([r["median_error_um"] for r in ok])) if ok else None),
        "seconds_per_atlas_median": float(np.median([r["seconds"] for r in rows])),
        "seconds_per_atlas_max": float(np.max([r["seconds"] for r in rows])),
        "rows": rows,
    }
