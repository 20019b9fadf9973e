"""Targets for tomography: virus spots in the last live time point, proposed automatically.

AutoCLEM (docs/clem-workflow.md, step 4) projects the 488 z-stack of the last time point
(3D -> 2D maximum-intensity projection: the EM sees a projection too) and picks virus
particles in it; most extracellular particles sit still, and only those that stayed still
are worth transferring, since the grid is frozen minutes later. One step per time-lapse
position (``targets/pP``):

1. spots in the virus channel's projection of the last time point
   (protocols/lm_features.py: LoG, sub-pixel centres, score = response / noise);
2. the visits registered to each other. With two or more positions the stage leaves and
   comes back at every time point and lands ~1-2 um elsewhere each time, while the images
   carry the commanded position; the final set (405 added for the beads) is yet another
   visit. Linking spots through nominal stage coordinates would measure the stage's miss,
   not the particle's motion, and reject every static virus. So every earlier time point
   and the final set are registered to the last time point on ``register_channel`` (the
   cell tracker's projections, which do not change in minutes; lm_features.register_visits,
   misses up to ``max_visit_shift_um``), and a visit whose projections do not agree once
   aligned (``min_register_score``) is not used;
3. optionally only particles that stayed still: spots of every registered earlier time
   point, moved into the last time point's pixels, are linked backwards by nearest
   neighbour within ``link_radius_um``; a particle whose largest distance from its last
   position exceeds ``static_threshold_um`` is dropped (kept in the report with the reason);
4. targets over the cell body (``avoid_cell_body``: too thick for tomography) are dropped;
5. targets ranked for the bead correlation that will carry them to the EM: beads of the
   final set's ``bead_channel`` that lie off the cell (beads under a cell are hidden in the
   EM map) bound where the correlation interpolates; a target more than ``hull_margin_um``
   outside their hull gets an extrapolated, large predicted error and would likely be
   skipped, so targets inside come first, then the others by distance outside; then by score.

Targets carry ids (``p0-t001``), LM stage um (the last time point's nominal frame), pixels of
the last time point and of the final set (``final_x_px``, what the bead correlation uses), z,
score, displacement and distance outside the beads. Clients may add or remove targets through
the service; ``merge_targets`` applies those edits to the proposals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from drivers.imaging import Image, apply_affine, invert_affine
from protocols.lm_features import (
    Spots,
    beads_off_cell,
    cell_masks,
    detect_spots,
    max_projection,
    outside_hull_um,
    register_visits,
)
from protocols.lm_io import image_record, load_images, write_json
from protocols.plan import InvalidStep, Plan, Step, StepContext, StepResult

__all__ = ["Spots", "Target", "TargetExtractionParams", "TargetExtractionPlan",
           "detect_spots", "extract_targets", "link_static", "max_projection",
           "merge_targets"]

log = structlog.get_logger(__name__)
FloatArray = NDArray[np.float64]


class TargetExtractionParams(BaseModel):
    """Where the time-lapse is, which channels show what, the static filter and ranking."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["target_extraction"] = "target_extraction"
    timelapse_prefix: str = Field("timelapse", pattern=r"^[a-z0-9][a-z0-9_/-]*$")
    channel: str = Field("488", min_length=1)
    spot_sigma_um: float = Field(0.11, gt=0, le=5)
    threshold_sigmas: float = Field(8.0, gt=0)
    min_separation_um: float = Field(0.4, gt=0)
    static_only: bool = True
    #: With the visits registered a still particle wanders <= 20 nm (localisation and
    #: registration) while diffusing ones moved >= 0.35 um in 10 min (simulated sessions);
    #: 0.1 um keeps the first and drops a slow diffuser that would drift microns by freezing.
    static_threshold_um: float = Field(0.1, gt=0)
    link_radius_um: float = Field(2.5, gt=0)
    min_track_fraction: float = Field(0.8, ge=0, le=1)
    edge_margin_px: int = Field(4, ge=2)
    max_targets: int = Field(200, ge=1, le=10000)
    #: Channel whose projections register the visits of a position; None trusts the stage.
    register_channel: str | None = Field("640", min_length=1)
    min_register_score: float = Field(0.5, ge=-1, le=1)
    max_visit_shift_um: float = Field(5.0, gt=0, le=50)
    #: The final set's bead channel (None: no ranking by beads) and the cell channel whose
    #: mask hides beads from the EM.
    bead_channel: str | None = Field("405", min_length=1)
    cell_channel: str = Field("640", min_length=1)
    bead_sigma_um: float = Field(0.1, gt=0)
    bead_threshold_sigmas: float = Field(10.0, gt=0)
    bead_cell_margin_um: float = Field(1.0, ge=0)
    hull_margin_um: float = Field(5.0, ge=0)
    #: Refuse targets over the cell body (the cell channel above half its range: microns of
    #: cytoplasm no 300 kV beam crosses); AutoCLEM images the thin periphery.
    avoid_cell_body: bool = True
    prefix: str = Field("targets", pattern=r"^[a-z0-9][a-z0-9_/-]*$")


