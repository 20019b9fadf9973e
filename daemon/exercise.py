"""The "exercise" template: a small LM and EM session that moves, images and records files.

It uses only the drivers/base.py contracts, so it runs on the simulators and on real
instruments alike, and it is what the service's own tests (kill -9 and restart) run. Each
position is one keyed step that moves the stage, acquires, writes the (centre-cropped)
image to ``lm/pos-000.npy`` or ``em/pos-000.npy`` and lists it as an artifact. Optionally an
operator checkpoint sits between LM and EM ("freeze the grid and load it into the EM"), and
the EM visits every target submitted in the ``em_stage`` frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from daemon.artifacts import write_npy
from daemon.templates import SessionEnv
from drivers.base import Image, LimitViolation, LowDoseArea
from protocols.plan import Plan, Step, StepContext, StepResult


class ExerciseParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    positions: int = Field(default=4, ge=1, le=1000)
    spacing_um: float = Field(default=50.0, gt=0, le=5000)
    origin_um: tuple[float, float] = (0.0, 0.0)
    lm: bool = True
    em: bool = True
    checkpoint: bool = False
    lm_channel: str | None = Field(default=None, min_length=1)
    em_area: LowDoseArea = LowDoseArea.VIEW
    visit_targets: bool = False
    crop_px: int = Field(default=64, ge=4, le=4096)


def positions(p: ExerciseParams) -> list[tuple[float, float]]:
    """A near-square raster of ``p.positions`` stage positions around ``origin_um``."""
    cols = math.ceil(math.sqrt(p.positions))
    out = []
    for i in range(p.positions):
        r, c = divmod(i, cols)
        out.append((p.origin_um[0] + (c - (cols - 1) / 2) * p.spacing_um,
                    p.origin_um[1] + (r - (cols - 1) / 2) * p.spacing_um))
    return out


def _crop(data: NDArray[Any], size: int) -> NDArray[Any]:
    h, w = data.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(data[top:top + size, left:left + size])


def _record(ctx: StepContext, rel: str, img: Image, crop_px: int) -> StepResult:
    meta = {"instrument": img.instrument, "stage_um": list(img.stage_um),
            "pixel_size_um": img.pixel_size_um, "shape": list(img.shape),
            "channel": img.channel, "time_s": img.time_s}
    spec = write_npy(ctx.data_dir, rel, _crop(img.data, crop_px), kind=f"{img.instrument}_image",
                     meta=meta)
    return {"artifacts": [spec], "stage_um": list(img.stage_um), "shape": list(img.shape)}


class ExercisePlan(Plan):
    """LM raster, optional checkpoint, EM raster, optional EM visits to submitted targets."""

    name = "exercise"

    def __init__(self, params: ExerciseParams, env: SessionEnv) -> None:
        self.p = params
        self.env = env
        self.xy = positions(params)

    def validate(self, ctx: StepContext) -> None:
        if self.p.lm:
            lm = ctx.require_lm()
            for x, y in self.xy:
                lm.limits.check_xy(x, y)
            if self.p.lm_channel is not None and self.p.lm_channel not in lm.channels:
                raise LimitViolation(f"channel {self.p.lm_channel!r} not available "
                                     f"(lm.channels: {sorted(lm.channels)})")
        if self.p.em or self.p.visit_targets:
            em = ctx.require_em()
            for x, y in self.xy:
                em.limits.check_xy(x, y)
            if self.p.em_area not in em.low_dose:
                raise LimitViolation(f"low-dose area {self.p.em_area.name} is not configured "
                                     f"(em.low_dose)")

    def total_steps(self, ctx: StepContext) -> int | None:
        if self.p.visit_targets:
            return None
        return self.p.positions * (int(self.p.lm) + int(self.p.em)) + int(self.p.checkpoint)

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        if self.p.lm:
            for i, (x, y) in enumerate(self.xy):
                yield Step(f"lm/pos-{i:03d}", self._lm_action(i, x, y), title=f"LM position {i}",
                           estimate_s=2.0, instrument="lm")
        if self.p.checkpoint:
            yield Step("operator/load-em", lambda c: {"confirmed": True},
                       title="Freeze the grid and load it into the EM", checkpoint=True)
        if self.p.em:
            for i, (x, y) in enumerate(self.xy):
                yield Step(f"em/pos-{i:03d}", self._em_action(f"em/pos-{i:03d}.npy", x, y),
                           title=f"EM position {i}", estimate_s=5.0, instrument="em")
        if self.p.visit_targets:
            yield Step("targets/snapshot", self._snapshot, title="Read the targets to visit")
            for t in ctx.result("targets/snapshot")["targets"]:
                yield Step(f"em/target-{t['id']}",
                           self._em_action(f"em/target-{t['id']}.npy", t["x"], t["y"]),
                           title=f"EM target {t['id']}", estimate_s=5.0, instrument="em")

    def _lm_action(self, i: int, x: float, y: float) -> Any:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            lm.move_xy(x, y)
            img = lm.snap(self.p.lm_channel)
            return _record(ctx, f"lm/pos-{i:03d}.npy", img, self.p.crop_px)
        return action

    def _em_action(self, rel: str, x: float, y: float) -> Any:
        def action(ctx: StepContext) -> StepResult:
            em = ctx.require_em()
            em.move_stage(x, y)
            img = em.acquire(self.p.em_area)
            return _record(ctx, rel, img, self.p.crop_px)
        return action

    def _snapshot(self, ctx: StepContext) -> StepResult:
        wanted = [t for t in self.env.targets() if t["frame"] == "em_stage"]
        return {"targets": [{"id": t["id"], "x": t["x"], "y": t["y"]} for t in wanted]}


def _instruments(p: ExerciseParams) -> frozenset[str]:
    return frozenset({"lm"} if p.lm else set()) | frozenset(
        {"em"} if (p.em or p.visit_targets) else set())


def clemd_templates() -> list[tuple[Any, ...]]:
    description = ("LM and EM raster that images N positions and records each file; for "
                   "tests, commissioning and benchmarks")
    return [("exercise", ExerciseParams, ExercisePlan, _instruments, description)]

