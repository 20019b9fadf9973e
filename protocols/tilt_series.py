"""Tilt series at each target: eucentric height, realign to the square map, one step per tilt,
then the stack (MRC + mdoc + rawtlt).

Why one committed step per tilt: a tilt already exposed must never be exposed again (the dose
is spent), and none may be lost. Each tilt step writes its record frame and a JSON copy of its
result before it returns; re-running a step whose files exist returns them without exposing,
and a step that crashed between exposure and saving (an ``.exposing`` marker without a frame)
is reported as ``lost`` with its dose counted, never repeated. The stack step assembles the
series from the saved frames, so resume never needs the microscope.

Each tilt step sets everything it relies on (stage, tilt, image shift, defocus) from committed
results: after a restart in which the stage was moved, it realigns at tilt 0 first and carries
the new image-shift offset (an "epoch") through the rest of the series.

Steps per target: ``target-{id}/eucentric``, ``target-{id}/realign``,
``target-{id}/tilt/{angle:+05.1f}`` in scheme order, ``target-{id}/stack``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from drivers.base import AcquisitionSettings, ElectronMicroscope, LowDoseArea
from drivers.errors import LimitViolation
from protocols.atomic_write import write_text_atomic
from protocols.em_acquire import APPROACH_UM, approach, load_frame, save_frame
from protocols.em_focus import focus_for_tilt, model_correction
from protocols.em_montage import map_image, read_map_sidecar
from protocols.em_params import FrozenParams, SettingsOverride
from protocols.eucentric import EucentricParams, measure_and_set_eucentric
from protocols.lm_io import artifact
from protocols.mrc_io import write_tilt_series
from protocols.plan import Plan, Step, StepContext, StepResult
from protocols.realign import RealignParams, realign
from protocols.square_map import ID_CHARS, map_key
from protocols.tilt_schemes import (
    BidirectionalConfig,
    DoseWeighting,
    TiltPlan,
    TiltSchemeConfig,
    TiltStep,
    check_limits,
    plan_tilts,
)
from protocols.tilt_tracking import (
    DoneTilt,
    FloatArray,
    Measurement,
    ShiftModel,
    combine,
    nearest_done,
    references,
    track_to_reference,
)

__all__ = ["TargetSpec", "TiltSeriesParams", "TiltSeriesPlan", "tilt_key"]


def tilt_key(target_id: str, angle_deg: float) -> str:
    return f"target-{target_id}/tilt/{angle_deg:+05.1f}"


class TargetSpec(FrozenParams):
    """A target in EM stage um, with the map it was defined on.

    ``square_id``: the map is this session's ``square-{id}/map/stitch`` result; ``map_json``:
    a map sidecar written by another session (absolute, or relative to the data folder).
    ``height_um``: the target's height above the film when known (fLM z), for parallax.
    """

    id: str = Field(min_length=1, max_length=32)
    x_um: float
    y_um: float
    height_um: float = Field(default=0.0, ge=-5, le=5)
    square_id: str | None = None
    map_json: str | None = None

    @field_validator("id")
    @classmethod
    def _id_is_a_key(cls, v: str) -> str:
        if not set(v) <= ID_CHARS:
            raise ValueError(f"target id {v!r} may hold only letters, digits and _+-.")
        return v


class TiltSeriesParams(FrozenParams):
    """Params of the tilt series (degrees, um, e/A^2).

    ``target_defocus_um`` is the record defocus (negative: underfocus, as SerialEM).
    ``track_settings`` may lower the tracking magnification (a 1 um field at 39,000x often
    holds nothing but carbon; 11,500x in the Trial area, beside the target, sees hole edges).
    Each tilt is aligned to the nearest tilt done and to an anchor ``track_anchor_step_deg``
    back towards 0 deg (protocols/tilt_tracking.py); a match under ``track_min_score`` counts
    for nothing, and if both miss the prediction stands. ``focusing`` sets the record
    defocus from an autofocus in ``focus_area`` every ``autofocus_every`` tilts (0: never;
    the height model instead), giving up on a target after ``autofocus_max_failures``
    failures since the last success (protocols/em_focus.py). ``eucentric`` None skips the
    height step.
    """

    kind: Literal["tilt_series"] = "tilt_series"
    targets: tuple[TargetSpec, ...] = Field(min_length=1)
    scheme: TiltSchemeConfig = BidirectionalConfig.model_validate({})
    total_dose_e_per_a2: float = Field(default=100.0, ge=0, le=1000)
    dose_weighting: DoseWeighting = DoseWeighting.CONSTANT
    target_defocus_um: float = Field(default=-6.0, ge=-50, le=50)
    tracking: bool = True
    focusing: bool = True
    focus_area: LowDoseArea = LowDoseArea.FOCUS
    autofocus_every: int = Field(default=1, ge=0, le=100)
    autofocus_max_failures: int = Field(default=3, ge=1, le=100)
    eucentric: EucentricParams | None = EucentricParams()
    realign: RealignParams = RealignParams()
    track_area: LowDoseArea = LowDoseArea.TRIAL
    track_settings: SettingsOverride | None = None
    track_search_um: float = Field(default=0.4, gt=0, le=5)
    track_min_score: float = Field(default=0.05, ge=0, lt=1)
    track_anchor_step_deg: float = Field(default=15.0, gt=0, le=180)
    track_max_disagreement_um: float = Field(default=0.03, gt=0, le=1)
    record_area: LowDoseArea = LowDoseArea.RECORD
    tilt_axis_deg: float = Field(default=0.0, ge=-180, le=180)
    voltage_kv: float = Field(default=300.0, gt=0)

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: tuple[TargetSpec, ...]) -> tuple[TargetSpec, ...]:
        ids = [t.id for t in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"target ids must be unique, got {ids}")
        return v


Action = Callable[[StepContext], StepResult]


class TiltSeriesPlan(Plan):
    """Eucentric height, realign, tilts and stack for every target, in the order given."""

    name = "tilt_series"

    def __init__(self, params: TiltSeriesParams) -> None:
        self.p = params
        self.tilts: TiltPlan = plan_tilts(params.scheme.to_scheme(), params.total_dose_e_per_a2,
                                          params.dose_weighting)

    def validate(self, ctx: StepContext) -> None:
        em = ctx.require_em()
        check_limits(self.p.scheme.to_scheme(), em.tilt_limits)
        if self.p.eucentric is not None:
            em.tilt_limits.check(self.p.eucentric.tilt_deg)
        areas = [self.p.track_area, self.p.record_area]
        if self.p.focusing and self.p.autofocus_every > 0:
            areas.append(self.p.focus_area)
        for area in areas:
            if area not in em.low_dose:
                raise LimitViolation(f"low-dose area {area.name} is not configured (em.low_dose)")
        for t in self.p.targets:
            for x, y in ((t.x_um, t.y_um), (t.x_um - APPROACH_UM, t.y_um - APPROACH_UM)):
                try:
                    em.limits.check_xy(x, y)
                except LimitViolation as err:
                    raise LimitViolation(f"target {t.id} refused before moving: {err}") from err

    def total_steps(self, ctx: StepContext) -> int | None:
        per = len(self.tilts.steps) + 2 + int(self.p.eucentric is not None)
        return per * len(self.p.targets)

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        for t in self.p.targets:
            pre = f"target-{t.id}"
            if self.p.eucentric is not None:
                yield Step(f"{pre}/eucentric", self._eucentric(t), title=f"{pre}: eucentric height",
                           estimate_s=15.0, instrument="em")
            yield Step(f"{pre}/realign", self._realign(t), title=f"{pre}: realign to the map",
                       estimate_s=10.0, instrument="em")
            for step in self.tilts.steps:
                yield Step(tilt_key(t.id, step.tilt_deg), self._tilt(t, step),
                           title=f"{pre}: tilt {step.tilt_deg:+.1f} deg",
                           estimate_s=5.0, instrument="em")
            yield Step(f"{pre}/stack", self._stack(t), title=f"{pre}: write the tilt series",
                       estimate_s=2.0)

    # -- steps ---------------------------------------------------------------------------------

    def _eucentric(self, t: TargetSpec) -> Action:
        def action(ctx: StepContext) -> StepResult:
            em = ctx.require_em()
            assert self.p.eucentric is not None
            em.tilt_to(0.0)
            em.set_image_shift(0.0, 0.0)
            approach(em, t.x_um, t.y_um, force=True)
            res = measure_and_set_eucentric(em, self.p.eucentric, axis_deg=self.p.tilt_axis_deg,
                                            log=ctx.log.bind(target=t.id))
            return res.to_json()
        return action

    def _map(self, ctx: StepContext, t: TargetSpec) -> Any:
        if t.map_json is not None:
            path = Path(t.map_json)
            result, base = read_map_sidecar(path if path.is_absolute() else ctx.data_dir / path)
            return map_image(result, base)
        if t.square_id is not None:
            return map_image(ctx.result(map_key(t.square_id)), ctx.data_dir)
        raise LimitViolation(f"target {t.id} names no map (square_id or map_json): realign "
                             "needs the map the target was picked on")

    def _z(self, ctx: StepContext, t: TargetSpec) -> float | None:
        if self.p.eucentric is None:
            return None
        return float(ctx.result(f"target-{t.id}/eucentric")["z_after_um"])

    def _realign(self, t: TargetSpec) -> Action:
        def action(ctx: StepContext) -> StepResult:
            em = ctx.require_em()
            em.tilt_to(0.0)
            res = realign(em, (t.x_um, t.y_um), self._map(ctx, t), self.p.realign,
                          z_um=self._z(ctx, t), log=ctx.log.bind(target=t.id))
            return res.to_json()
        return action

    def _done(self, ctx: StepContext, t: TargetSpec, before: int) -> list[dict[str, Any]]:
        out = []
        for step in self.tilts.steps[:before]:
            out.append(ctx.result(tilt_key(t.id, step.tilt_deg)))
        return out

    def _ensure_epoch(self, ctx: StepContext, em: ElectronMicroscope, t: TargetSpec,
                      done: list[dict[str, Any]]) -> tuple[tuple[float, float], list[float]]:
        """Image-shift offset of the current epoch and the stage it holds; realigns at tilt 0
        when the stage is no longer where the series left it (a resume after other work)."""
        first = ctx.result(f"target-{t.id}/realign")
        ok = [d for d in done if d["status"] == "ok"]
        last_stage = ok[-1]["stage_um"] if ok else first["stage_um"]
        offset = tuple(ok[-1]["epoch_offset_um"]) if ok else (0.0, 0.0)
        here = em.stage_position()
        if max(abs(here[i] - last_stage[i]) for i in range(3)) <= 2e-3:
            return (float(offset[0]), float(offset[1])), list(last_stage)
        ctx.log.warning("em.tilt.realign_again", target=t.id, stage_um=list(here),
                        expected_um=list(last_stage))
        em.tilt_to(0.0)
        again = realign(em, (t.x_um, t.y_um), self._map(ctx, t), self.p.realign,
                        z_um=self._z(ctx, t), log=ctx.log.bind(target=t.id))
        new = np.asarray(again.image_shift_um) - np.asarray(first["image_shift_um"])
        return (float(new[0]), float(new[1])), list(again.stage_um)

    def _tilt(self, t: TargetSpec, step: TiltStep) -> Action:
        def action(ctx: StepContext) -> StepResult:
            em = ctx.require_em()
            rel = f"target-{t.id}/tilt-{step.index:03d}_{step.tilt_deg:+05.1f}"
            sidecar, marker = ctx.data_dir / f"{rel}.json", ctx.data_dir / f"{rel}.exposing"
            if sidecar.exists():        # exposed and saved before a crash: never expose again
                saved: StepResult = json.loads(sidecar.read_text(encoding="utf-8"))
                return saved
            if marker.exists():         # exposed (maybe) but not saved: lost, dose counted
                ctx.log.error("em.tilt.lost", target=t.id, tilt_deg=step.tilt_deg)
                return {"status": "lost", "index": step.index, "tilt_deg": step.tilt_deg,
                        "dose_e_per_a2": step.dose_e_per_a2}
            done = self._done(ctx, t, step.index)
            return self._expose(ctx, em, t, step, done, rel, sidecar, marker)
        return action

    def _expose(self, ctx: StepContext, em: ElectronMicroscope, t: TargetSpec, step: TiltStep,
                done: list[dict[str, Any]], rel: str, sidecar: Path, marker: Path) -> StepResult:
        p, log = self.p, ctx.log.bind(target=t.id, tilt_deg=step.tilt_deg)
        offset, stage = self._ensure_epoch(ctx, em, t, done)
        em.tilt_to(step.tilt_deg)
        first = ctx.result(f"target-{t.id}/realign")
        ok = [d for d in done if d["status"] == "ok"]
        prior = [DoneTilt(d["tilt_deg"], d["index"], tuple(d["image_shift_um"]),
                          tuple(d["trial_anchor_um"]) if d.get("trial_anchor_um") else None,
                          tuple(d["epoch_offset_um"])) for d in ok]
        model = ShiftModel.fit([d.angle_deg for d in prior],
                               [tuple(np.subtract(d.image_shift_um, d.epoch_offset_um).tolist())
                                for d in prior],
                               p.tilt_axis_deg)
        ref = nearest_done(prior, step.tilt_deg) if p.tracking else None
        if ref is not None:
            predicted = (np.subtract(ref.image_shift_um, ref.epoch_offset_um)
                         + model.predict(step.tilt_deg) - model.predict(ref.angle_deg) + offset)
        else:
            predicted = np.asarray(first["image_shift_um"]) + offset
        em.set_image_shift(float(predicted[0]), float(predicted[1]))
        record_settings = em.low_dose[p.record_area]
        lens = p.target_defocus_um - record_settings.defocus_offset_um
        last_focus = ok[-1].get("focus", {}) if ok else {}
        em.set_defocus(lens + float(last_focus.get("correction_um", 0.0)))
        result: StepResult = {"status": "ok", "index": step.index, "tilt_deg": step.tilt_deg,
                              "predicted_image_shift_um": [float(v) for v in predicted],
                              "epoch_offset_um": list(offset), "stage_um": stage,
                              "model": {"a": model.a, "k": model.k, "b": model.b, "c": model.c}}
        final = np.asarray(predicted, float)
        if p.tracking:
            final = self._track(ctx, em, t, step, ok, prior, predicted, offset, rel, result, log)
        result["image_shift_um"] = [float(final[0]), float(final[1])]
        focus: dict[str, Any] = {"method": "off", "correction_um": 0.0}
        if p.focusing:
            # the target's film point: b across the axis, c - height above it (ShiftModel)
            focus = focus_for_tilt(
                em, index=step.index, tilt_deg=step.tilt_deg,
                done=[d.get("focus", {}) for d in ok],
                model=(partial(model_correction, model.b, model.height_error_um - t.height_um)
                       if len(prior) >= 3 else None),
                area=p.focus_area, every=p.autofocus_every,
                max_failures=p.autofocus_max_failures, log=log)
        result["focus"] = focus
        em.set_defocus(lens + float(focus["correction_um"]))
        exposure = (step.dose_e_per_a2 / record_settings.dose_rate_e_per_a2_s
                    if record_settings.dose_rate_e_per_a2_s > 0 else record_settings.exposure_s)
        settings = record_settings if exposure <= 0 else _with_exposure(record_settings, exposure)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, json.dumps({"tilt_deg": step.tilt_deg}))
        record = em.acquire(p.record_area, settings)
        result["record"] = save_frame(ctx.data_dir, f"{rel}.mrc", record)
        result.update(dose_e_per_a2=record.dose_e_per_a2, defocus_um=record.defocus_um,
                      planned_dose_e_per_a2=step.dose_e_per_a2)
        # listed so the journal records the frame with the step and clients get an event
        result["artifacts"] = [artifact(result["record"]["path"], "em_tilt", target=t.id,
                                        tilt_deg=step.tilt_deg,
                                        dose_e_per_a2=record.dose_e_per_a2)]
        write_text_atomic(sidecar, json.dumps(result))
        log.info("em.tilt.recorded", dose_e_per_a2=record.dose_e_per_a2,
                 image_shift_um=result["image_shift_um"], focus=focus["method"])
        return result

    def _track(self, ctx: StepContext, em: ElectronMicroscope, t: TargetSpec, step: TiltStep,
               ok: list[dict[str, Any]], prior: list[DoneTilt], predicted: FloatArray,
               offset: tuple[float, float], rel: str, result: StepResult,
               log: Any) -> FloatArray:
        """Trial shot, aligned to the nearest tilt done and to an anchor; sets and returns the
        image shift that centres the target, and records what each reference said."""
        p = self.p
        trial = em.acquire(p.track_area, None if p.track_settings is None
                           else p.track_settings.apply(em, p.track_area))
        result["trial"] = save_frame(ctx.data_dir, f"{rel}_trial.mrc", trial)
        h, w = trial.shape
        centre = trial.pixel_to_stage_xy(np.array([(w - 1) / 2.0, (h - 1) / 2.0]))
        refs = references(prior, step.tilt_deg, p.track_anchor_step_deg)
        measurements = []
        for k, ref in enumerate(refs):
            ref_result = next(d for d in ok if d["index"] == ref.order)
            a, change = track_to_reference(
                load_frame(ctx.data_dir, ref_result["trial"]), ref, trial, step.tilt_deg,
                axis_deg=p.tilt_axis_deg, height_um=t.height_um, search_um=p.track_search_um,
                epoch_offset_um=offset)
            measurements.append(Measurement(ref.angle_deg, change, a.score,
                                            anchor=k > 0 or len(refs) == 1))
        final = np.asarray(predicted, float)
        if measurements:
            delta, used = combine(measurements, min_score=p.track_min_score,
                                  max_disagreement_um=p.track_max_disagreement_um)
            if delta is None:
                log.warning("em.tilt.weak_tracking",
                            scores=[round(m.score, 3) for m in measurements])
            else:
                final = final + delta
            result["tracking"] = {
                "references": [{"tilt_deg": m.reference_deg, "score": round(m.score, 4),
                                "correction_um": [float(v) for v in m.delta_um],
                                "used": u} for m, u in zip(measurements, used, strict=True)],
                "correction_um": None if delta is None else [float(v) for v in delta],
                "applied": delta is not None}
            log.info("em.tilt.tracked", correction_um=None if delta is None
                     else [round(float(v), 4) for v in delta],
                     references=[m.reference_deg for m in measurements], used=used)
        anchor = centre + (final - predicted)
        result["trial_anchor_um"] = [float(anchor[0]), float(anchor[1])]
        em.set_image_shift(float(final[0]), float(final[1]))
        return final

    def _stack(self, t: TargetSpec) -> Action:
        def action(ctx: StepContext) -> StepResult:
            done = self._done(ctx, t, len(self.tilts.steps))
            ok = [d for d in done if d["status"] == "ok"]
            lost = [d["tilt_deg"] for d in done if d["status"] != "ok"]
            if not ok:
                raise LimitViolation(f"target {t.id}: no tilt was recorded, nothing to stack")
            images = [load_frame(ctx.data_dir, d["record"]) for d in ok]
            linear = images[0].pixel_to_stage[:, :2]
            rotation = math.degrees(math.atan2(linear[1, 0], linear[0, 0]))
            axis_in_image = (self.p.tilt_axis_deg - rotation + 180.0) % 360.0 - 180.0
            path = ctx.data_dir / f"target-{t.id}" / f"target-{t.id}.mrc"
            files = write_tilt_series(path, images, tilt_axis_deg=axis_in_image,
                                      voltage_kv=self.p.voltage_kv,
                                      target_defocus_um=self.p.target_defocus_um)
            rel = [str(Path(f).relative_to(ctx.data_dir)) for f in (files.mrc, files.mdoc,
                                                                     files.rawtlt)]
            total = float(sum(d["dose_e_per_a2"] for d in done))
            return {"mrc": rel[0], "mdoc": rel[1], "rawtlt": rel[2], "n_tilts": len(ok),
                    "lost_tilts_deg": lost, "total_dose_e_per_a2": total,
                    "tilts_deg": [d["tilt_deg"] for d in ok],
                    "artifacts": [artifact(rel[0], "em_tilt_series", target=t.id,
                                           n_tilts=len(ok), total_dose_e_per_a2=total),
                                  artifact(rel[1], "em_tilt_series_mdoc", target=t.id),
                                  artifact(rel[2], "em_tilt_angles", target=t.id)]}
        return action


def _with_exposure(settings: AcquisitionSettings, exposure_s: float) -> AcquisitionSettings:
    """The record settings with the exposure that gives this tilt its planned dose."""
    return replace(settings, exposure_s=exposure_s)