@dataclass(frozen=True)
class Target:
    """One proposed (or client-added) acquisition point in the LM stage frame."""

    id: str
    position: int
    x_um: float
    y_um: float
    z_um: float | None
    x_px: float | None
    y_px: float | None
    score: float
    source: Literal["auto", "client"] = "auto"
    displacement_um: float | None = None
    final_x_px: float | None = None
    final_y_px: float | None = None
    outside_beads_um: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "position": self.position, "frame": "lm_stage",
                "x": self.x_um, "y": self.y_um, "z": self.z_um, "x_px": self.x_px,
                "y_px": self.y_px, "score": self.score, "source": self.source,
                "displacement_um": self.displacement_um, "final_x_px": self.final_x_px,
                "final_y_px": self.final_y_px,
                "outside_beads_um": _finite_or_none(self.outside_beads_um)}


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def link_static(last_um: FloatArray, earlier_um: Sequence[FloatArray], link_radius_um: float
                ) -> tuple[FloatArray, NDArray[np.int_]]:
    """Largest distance of each last-time-point spot from its last position along a
    nearest-neighbour track back through ``earlier_um`` (latest first), and how many
    earlier time points it was found in. A track ends where no spot lies within the radius."""
    n = len(last_um)
    disp = np.zeros(n)
    found = np.zeros(n, dtype=int)
    current = last_um.copy()
    alive = np.ones(n, dtype=bool)
    for pts in earlier_um:
        if len(pts) == 0:
            alive[:] = False
            break
        d = np.hypot(current[:, None, 0] - pts[None, :, 0], current[:, None, 1] - pts[None, :, 1])
        j = np.argmin(d, axis=1)
        ok = alive & (d[np.arange(n), j] <= link_radius_um)
        current[ok] = pts[j[ok]]
        found[ok] += 1
        disp[ok] = np.maximum(disp[ok], np.hypot(*(current[ok] - last_um[ok]).T))
        alive &= ok
    return disp, found


def merge_targets(auto: Sequence[Target], added: Sequence[dict[str, Any]],
                  removed: Sequence[str]) -> list[Target]:
    """Proposals minus ``removed`` ids, plus client targets (``{id, x, y, z?, position?}``
    in LM stage um, the service's ``lm_stage`` frame). A client id equal to a proposal's
    replaces it (the client moved it); ids must be unique among the added."""
    gone = set(removed)
    ids = [str(a["id"]) for a in added]
    if len(set(ids)) != len(ids):
        raise InvalidStep(f"client targets repeat an id: {ids}")
    out = {t.id: t for t in auto if t.id not in gone}
    for a in added:
        if a.get("frame", "lm_stage") != "lm_stage":
            raise InvalidStep(f"client target {a['id']}: frame {a.get('frame')!r} is not "
                              "lm_stage; convert image targets to stage um first")
        if str(a["id"]) in gone:
            continue
        z = a.get("z")
        out[str(a["id"])] = Target(id=str(a["id"]), position=int(a.get("position", -1)),
                                   x_um=float(a["x"]), y_um=float(a["y"]),
                                   z_um=None if z is None else float(z), x_px=None, y_px=None,
                                   score=0.0, source="client")
    return sorted(out.values(), key=lambda t: (t.source != "client", -t.score, t.id))


class TargetExtractionPlan(Plan):
    """One step per time-lapse position: ``targets/pP`` (reads the time-lapse results)."""

    name = "target_extraction"

    def __init__(self, params: TargetExtractionParams) -> None:
        self.p = params

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        summary = ctx.result(f"{self.p.timelapse_prefix}/summary")
        for pos in summary["positions"]:
            yield Step(f"{self.p.prefix}/p{pos}", self._action(int(pos), summary),
                       title=f"virus targets at position {pos}", estimate_s=2.0)

    def _action(self, pos: int, summary: dict[str, Any]
                ) -> Callable[[StepContext], StepResult]:
        def action(ctx: StepContext) -> StepResult:
            rows = [r for r in summary["per_time_point"]
                    if r["p"] == pos and r["status"] == "acquired"]
            if not rows:
                raise InvalidStep(f"position {pos}: no acquired time point to take targets from")
            keys = [f"{self.p.timelapse_prefix}/p{pos}/t{r['t']:02d}" for r in rows]
            final = ctx.store.get(f"{self.p.timelapse_prefix}/p{pos}/final")
            return extract_targets(ctx, self.p, pos, [ctx.result(k)["path"] for k in keys],
                                   final)
        return action


