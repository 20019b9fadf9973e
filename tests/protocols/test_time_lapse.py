"""Live time-lapse on the virtual clock: frames, timing, metadata, lateness, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import structlog
import tifffile
import useq
from lm_sim import context, run_to_end, scope, small_grid, virus_site

from drivers.errors import LimitViolation
from protocols.ome_tiff import read_ome_tiff
from protocols.plan import InvalidStep, StepContext, run_plan
from protocols.time_lapse import LatePolicy, StagePositionUm, TimeLapseParams, TimeLapsePlan
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Specimen, SimulatedLightMicroscope, StepContext, float]]:
    """The paper's defaults: 488 + 640 every 5 min for 40 min, 8 um at 1 um, then + 405."""
    spec = small_grid(seed=3)
    lm = scope(spec, (256, 256), exact=True)
    ctx = context(lm, tmp_path_factory.mktemp("timelapse"))
    x, y = virus_site(spec)
    hint = lm.focus_z_for((x, y), objective="100x") + 3.0     # off by 3 um, as after 20x
    t0 = lm.clock.now()
    run_plan(TimeLapsePlan(TimeLapseParams(positions=(StagePositionUm(x_um=x, y_um=y),),
                                           focus_centre_um=hint)), ctx)
    yield spec, lm, ctx, t0
    lm.close()


def test_forty_minutes_on_the_virtual_clock(paper_run: Any) -> None:
    _, lm, ctx, t0 = paper_run
    keys = ctx.store.order
    assert keys == ["timelapse/p0/focus", *[f"timelapse/p0/t{t:02d}" for t in range(9)],
                    "timelapse/p0/final", "timelapse/summary"]
    starts = [ctx.result(f"timelapse/p0/t{t:02d}")["first_frame_s"] for t in range(9)]
    assert np.diff(starts) == pytest.approx([300.0] * 8, abs=0.05)
    assert 2400.0 < lm.clock.now() - t0 < 2460.0
    summary = ctx.result("timelapse/summary")
    assert summary["acquired"] == 9 and summary["missed"] == [] and summary["late"] == []
    assert summary["max_abs_drift_s"] < 0.05


def test_frames_and_metadata(paper_run: Any) -> None:
    _, lm, ctx, _ = paper_run
    z_focus = ctx.result("timelapse/p0/focus")["z_um"]
    assert z_focus == pytest.approx(lm.focus_z_for(ctx.result("timelapse/p0/focus")["xy_um"],
                                                   objective="100x"), abs=0.5)
    for t in (0, 8):
        r = ctx.result(f"timelapse/p0/t{t:02d}")
        assert r["frames"] == 18 and r["channels"] == ["488", "640"]
        path = ctx.data_dir / r["path"]
        with tifffile.TiffFile(path) as tif:
            assert tif.series[0].get_shape(False)[:5] == (1, 2, 9, 256, 256)
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert (pixels["SizeT"], pixels["SizeC"], pixels["SizeZ"]) == (1, 2, 9)
        assert pixels["PhysicalSizeX"] == pytest.approx(0.065)
        assert pixels["PhysicalSizeZ"] == pytest.approx(1.0)
        assert [str(c["Name"]) for c in pixels["Channel"]] == ["488", "640"]   # xml2dict: ints
        planes = read_ome_tiff(path)
        assert [p.z_um for p in planes[:9]] == pytest.approx(
            list(z_focus + np.arange(-4.0, 4.5, 1.0)))
        assert all(p.objective == "100x" and p.index["t"] == t for p in planes)
        assert planes[0].time_s == pytest.approx(r["first_frame_s"])
        assert planes[0].stage_um[:2] == pytest.approx(tuple(r["stage_um"][:2]))
    final = ctx.result("timelapse/p0/final")
    assert final["channels"] == ["488", "640", "405"] and final["frames"] == 27
    assert [p.channel for p in read_ome_tiff(ctx.data_dir / final["path"])][::9] == [
        "488", "640", "405"]


