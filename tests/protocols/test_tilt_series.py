"""Tilt series on the simulated TEM (stage error, runout and a ~7 um eucentric error on):
tracking (neighbour and anchor references) keeps the target within 50 nm of the centre at
every tilt, without tracking it drifts away, autofocus brings every record to the target
defocus where the height model alone misses by microns (and a Focus area in an empty hole is
given up after three tries), files re-open with the right metadata, and bad tilt ranges are
refused before anything moves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
from em_sim import FINE_MAG_INDEX, MappedSquare, context, make_em, miss_nm

from drivers.base import LimitViolation
from protocols.em_acquire import load_frame
from protocols.mdoc import read_mdoc, read_tilt_angles
from protocols.plan import run_plan
from protocols.realign import RealignParams
from protocols.tilt_series import TiltSeriesParams, TiltSeriesPlan, tilt_key
from protocols.tilt_tracking import DoneTilt, Measurement, combine, references
from simulators.specimen import Specimen

TRACK = {"mag_index": FINE_MAG_INDEX, "dose_rate_e_per_a2_s": 1.0, "defocus_offset_um": -30.0}


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=4)


@pytest.fixture
def mapped(spec: Specimen, tmp_path: Path) -> MappedSquare:
    return MappedSquare(make_em(spec), spec, tmp_path)


def params(target: Any, **changes: Any) -> TiltSeriesParams:
    base: dict[str, Any] = {
        "targets": [{"id": "t1", "x_um": float(target[0]), "y_um": float(target[1]),
                     "square_id": "m"}],
        "realign": RealignParams(), "track_settings": TRACK,
        "scheme": {"kind": "bidirectional", "min_deg": -60, "max_deg": 60, "step_deg": 6}}
    return TiltSeriesParams.model_validate({**base, **changes})


def misses(mapped: MappedSquare, plan: TiltSeriesPlan, truth: Any) -> dict[float, float]:
    ctx = context(mapped.em, mapped.data_dir, mapped.store)
    out = {}
    for step in plan.tilts.steps:
        res = ctx.result(tilt_key("t1", step.tilt_deg))
        out[step.tilt_deg] = miss_nm(mapped.em, load_frame(mapped.data_dir, res["record"]), truth)
    return out


def test_tracking_keeps_the_target_within_50nm_and_files_reopen(mapped: MappedSquare) -> None:
    nominal, truth = mapped.target((3.0, 2.0))
    plan = TiltSeriesPlan(params(nominal))
    ctx = context(mapped.em, mapped.data_dir, mapped.store)
    run_plan(plan, ctx)
    miss = misses(mapped, plan, truth)
    print(f"tracking on, miss per tilt (nm): {({k: round(v) for k, v in miss.items()})}")
    assert max(miss.values()) < 50.0
    stack = ctx.result("target-t1/stack")
    assert stack["n_tilts"] == 21 and stack["lost_tilts_deg"] == []
    assert stack["total_dose_e_per_a2"] == pytest.approx(100.0, rel=1e-6)
    with mrcfile.open(mapped.data_dir / stack["mrc"]) as mrc:
        assert mrc.data.shape == (21, 512, 512) and mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(22.4, rel=1e-5)     # 2.24 nm, in A
    _, records = read_mdoc(mapped.data_dir / stack["mdoc"])
    angles = [s.tilt_deg for s in plan.tilts.steps]
    assert [r.tilt_deg for r in records] == angles
    assert read_tilt_angles(mapped.data_dir / stack["rawtlt"]) == pytest.approx(angles)
    assert [r.dose_e_per_a2 for r in records] == pytest.approx([100.0 / 21] * 21, rel=1e-4)
    assert records[-1].prior_dose_e_per_a2 == pytest.approx(100.0 * 20 / 21, rel=1e-4)
    # the mdoc holds the defocus each record was taken at: the target plus that tilt's focus
    # correction (the height model's, here up to ~0.6 um at high tilt)
    corrections = [ctx.result(tilt_key("t1", a))["focus"]["correction_um"] for a in angles]
    assert [r.defocus_um for r in records] == pytest.approx(
        [-6.0 + c for c in corrections], abs=1e-3)
    assert all(r.target_defocus_um == -6.0 for r in records)
    assert len({r.image_shift_um for r in records}) == 21       # re-centred at every tilt
    results = [ctx.result(tilt_key("t1", s.tilt_deg)) for s in plan.tilts.steps]
    # every tilt after the first was aligned to its neighbour and, past 6 deg, to an anchor
    for res in results[1:]:
        refs = res["tracking"]["references"]
        assert res["tracking"]["applied"] and refs[0]["used"]
        if abs(res["tilt_deg"]) > 6:
            assert len(refs) == 2 and abs(refs[1]["tilt_deg"]) < abs(res["tilt_deg"]) - 6
    # this target's Focus area lies in an empty hole: three tries, then the height model
    focus = [res["focus"] for res in results]
    assert ["autofocus_failed" in f for f in focus] == [True] * 3 + [False] * 18
    assert {f["method"] for f in focus[3:]} == {"model"}
    # every file is listed for the journal (recorded with its step, announced to clients)
    assert [r["artifacts"][0]["path"] for r in results] == [r["record"]["path"] for r in results]
    assert {a["kind"]: a["path"] for a in stack["artifacts"]} == {
        "em_tilt_series": stack["mrc"], "em_tilt_series_mdoc": stack["mdoc"],
        "em_tilt_angles": stack["rawtlt"]}


def test_without_tracking_the_target_drifts_with_tilt(mapped: MappedSquare) -> None:
    nominal, truth = mapped.target((3.0, 2.0))
    plan = TiltSeriesPlan(params(nominal, tracking=False, eucentric=None))
    run_plan(plan, context(mapped.em, mapped.data_dir, mapped.store))
    miss = misses(mapped, plan, truth)
    print(f"tracking off, miss per tilt (nm): {({k: round(v) for k, v in miss.items()})}")
    assert miss[60.0] > 1000.0 and miss[-60.0] > 1000.0           # out of the 1.15 um field
    assert miss[30.0] > miss[12.0] > miss[0.0]
    assert miss[-30.0] > miss[-12.0] > miss[0.0]


def test_dose_symmetric_order_is_kept_and_tracked(mapped: MappedSquare) -> None:
    nominal, truth = mapped.target((-4.0, 1.0))
    plan = TiltSeriesPlan(params(nominal, scheme={"kind": "dose_symmetric", "min_deg": -30,
                                                  "max_deg": 30, "step_deg": 10}))
    keys = [s.key for s in plan.steps(context(mapped.em, mapped.data_dir, mapped.store))
            if "/tilt/" in s.key]
    assert keys == [tilt_key("t1", a) for a in (0, 10, -10, -20, 20, 30, -30)]
    run_plan(plan, context(mapped.em, mapped.data_dir, mapped.store))
    assert max(misses(mapped, plan, truth).values()) < 50.0


@pytest.mark.parametrize("scheme", [
    {"kind": "bidirectional", "min_deg": -60, "max_deg": 75},
    {"kind": "dose_symmetric", "min_deg": -72, "max_deg": 60},
], ids=["bidirectional-75", "dose-symmetric-minus-72"])
def test_tilt_range_beyond_limits_is_refused_before_moving(spec: Specimen, tmp_path: Path,
                                                           scheme: dict[str, Any]) -> None:
    em = make_em(spec)
    before, t0 = em.true_stage_position(), em.clock.now()
    plan = TiltSeriesPlan(params((10.0, 10.0), scheme=scheme))
    with pytest.raises(LimitViolation, match=r"tilt series refused before moving: tilt .* "
                                             r"outside \[-70, 70\]"):
        run_plan(plan, context(em, tmp_path))
    assert em.true_stage_position() == before and em.clock.now() == t0 and em.tilt() == 0.0


def test_target_out_of_reach_is_refused_before_moving(spec: Specimen, tmp_path: Path) -> None:
    em = make_em(spec)
    with pytest.raises(LimitViolation, match="target t1 refused before moving"):
        run_plan(TiltSeriesPlan(params((1700.0, 0.0))), context(em, tmp_path))
    assert em.clock.now() == 0.0


def test_autofocus_brings_every_record_to_the_target_defocus(mapped: MappedSquare) -> None:
    # no eucentric step: the film sits ~7 um above the tilt axis (small steps, so that
    # tracking keeps up while the model learns the height)
    nominal, _ = mapped.target((1.0, 1.0))      # its Focus area (2 um along the axis) sees film
    scheme = {"kind": "bidirectional", "min_deg": -9, "max_deg": 9, "step_deg": 3}
    errors: dict[int, list[float]] = {}
    for every in (1, 3, 0):
        plan = TiltSeriesPlan(params(nominal, eucentric=None, scheme=scheme,
                                     autofocus_every=every,
                                     targets=[{"id": f"f{every}", "x_um": float(nominal[0]),
                                               "y_um": float(nominal[1]), "square_id": "m"}]))
        ctx = context(mapped.em, mapped.data_dir, mapped.store)
        run_plan(plan, ctx)
        errors[every] = []
        methods = []
        for step in plan.tilts.steps:
            res = ctx.result(tilt_key(f"f{every}", step.tilt_deg))
            record = mapped.em.frame_record(load_frame(mapped.data_dir, res["record"]))
            errors[every].append(record.defocus_um - plan.p.target_defocus_um)
            methods.append(res["focus"]["method"])
        print(f"autofocus every {every}: {methods}, record defocus error (um): "
              f"{[round(e, 2) for e in errors[every]]}")
        if every == 1:
            assert set(methods) == {"autofocus"}
        elif every == 3:    # measured at 0, 9, -6 deg; carried by the height model between
            assert methods == ["autofocus" if i % 3 == 0 else "previous"
                               for i in range(len(methods))]
        else:
            assert methods[:3] == ["none"] * 3 and set(methods[3:]) == {"model"}
    assert max(abs(e) for e in errors[1]) < 0.3          # SerialEM-like 50-100 nm noise
    assert max(abs(e) for e in errors[3]) < 0.6          # the target moves between measurements
    assert max(abs(e) for e in errors[0]) > 3.0          # no measurement: the height error shows


def _done(angle: float, order: int) -> DoneTilt:
    return DoneTilt(angle, order, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0))


POSITIVE = [0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0]


@pytest.mark.parametrize(("done", "angle", "expected"), [
    ([0.0], 3.0, [0.0]),                         # the neighbour is 0 deg: one reference
    (POSITIVE[:4], 12.0, [9.0, 0.0]),            # within the first 15 deg: the anchor is 0
    (POSITIVE, 24.0, [21.0, 9.0]),               # 15 deg back
    ([*POSITIVE, -3.0, -6.0], -9.0, [-6.0, 0.0]),  # the other branch: its own side, or 0
], ids=["first-step", "anchor-zero", "anchor-15-back", "negative-branch"])
def test_references_are_the_neighbour_and_an_anchor_towards_zero(
        done: list[float], angle: float, expected: list[float]) -> None:
    tilts = [_done(a, i) for i, a in enumerate(done)]
    assert [r.angle_deg for r in references(tilts, angle, 15.0)] == expected


@pytest.mark.parametrize(("scores", "deltas", "expected", "used"), [
    ((0.5, 0.5), ((0.01, 0.0), (0.03, 0.0)), (0.02, 0.0), [True, True]),
    ((0.6, 0.2), ((0.01, 0.0), (0.03, 0.0)), (0.012, 0.0), [True, True]),
    ((0.5, 0.5), ((0.10, 0.0), (0.01, 0.0)), (0.01, 0.0), [False, True]),
    ((0.01, 0.5), ((0.10, 0.0), (0.02, 0.0)), (0.02, 0.0), [False, True]),
    ((0.01, 0.02), ((0.10, 0.0), (0.02, 0.0)), None, [False, False]),
], ids=["equal-weights", "score-squared", "disagree-keeps-anchor", "weak-neighbour",
        "both-weak"])
def test_estimates_combine_by_score_and_a_disagreement_keeps_the_anchor(
        scores: tuple[float, float], deltas: tuple[tuple[float, float], ...],
        expected: tuple[float, float] | None, used: list[bool]) -> None:
    ms = [Measurement(3.0, np.asarray(deltas[0]), scores[0], anchor=False),
          Measurement(0.0, np.asarray(deltas[1]), scores[1], anchor=True)]
    out, flags = combine(ms, min_score=0.05, max_disagreement_um=0.03)
    assert flags == used
    if expected is None:
        assert out is None
    else:
        assert out is not None and out == pytest.approx(np.asarray(expected), abs=1e-9)
