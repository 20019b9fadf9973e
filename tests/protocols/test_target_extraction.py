"""Virus targets from the last time point, against the simulated viruses' true positions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from lm_sim import context, scope, small_grid, true_affine, virus_site

from drivers.clock import VirtualClock
from drivers.imaging import apply_affine
from protocols.plan import InvalidStep, StepContext, run_plan
from protocols.target_extraction import (
    Target,
    TargetExtractionParams,
    TargetExtractionPlan,
    detect_spots,
    link_static,
    merge_targets,
)
from protocols.time_lapse import StagePositionUm, TimeLapseParams, TimeLapsePlan
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen, VirusMotion


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Specimen, SimulatedLightMicroscope, StepContext]]:
    """A 40-minute time-lapse over a square with viruses (exact stage: the image's nominal
    affine is the truth, so stage micrometres can be compared with the specimen's)."""
    spec = small_grid(seed=3)
    lm = scope(spec, (512, 512), exact=True)
    ctx = context(lm, tmp_path_factory.mktemp("targets"))
    x, y = virus_site(spec)
    z = lm.focus_z_for((x, y), objective="100x")
    run_plan(TimeLapsePlan(TimeLapseParams(positions=(StagePositionUm(x_um=x, y_um=y, z_um=z),),
                                           final_channels=())), ctx)
    yield spec, lm, ctx
    lm.close()


def _truth_in_view(spec: Specimen, ctx: StepContext) -> tuple[np.ndarray, np.ndarray]:
    """True LM stage positions and motions of viruses inside the last frame (4 px margin)."""
    last = ctx.result("timelapse/p0/t08")
    truth = spec.truth.grid_to_lm_stage(spec.viruses.at(last["first_frame_s"]))
    a = np.array(last["pixel_to_stage"])
    pix = apply_affine(np.hstack([np.linalg.inv(a[:, :2]),
                                  (-np.linalg.inv(a[:, :2]) @ a[:, 2])[:, None]]), truth)
    inside = np.all((pix > 5) & (pix < 506), axis=1)
    return truth[inside], spec.viruses.motion[inside]


def _nearest(points: np.ndarray, xy: tuple[float, float]) -> float:
    return float(np.hypot(*(points - np.asarray(xy)).T).min())


def test_static_viruses_become_targets(live: Any) -> None:
    spec, _, ctx = live
    run_plan(TargetExtractionPlan(TargetExtractionParams()), ctx)
    result = ctx.result("targets/p0")
    truth, motion = _truth_in_view(spec, ctx)
    assert len(truth) >= 4 and (motion == VirusMotion.STATIC).sum() >= 3
    for t in result["targets"]:
        assert _nearest(truth, (t["x"], t["y"])) < 0.05      # sub-pixel: 1 px = 65 nm
        assert t["frame"] == "lm_stage" and t["id"].startswith("p0-t")
    for xy, m in zip(truth, motion, strict=True):
        hit = min((_nearest(np.array([[t["x"], t["y"]]]), tuple(xy)), t) for t in
                  result["targets"] + result["rejected"])
        assert hit[0] < 0.05                                   # every particle was found
        if m == VirusMotion.STATIC:
            assert "reason" not in hit[1]
    moved = [r for r in result["rejected"] if "moved" in r["reason"]]
    threshold = TargetExtractionParams().static_threshold_um
    assert all(r["displacement_um"] > threshold for r in moved)
    assert all(t["displacement_um"] < 0.05 for t in result["targets"])   # still: tens of nm
    assert (motion != VirusMotion.STATIC).sum() == len(result["rejected"])
    assert (ctx.data_dir / "targets/p0.json").is_file()


def test_without_static_filter_every_particle_is_a_target(live: Any) -> None:
    spec, _, ctx = live
    run_plan(TargetExtractionPlan(TargetExtractionParams(static_only=False, prefix="all")), ctx)
    truth, _ = _truth_in_view(spec, ctx)
    result = ctx.result("all/p0")
    assert result["rejected"] == [] and len(result["targets"]) == len(truth)


def test_detect_spots_is_sub_pixel() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96].astype(float)
    true = np.array([[20.3, 30.7], [60.55, 50.2], [75.9, 12.45]])
    img = 100 + rng.normal(0, 2, (96, 96))
    for x, y in true:
        img += 500 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.6 ** 2))
    spots = detect_spots(img, 1.6, 8.0, 3.0)
    assert len(spots) == 3
    for x, y in true:
        assert _nearest(spots.xy_px, (x, y)) < 0.08