def test_useq_sequence_with_two_positions(tmp_path: Path) -> None:
    spec = small_grid(seed=3)
    lm = scope(spec, (64, 64), exact=True)
    ctx = context(lm, tmp_path)
    x, y = virus_site(spec)
    seq = useq.MDASequence.model_validate({
        "channels": [{"config": "488", "exposure": 50}],
        "time_plan": {"interval": 60, "loops": 3}, "z_plan": {"range": 2, "step": 1},
        "stage_positions": [{"x": x, "y": y, "z": 3.0}, {"x": x + 40, "y": y, "z": 4.0}]})
    run_plan(TimeLapsePlan(TimeLapseParams(sequence=seq, final_channels=())), ctx)
    assert ctx.store.order == ["timelapse/p0/t00", "timelapse/p1/t00", "timelapse/p0/t01",
                               "timelapse/p1/t01", "timelapse/p0/t02", "timelapse/p1/t02",
                               "timelapse/summary"]
    for p in (0, 1):
        starts = [ctx.result(f"timelapse/p{p}/t{t:02d}")["first_frame_s"] for t in range(3)]
        assert np.diff(starts) == pytest.approx([60.0, 60.0], abs=0.05)
    planes = read_ome_tiff(ctx.data_dir / ctx.result("timelapse/p1/t02")["path"])
    assert [p.z_um for p in planes] == pytest.approx([3.0, 4.0, 5.0])
    assert planes[0].exposure_s == pytest.approx(0.05)


def _bad(tmp_path: Path, **params: Any) -> tuple[SimulatedLightMicroscope, StepContext]:
    lm = scope(small_grid(seed=3), (64, 64))
    return lm, context(lm, tmp_path)


@pytest.mark.parametrize("params, match", [
    ({"channels": ("488", "GFP")}, "channel 'GFP' not available"),
    ({"final_channels": ("561",)}, "channel '561' not available"),
    ({"objective": "60x"}, "objective '60x' not available"),
    ({"positions": (StagePositionUm(x_um=9000.0, y_um=0.0, z_um=0.0),)}, "stage x 9000"),
    ({"positions": (StagePositionUm(x_um=0.0, y_um=0.0, z_um=499.0),)}, r"stage z 50\d um outside"),
], ids=["channel", "final-channel", "objective", "off-stage", "z-limit"])
def test_bad_sequences_refused_before_moving(tmp_path: Path, params: dict[str, Any],
                                             match: str) -> None:
    lm, ctx = _bad(tmp_path)
    values = {"positions": (StagePositionUm(x_um=0.0, y_um=0.0),), **params}
    before = (lm.position_xy(), lm.position_z(), lm.clock.now())
    with pytest.raises(LimitViolation, match=match):
        run_plan(TimeLapsePlan(TimeLapseParams(**values)), ctx)
    assert (lm.position_xy(), lm.position_z(), lm.clock.now()) == before
    assert ctx.store.get("timelapse/p0/focus") is None


def test_interleaved_axis_order_refused(tmp_path: Path) -> None:
    lm, ctx = _bad(tmp_path)
    seq = useq.MDASequence.model_validate({
        "axis_order": "tcpz", "channels": ["488", "640"], "time_plan": {"interval": 1, "loops": 2},
        "stage_positions": [{"x": 0, "y": 0, "z": 0}, {"x": 10, "y": 0, "z": 0}]})
    with pytest.raises(InvalidStep, match="put 't' and 'p' before 'c' and 'z'"):
        run_plan(TimeLapsePlan(TimeLapseParams(sequence=seq)), ctx)
    assert lm.clock.now() == 0.0


