"""Virus targets of a multi-position time-lapse, with the stage's misses taken out.

Why the session does not use TargetExtractionPlan's action as it is: with two or more
squares the time-lapse visits each position again at every time point, and each visit lands
the stage ~1 um elsewhere (repeatability and backlash) while the images carry the commanded
position. Linking spots through nominal stage coordinates then sees every static virus
"move" by the stage's miss and rejects them all; and the final set (405 for the beads) is
taken on yet another visit, so its pixels are not the last time point's.

Both are the same problem, solved the same way: the cell-tracker channel (640) shows large
structures that do not change in minutes, so phase correlation of its maximum projections
measures the offset between two visits to sub-pixel precision. Spots of earlier time points
are moved into the last time point's pixels before the static filter links them (the step
keeps TargetExtractionPlan's key ``targets/pK`` and result layout), and the square's targets
are moved from the last time point's pixels into the final set's before bead correlation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from skimage.registration import phase_cross_correlation

from drivers.imaging import Image, apply_affine, invert_affine
from protocols.lm_io import load_images, write_json
from protocols.plan import InvalidStep, Step, StepContext, StepResult
from protocols.target_extraction import (
    Target,
    TargetExtractionParams,
    detect_spots,
    link_static,
    max_projection,
)

__all__ = ["extract_registered", "extraction_steps", "visit_offset_px"]

FloatArray = NDArray[np.float64]


def visit_offset_px(reference: Sequence[Image], moving: Sequence[Image], channel: str
                    ) -> FloatArray:
    """(dx, dy) pixels to add to a point of ``moving`` to find it in ``reference``."""
    ref = max_projection(reference, channel)[0]
    mov = max_projection(moving, channel)[0]
    shift, _, _ = phase_cross_correlation(  # type: ignore[no-untyped-call]  # skimage is untyped
        ref, mov, upsample_factor=20, normalization=None)
    return np.array([float(shift[1]), float(shift[0])])


def _spots(images: Sequence[Image], p: TargetExtractionParams) -> tuple[Any, FloatArray, Image]:
    mip, zmap, ref = max_projection(images, p.channel)
    px = ref.pixel_size_um
    spots = detect_spots(mip, p.spot_sigma_um / px, p.threshold_sigmas,
                         p.min_separation_um / px, p.edge_margin_px)
    return spots, zmap, ref


def extract_registered(ctx: StepContext, p: TargetExtractionParams, pos: int,
                       paths: Sequence[str], register_channel: str) -> StepResult:
    """Targets of one position from its time points (the last one gives the targets), as
    protocols/target_extraction.py's ``extract_targets`` but with every earlier time point
    registered to the last on ``register_channel`` first."""
    last_images = load_images(ctx, paths[-1])
    last, zmap, ref = _spots(last_images, p)
    to_stage = ref.pixel_to_stage
    last_um = apply_affine(to_stage, last.xy_px).reshape(-1, 2)
    earlier = list(paths[:-1][::-1])
    disp = np.zeros(len(last))
    found = np.zeros(len(last), dtype=int)
    offsets = []
    if p.static_only and earlier:
        pts = []
        for path in earlier:
            images = load_images(ctx, path)
            spots, _, _ = _spots(images, p)
            off = visit_offset_px(last_images, images, register_channel)
            offsets.append({"time_point": path, "offset_px": off.tolist()})
            pts.append(apply_affine(to_stage, spots.xy_px + off).reshape(-1, 2))
        disp, found = link_static(last_um, pts, p.link_radius_um)
    targets: list[Target] = []
    rejected: list[dict[str, Any]] = []
    for k in range(len(last)):
        x_px, y_px = (float(v) for v in last.xy_px[k])
        reason = ""
        if p.static_only and earlier:
            if found[k] < p.min_track_fraction * len(earlier):
                reason = f"tracked in {found[k]}/{len(earlier)} earlier time points"
            elif disp[k] > p.static_threshold_um:
                reason = f"moved {disp[k]:.2f} um > {p.static_threshold_um:g} um"
        z = zmap[round(y_px), round(x_px)]
        t = Target(id=f"p{pos}-t{k + 1:03d}", position=pos, x_um=float(last_um[k, 0]),
                   y_um=float(last_um[k, 1]), z_um=None if np.isnan(z) else float(z),
                   x_px=x_px, y_px=y_px, score=float(last.score[k]),
                   displacement_um=float(disp[k]) if p.static_only and earlier else None)
        if reason:
            rejected.append({**t.as_json(), "reason": reason})
        elif len(targets) < p.max_targets:
            targets.append(t)
    report = {"position": pos, "source": paths[-1], "time_points": list(paths),
              "pixel_to_stage": [[float(v) for v in row] for row in to_stage],
              "stage_to_pixel": [[float(v) for v in row] for row in invert_affine(to_stage)],
              "registered_on": register_channel, "visit_offsets": offsets,
              "targets": [t.as_json() for t in targets], "rejected": rejected}
    art = write_json(ctx, f"{p.prefix}/p{pos}.json", report, "lm_targets", position=pos)
    ctx.log.info("targets.extracted", position=pos, spots=len(last), targets=len(targets),
                 rejected=len(rejected), offsets_px=[o["offset_px"] for o in offsets])
    return {**report, "artifacts": [art]}


def extraction_steps(ctx: StepContext, p: TargetExtractionParams, register_channel: str
                     ) -> Iterator[Step]:
    """TargetExtractionPlan's steps (``targets/pP``, one per time-lapse position) with the
    registered extraction as their action."""
    summary = ctx.result(f"{p.timelapse_prefix}/summary")
    for pos in summary["positions"]:
        yield Step(f"{p.prefix}/p{pos}", _action(p, int(pos), summary, register_channel),
                   title=f"virus targets at position {pos}", estimate_s=2.0)


def _action(p: TargetExtractionParams, pos: int, summary: dict[str, Any],
            register_channel: str) -> Callable[[StepContext], StepResult]:
    def run(ctx: StepContext) -> StepResult:
        rows = [r for r in summary["per_time_point"]
                if r["p"] == pos and r["status"] == "acquired"]
        if not rows:
            raise InvalidStep(f"position {pos}: no acquired time point to take targets from")
        keys = [f"{p.timelapse_prefix}/p{pos}/t{r['t']:02d}" for r in rows]
        return extract_registered(ctx, p, pos, [ctx.result(k)["path"] for k in keys],
                                  register_channel)
    return run