def test_link_static_follows_tracks_backwards() -> None:
    last = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 0.0]])
    earlier = [np.array([[0.05, 0.0], [10.8, 10.0]]),            # third one not seen
               np.array([[0.0, 0.1], [11.6, 10.0], [20.0, 0.0]])]
    disp, found = link_static(last, earlier, 1.0)
    assert found.tolist() == [2, 2, 0]
    assert disp[0] == pytest.approx(0.1) and disp[1] == pytest.approx(1.6)


def test_merge_client_edits() -> None:
    auto = [Target("p0-t001", 0, 1.0, 2.0, 0.0, 5.0, 6.0, 30.0),
            Target("p0-t002", 0, 3.0, 4.0, 0.0, 7.0, 8.0, 20.0)]
    merged = merge_targets(auto, [{"id": "mine", "x": 9.0, "y": 9.5},
                                  {"id": "p0-t002", "x": 3.2, "y": 4.1}], ["p0-t001"])
    assert [t.id for t in merged] == ["mine", "p0-t002"]
    assert merged[1].source == "client" and merged[1].x_um == 3.2
    with pytest.raises(InvalidStep, match="repeat an id"):
        merge_targets(auto, [{"id": "a", "x": 0, "y": 0}, {"id": "a", "x": 1, "y": 1}], [])
    with pytest.raises(InvalidStep, match="not lm_stage"):
        merge_targets(auto, [{"id": "b", "x": 0, "y": 0, "frame": "em_stage"}], [])


# -- two positions with the stage's error on: every visit lands elsewhere -------------------

FIELD_100X = {"100x": {"pixel_size_um": 0.1}}


def _virus_sites(spec: Specimen, n: int) -> list[tuple[float, float]]:
    """LM stage positions of the middles of the first ``n`` squares with viruses."""
    keys = np.array(spec.viruses.square_keys)
    out = []
    for key in list(dict.fromkeys(keys.tolist()))[:n]:
        xy = spec.truth.grid_to_lm_stage(spec.viruses.at(0.0)[keys == key].mean(axis=0))
        out.append((float(xy[0]), float(xy[1])))
    return out


@pytest.fixture(scope="module")
def revisited(tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Specimen, SimulatedLightMicroscope, StepContext]]:
    """Two positions, four time points 5 min apart and a final set with 405: the stage
    leaves and returns at every time point, missing by ~1 um (repeatability + backlash)."""
    spec = small_grid(seed=3)
    # the session's 100x field: 1024 px of 0.1 um cover a square (beads around the cell)
    lm = SimulatedLightMicroscope.with_small_camera(spec, VirtualClock(), shape=(1024, 1024),
                                                    seed=1, objectives=FIELD_100X)
    ctx = context(lm, tmp_path_factory.mktemp("revisited"))
    positions = tuple(StagePositionUm(x_um=x, y_um=y, z_um=lm.focus_z_for((x, y),
                                                                         objective="100x"))
                      for x, y in _virus_sites(spec, 2))
    assert len(positions) == 2
    run_plan(TimeLapsePlan(TimeLapseParams(positions=positions, duration_s=900.0,
                                           z_range_um=2.0)), ctx)
    yield spec, lm, ctx
    lm.close()