def test_params_refuse_ambiguous_input() -> None:
    seq = useq.MDASequence.model_validate({"stage_positions": [{"x": 0, "y": 0, "z": 0}]})
    with pytest.raises(pydantic.ValidationError, match="positions or a sequence, not both"):
        TimeLapseParams(sequence=seq, positions=(StagePositionUm(x_um=0, y_um=0),))
    with pytest.raises(pydantic.ValidationError, match="at least one position"):
        TimeLapseParams()
    with pytest.raises(pydantic.ValidationError):
        TimeLapseParams.model_validate({"positions": [{"x_um": 0, "y_um": 0}], "intervall_s": 1})


@pytest.mark.parametrize("policy, missed, late", [
    ("acquire", [], [[0, 3], [0, 4]]),
    ("skip_superseded", [[0, 3]], [[0, 3], [0, 4]]),
], ids=["acquire-late", "skip-superseded"])
def test_late_time_points_are_logged_never_skipped_silently(
        tmp_path: Path, policy: LatePolicy, missed: list[list[int]], late: list[list[int]]) -> None:
    """The service is down for 700 s after t02: t03 (due at 900 s) and t04 (1200 s) are
    late; with skip_superseded t03 is recorded as missed because t04 is already due."""
    lm = scope(small_grid(seed=3), (64, 64), exact=True)
    ctx = context(lm, tmp_path)
    params = TimeLapseParams(positions=(StagePositionUm(x_um=0, y_um=0, z_um=0),),
                             z_range_um=0, late_policy=policy, final_channels=())
    with structlog.testing.capture_logs() as logs:
        started, interruptions = run_to_end(lambda: TimeLapsePlan(params), ctx,
                                            pause_every=3, downtime_s=700.0,
                                            max_pauses=1)
    assert interruptions == 1 and len(started) == len(set(started)) == 10
    summary = ctx.result("timelapse/summary")
    assert summary["missed"] == missed and summary["late"] == late
    assert summary["acquired"] == 9 - len(missed)
    events = [e for e in logs if e["event"] in ("timelapse.late", "timelapse.missed")]
    assert {(e["event"], e["t"]) for e in events} >= {("timelapse.late", 3),
                                                      ("timelapse.late", 4)}
    assert any(e["event"] == "timelapse.missed" for e in events) == bool(missed)
    t05 = ctx.result("timelapse/p0/t05")
    assert t05["planned_start_s"] == pytest.approx(t05["schedule_origin_s"] + 1500.0)
    assert not t05["late"] and t05["first_frame_s"] == pytest.approx(t05["planned_start_s"],
                                                                     abs=0.5)


def test_first_frames_on_schedule_with_a_slow_filter_turret(tmp_path: Path) -> None:
    """Each time point moves, focuses and turns the turret to its first channel before its
    planned start, so its first exposure starts on schedule: the first time point pays no
    filter change the others do not (0.2 s, a slow Ti2 turret), with two positions."""
    spec = small_grid(seed=3)
    lm = SimulatedLightMicroscope.with_small_camera(
        spec, shape=(64, 64), seed=1, exact_stage=True, timing={"channel_change_s": 0.2})
    ctx = context(lm, tmp_path)
    x, y = virus_site(spec)
    seq = useq.MDASequence.model_validate({
        "channels": [{"config": "488", "exposure": 50}, {"config": "640", "exposure": 20}],
        "time_plan": {"interval": 30, "loops": 3}, "z_plan": {"range": 2, "step": 1},
        "stage_positions": [{"x": x, "y": y, "z": 3.0}, {"x": x + 40, "y": y, "z": 4.0}]})
    run_plan(TimeLapsePlan(TimeLapseParams(sequence=seq, final_channels=())), ctx)
    summary = ctx.result("timelapse/summary")
    assert summary["acquired"] == 6 and summary["late"] == []
    assert summary["max_abs_drift_s"] < 1e-6
    for p in (0, 1):
        r = ctx.result(f"timelapse/p{p}/t01")
        assert r["first_frame_s"] == pytest.approx(r["planned_start_s"] + 0.05
                                                   + 64 * lm.config.camera.line_time_s)