def _spots(images: Sequence[Image], p: TargetExtractionParams) -> Spots:
    mip, _, ref = max_projection(images, p.channel)
    px = ref.pixel_size_um
    return detect_spots(mip, p.spot_sigma_um / px, p.threshold_sigmas,
                        p.min_separation_um / px, p.edge_margin_px)


def _register(reference: Sequence[Image], moving: Sequence[Image], p: TargetExtractionParams,
              by_stage: bool = False) -> dict[str, Any]:
    """Offset (px) from ``moving`` into ``reference`` and whether it is trusted; without a
    register channel (or ``by_stage``), the nominal stage difference (the stage trusted)."""
    if p.register_channel is None or by_stage:
        a_ref, a_mov = reference[0].pixel_to_stage, moving[0].pixel_to_stage
        off = apply_affine(invert_affine(a_ref), apply_affine(a_mov, np.zeros(2)))
        return {"offset_px": [float(v) for v in off], "score": None, "used": True,
                "how": "nominal stage"}
    reg = register_visits(max_projection(reference, p.register_channel)[0],
                          max_projection(moving, p.register_channel)[0],
                          reference[0].pixel_size_um, p.max_visit_shift_um)
    return {"offset_px": [float(v) for v in reg.offset_px], "score": reg.score,
            "used": bool(reg.score >= p.min_register_score),
            "how": f"registered on {p.register_channel}"}


@dataclass(frozen=True)
class _Stillness:
    reasons: list[str]              # per last-time-point spot; '' = static
    displacement_um: FloatArray
    visits: list[dict[str, Any]]


def _static_filter(ctx: StepContext, p: TargetExtractionParams, last_images: Sequence[Image],
                   last_um: FloatArray, earlier: Sequence[str]) -> _Stillness:
    """Link the last spots back through every registered earlier time point (latest first)."""
    to_stage = last_images[0].pixel_to_stage
    visits, pts = [], []
    for path in earlier:
        images = load_images(ctx, path)
        reg = _register(last_images, images, p)
        visits.append({"time_point": path, **reg})
        if reg["used"]:
            moved = _spots(images, p).xy_px + np.asarray(reg["offset_px"])
            pts.append(apply_affine(to_stage, moved).reshape(-1, 2))
        else:
            ctx.log.warning("targets.visit_not_registered", time_point=path,
                            score=reg["score"], min_score=p.min_register_score)
    disp, found = link_static(last_um, pts, p.link_radius_um)
    reasons = []
    for k in range(len(last_um)):
        if not pts:
            reasons.append(f"stillness unknown: none of {len(earlier)} earlier time points "
                           "registered (min_register_score)")
        elif found[k] < p.min_track_fraction * len(pts):
            reasons.append(f"tracked in {found[k]}/{len(pts)} earlier time points")
        elif disp[k] > p.static_threshold_um:
            reasons.append(f"moved {disp[k]:.2f} um > {p.static_threshold_um:g} um")
        else:
            reasons.append("")
    return _Stillness(reasons, disp, visits)


def _final_frame(ctx: StepContext, p: TargetExtractionParams, last_images: Sequence[Image],
                 final_step: StepResult | None) -> tuple[list[Image], dict[str, Any]] | None:
    """The final set and the offset from the last time point into its pixels. A final set
    that does not register is placed by the nominal stage (flagged: beads then meet targets
    with the stage's miss between them)."""
    if final_step is None:
        return None
    final_path = str(final_step["path"])
    final = load_images(ctx, final_path)
    reg = _register(final, last_images, p)
    if not reg["used"]:
        ctx.log.warning("targets.final_not_registered", path=final_path, score=reg["score"],
                        min_score=p.min_register_score)
        reg = {**_register(final, last_images, p, by_stage=True), "score": reg["score"],
               "used": False}
    # the step's own record of the frame keeps the instrument's frame id; the file does not
    return final, {"path": final_path, **reg,
                   "frame": final_step.get("frame") or image_record(final[0])}


def _beads_outside(final: Sequence[Image], p: TargetExtractionParams, targets_px: FloatArray
                   ) -> tuple[FloatArray, dict[str, Any]]:
    """Distance (um) of each target outside the hull of the final set's beads off the cell."""
    channels = {im.channel for im in final}
    if p.bead_channel is None or p.bead_channel not in channels:
        return np.full(len(targets_px), np.nan), {"channel": p.bead_channel, "beads_px": []}
    mip, _, ref = max_projection(final, p.bead_channel)
    px = ref.pixel_size_um
    beads = detect_spots(mip, p.bead_sigma_um / px, p.bead_threshold_sigmas, 0.5 / px)
    off = np.ones(len(beads), dtype=bool)
    if p.cell_channel in channels:
        cell, _ = cell_masks(max_projection(final, p.cell_channel)[0], px)
        off = beads_off_cell(beads.xy_px, cell, p.bead_cell_margin_um / px)
    outside = outside_hull_um(targets_px, beads.xy_px[off], px)
    return outside, {"channel": p.bead_channel, "beads_px": beads.xy_px.tolist(),
                     "off_cell": off.tolist()}


