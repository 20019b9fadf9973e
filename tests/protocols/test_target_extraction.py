"""Virus targets from the last time point, against the simulated viruses' true positions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from lm_sim import context, scope, small_grid, virus_site

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
    assert all(r["displacement_um"] > 0.5 for r in moved)
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