def _true_static_px(spec: Specimen, lm: SimulatedLightMicroscope, ctx: StepContext,
                    key: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (in the frame of step ``key``) of the viruses really in view, and their motion."""
    frame = ctx.result(key)
    a = true_affine(lm, frame["frame"])
    truth = spec.truth.grid_to_lm_stage(spec.viruses.at(frame["first_frame_s"]))
    pix = apply_affine(np.hstack([np.linalg.inv(a[:, :2]),
                                  (-np.linalg.inv(a[:, :2]) @ a[:, 2])[:, None]]), truth)
    inside = np.all((pix > 6) & (pix < 1017), axis=1)
    return pix[inside], spec.viruses.motion[inside]


@pytest.mark.parametrize("pos", [0, 1])
def test_registered_visits_keep_static_viruses(revisited: Any, pos: int) -> None:
    spec, lm, ctx = revisited
    run_plan(TargetExtractionPlan(TargetExtractionParams()), ctx)
    result = ctx.result(f"targets/p{pos}")
    last_key = f"timelapse/p{pos}/t03"
    assert result["source"] == ctx.result(last_key)["path"]
    pix, motion = _true_static_px(spec, lm, ctx, last_key)
    static = pix[motion == VirusMotion.STATIC]
    assert len(static) >= 2
    # the visits' offsets are the stage's true misses (to a tenth of a pixel)
    last_true = true_affine(lm, ctx.result(last_key)["frame"])
    for visit in result["visits"]:
        assert visit["used"] and visit["score"] > 0.8
        step = visit["time_point"].removesuffix(".ome.tif")
        earlier = true_affine(lm, ctx.result(step)["frame"])
        true_off = apply_affine(np.linalg.inv(np.vstack([last_true, [0, 0, 1]]))[:2],
                                apply_affine(earlier, np.zeros(2)))
        assert np.hypot(*(np.asarray(visit["offset_px"]) - true_off)) < 0.1, visit
    misses = [np.hypot(*v["offset_px"]) for v in result["visits"]]
    assert max(misses) > 5.0          # the stage really missed: > 0.3 um
    # every static virus in view is a target, at its true place in the final set's pixels
    final_true = true_affine(lm, result["final"]["frame"])
    to_final = np.linalg.inv(np.vstack([final_true, [0, 0, 1]]))[:2]
    for xy in static:
        stage = apply_affine(last_true, xy)
        want = apply_affine(to_final, stage)
        best = min(result["targets"], key=lambda t: np.hypot(t["x_px"] - xy[0],
                                                             t["y_px"] - xy[1]))
        assert np.hypot(best["x_px"] - xy[0], best["y_px"] - xy[1]) < 1.0
        got = np.array([best["final_x_px"], best["final_y_px"]])
        assert np.hypot(*(got - want)) < 1.0, (got, want)
        # what the registration added to the spot's own localisation error
        moved = (got - [best["x_px"], best["y_px"]]) - (want - xy)
        assert np.hypot(*moved) < 0.15, moved


def test_without_registration_the_stage_miss_rejects_static_viruses(revisited: Any) -> None:
    """The same data with the stage trusted: static viruses 'move' by the stage's miss."""
    _, _, ctx = revisited
    run_plan(TargetExtractionPlan(TargetExtractionParams(register_channel=None,
                                                         prefix="unregistered")), ctx)
    run_plan(TargetExtractionPlan(TargetExtractionParams(prefix="registered")), ctx)
    kept = {p: [len(ctx.result(f"{prefix}/p{p}")["targets"]) for prefix in
                ("unregistered", "registered")] for p in (0, 1)}
    assert sum(k[0] for k in kept.values()) < sum(k[1] for k in kept.values()), kept
    moved = [r for p in (0, 1) for r in ctx.result(f"unregistered/p{p}")["rejected"]]
    assert any(r["reason"].startswith("moved") for r in moved)


def test_targets_inside_the_beads_come_first(revisited: Any) -> None:
    _, _, ctx = revisited
    run_plan(TargetExtractionPlan(TargetExtractionParams(prefix="ranked")), ctx)
    for p in (0, 1):
        result = ctx.result(f"ranked/p{p}")
        assert len(result["beads"]["beads_px"]) >= 3
        outside = [t["outside_beads_um"] for t in result["targets"]]
        inside = [o is not None and o <= 5.0 for o in outside]
        assert inside == sorted(inside, reverse=True), outside   # inside first
    capped = TargetExtractionParams(prefix="one", max_targets=1)
    run_plan(TargetExtractionPlan(capped), ctx)
    for p in (0, 1):
        full, one = ctx.result(f"ranked/p{p}"), ctx.result(f"one/p{p}")
        assert [t["id"] for t in one["targets"]] == [t["id"] for t in full["targets"][:1]]
        assert any("max_targets" in r["reason"] for r in one["rejected"])