def extract_targets(ctx: StepContext, p: TargetExtractionParams, pos: int,
                    paths: Sequence[str], final: StepResult | None = None) -> StepResult:
    """Targets of one position from its time points' files (the last one gives the targets)
    and, if given, its final set's step result (see the module docstring)."""
    last_images = load_images(ctx, paths[-1])
    last = _spots(last_images, p)
    _, zmap, ref = max_projection(last_images, p.channel)
    to_stage = ref.pixel_to_stage
    last_um = apply_affine(to_stage, last.xy_px).reshape(-1, 2)
    earlier = list(paths[:-1][::-1])
    still = (_static_filter(ctx, p, last_images, last_um, earlier)
             if p.static_only and earlier else None)
    placed = _final_frame(ctx, p, last_images, final)
    final_px = last.xy_px + np.asarray(placed[1]["offset_px"]) if placed else None
    outside, beads = (_beads_outside(placed[0], p, final_px) if placed and final_px is not None
                      else (np.full(len(last), np.nan), {"channel": None, "beads_px": []}))
    body = _cell_body(last_images, p)
    kept: list[Target] = []
    rejected: list[dict[str, Any]] = []
    for k in range(len(last)):
        x_px, y_px = (float(v) for v in last.xy_px[k])
        z = zmap[round(y_px), round(x_px)]
        t = Target(id=f"p{pos}-t{k + 1:03d}", position=pos, x_um=float(last_um[k, 0]),
                   y_um=float(last_um[k, 1]), z_um=None if np.isnan(z) else float(z),
                   x_px=x_px, y_px=y_px, score=float(last.score[k]),
                   displacement_um=None if still is None else float(still.displacement_um[k]),
                   final_x_px=None if final_px is None else float(final_px[k, 0]),
                   final_y_px=None if final_px is None else float(final_px[k, 1]),
                   outside_beads_um=None if np.isnan(outside[k]) else float(outside[k]))
        if still is not None and still.reasons[k]:
            rejected.append({**t.as_json(), "reason": still.reasons[k]})
        elif body is not None and body[round(y_px), round(x_px)]:
            rejected.append({**t.as_json(), "reason": "on the cell body, too thick for "
                             "tomography (avoid_cell_body)"})
        else:
            kept.append(t)
    kept.sort(key=lambda t: _rank(t, p.hull_margin_um))
    for t in kept[p.max_targets:]:
        rejected.append({**t.as_json(), "reason": f"beyond max_targets ({p.max_targets})"})
    targets = kept[:p.max_targets]
    report = {"position": pos, "source": paths[-1], "time_points": list(paths),
              "pixel_to_stage": [[float(v) for v in row] for row in to_stage],
              "stage_to_pixel": [[float(v) for v in row] for row in invert_affine(to_stage)],
              "frame": image_record(ref), "visits": [] if still is None else still.visits,
              "final": None if placed is None else placed[1], "beads": beads,
              "targets": [t.as_json() for t in targets], "rejected": rejected}
    art = write_json(ctx, f"{p.prefix}/p{pos}.json", report, "lm_targets", position=pos)
    ctx.log.info("targets.extracted", position=pos, spots=len(last), targets=len(targets),
                 rejected=len(rejected),
                 offsets_px=[] if still is None else [v["offset_px"] for v in still.visits],
                 final_offset_px=None if placed is None else placed[1]["offset_px"])
    return {**report, "artifacts": [art]}


def _cell_body(images: Sequence[Image], p: TargetExtractionParams) -> NDArray[np.bool_] | None:
    """The thick part of the cell (cell mask less its thin periphery) in the last time point,
    or None when not asked for or the cell channel was not imaged."""
    if not p.avoid_cell_body or not any(im.channel == p.cell_channel for im in images):
        return None
    mip, _, ref = max_projection(images, p.cell_channel)
    cell, thin = cell_masks(mip, ref.pixel_size_um)
    return np.asarray(cell & ~thin, dtype=bool)


def _rank(t: Target, margin_um: float) -> tuple[int, float, float]:
    """Inside the beads (within the margin, or unknown) first by score; then the rest by
    how far outside they lie."""
    out = t.outside_beads_um
    if out is None or out <= margin_um:
        return (0, -t.score, 0.0)
    return (1, out, -t.score)
