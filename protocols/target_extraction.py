"""Targets for tomography: virus spots in the last live time point, proposed automatically.

AutoCLEM (docs/clem-workflow.md, step 4) projects the 488 z-stack of the last time point
(3D -> 2D maximum-intensity projection: the EM sees a projection too) and picks virus
particles in it; most extracellular particles sit still, and only those that stayed still
are worth transferring, since the grid is frozen minutes later. Here:

1. maximum-intensity projection of the virus channel, and per pixel the z of the maximum;
2. Laplacian-of-Gaussian candidates sized to a diffraction-limited spot (the 100 nm particle
   is far below the PSF), local maxima above ``threshold_sigmas`` robust noise levels;
3. sub-pixel centroids by a Gaussian fitted through the log-intensity of each peak and its
   neighbours along x and y (exact for a Gaussian spot, never rounded pixels), score =
   LoG response / noise;
4. optionally keep only particles that stayed still: spots of every earlier time point are
   linked backwards by nearest neighbour within ``link_radius_um`` (stage um, so the track
   survives a re-centred stage), and a particle whose largest distance from its last
   position exceeds ``static_threshold_um`` is dropped (kept in the report with the reason).

Targets carry ids (``p0-t001``), LM stage um, pixels of the projection, z and score.
Clients may add or remove targets through the service; ``merge_targets`` applies those edits
to the proposals. (The LoG detector is a minimal one of its own: protocols/correlation's
spot finder was not committed when this was written.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from drivers.imaging import Image, apply_affine, invert_affine
from protocols.lm_io import load_images, write_json
from protocols.plan import InvalidStep, Plan, Step, StepContext, StepResult

__all__ = ["Spots", "Target", "TargetExtractionParams", "TargetExtractionPlan",
           "detect_spots", "link_static", "max_projection", "merge_targets"]

log = structlog.get_logger(__name__)
FloatArray = NDArray[np.float64]


class TargetExtractionParams(BaseModel):
    """Where the time-lapse is, which channel shows the virus, and the static filter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["target_extraction"] = "target_extraction"
    timelapse_prefix: str = Field("timelapse", pattern=r"^[a-z0-9][a-z0-9_/-]*$")
    channel: str = Field("488", min_length=1)
    spot_sigma_um: float = Field(0.11, gt=0, le=5)
    threshold_sigmas: float = Field(8.0, gt=0)
    min_separation_um: float = Field(0.4, gt=0)
    static_only: bool = True
    static_threshold_um: float = Field(0.5, gt=0)
    link_radius_um: float = Field(2.5, gt=0)
    min_track_fraction: float = Field(0.8, ge=0, le=1)
    edge_margin_px: int = Field(4, ge=2)
    max_targets: int = Field(200, ge=1, le=10000)
    prefix: str = Field("targets", pattern=r"^[a-z0-9][a-z0-9_/-]*$")


@dataclass(frozen=True)
class Spots:
    """Detected spots: ``xy_px`` (N, 2) as (column, row) sub-pixel, strongest first."""

    xy_px: FloatArray
    score: FloatArray
    amplitude: FloatArray

    def __len__(self) -> int:
        return int(self.xy_px.shape[0])


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

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "position": self.position, "frame": "lm_stage",
                "x": self.x_um, "y": self.y_um, "z": self.z_um, "x_px": self.x_px,
                "y_px": self.y_px, "score": self.score, "source": self.source,
                "displacement_um": self.displacement_um}


def max_projection(images: Sequence[Image], channel: str
                   ) -> tuple[FloatArray, NDArray[np.float64], Image]:
    """MIP of one channel's z planes, the z (um) of each pixel's maximum, and one plane."""
    planes = [im for im in images if im.channel == channel]
    if not planes:
        raise InvalidStep(f"no {channel!r} planes to project (channels: "
                          f"{sorted({im.channel or '' for im in images})})")
    stack = np.stack([np.asarray(im.data, dtype=np.float64) for im in planes])
    arg = np.argmax(stack, axis=0)
    zs = np.array([np.nan if im.z_um is None else float(im.z_um) for im in planes])
    return stack.max(axis=0), zs[arg], planes[0]


def _robust_sd(values: FloatArray) -> float:
    v = values.ravel()
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def detect_spots(image: FloatArray, sigma_px: float, threshold_sigmas: float,
                 min_separation_px: float, edge_margin_px: int = 4) -> Spots:
    """LoG spots with sub-pixel centres (see the module docstring)."""
    img = np.asarray(image, dtype=np.float64)
    resp = -(sigma_px ** 2) * ndimage.gaussian_laplace(img, sigma_px, mode="nearest")
    noise = _robust_sd(resp) or 1e-12
    size = 2 * max(1, round(min_separation_px)) + 1
    peaks = (resp == ndimage.maximum_filter(resp, size=size, mode="nearest"))
    peaks &= resp > threshold_sigmas * noise
    m = max(2, edge_margin_px)
    peaks[:m], peaks[-m:], peaks[:, :m], peaks[:, -m:] = False, False, False, False
    rc = np.argwhere(peaks)
    smooth = ndimage.gaussian_filter(img, 0.5)
    background = float(np.median(img))
    xy, score, amp = [], [], []
    for r, c in rc:
        dx = _log_parabola(smooth[r, c - 1:c + 2] - background)
        dy = _log_parabola(smooth[r - 1:r + 2, c] - background)
        xy.append((c + dx, r + dy))
        score.append(resp[r, c] / noise)
        amp.append(img[r, c] - background)
    if not xy:
        return Spots(np.zeros((0, 2)), np.zeros(0), np.zeros(0))
    order = np.argsort(-np.asarray(score), kind="stable")
    return Spots(np.asarray(xy)[order], np.asarray(score)[order], np.asarray(amp)[order])


def _log_parabola(v: FloatArray) -> float:
    """Offset of a Gaussian's peak from the middle of three samples (in samples)."""
    a = np.log(np.clip(v, 1e-6, None))
    denom = a[0] - 2 * a[1] + a[2]
    if denom >= 0:
        return 0.0
    return float(np.clip(0.5 * (a[0] - a[2]) / denom, -0.5, 0.5))


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

    def _action(self, pos: int, summary: dict[str, Any]) -> Any:
        def action(ctx: StepContext) -> StepResult:
            rows = [r for r in summary["per_time_point"]
                    if r["p"] == pos and r["status"] == "acquired"]
            if not rows:
                raise InvalidStep(f"position {pos}: no acquired time point to take targets from")
            keys = [f"{self.p.timelapse_prefix}/p{pos}/t{r['t']:02d}" for r in rows]
            return extract_targets(ctx, self.p, pos, [ctx.result(k)["path"] for k in keys])
        return action


def _spots_um(images: Sequence[Image], p: TargetExtractionParams
              ) -> tuple[Spots, FloatArray, Image, FloatArray]:
    mip, zmap, ref = max_projection(images, p.channel)
    px = ref.pixel_size_um
    spots = detect_spots(mip, p.spot_sigma_um / px, p.threshold_sigmas,
                         p.min_separation_um / px, p.edge_margin_px)
    return spots, apply_affine(ref.pixel_to_stage, spots.xy_px).reshape(-1, 2), ref, zmap


def extract_targets(ctx: StepContext, p: TargetExtractionParams, pos: int,
                    paths: Sequence[str]) -> StepResult:
    """Targets of one position from its time points' files (the last one gives the targets)."""
    last, last_um, ref, zmap = _spots_um(load_images(ctx, paths[-1]), p)
    disp = np.zeros(len(last))
    found = np.zeros(len(last), dtype=int)
    earlier = paths[:-1][::-1]
    if p.static_only and earlier:
        pts = [_spots_um(load_images(ctx, path), p)[1] for path in earlier]
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
              "pixel_to_stage": [[float(v) for v in row] for row in ref.pixel_to_stage],
              "stage_to_pixel": [[float(v) for v in row]
                                 for row in invert_affine(ref.pixel_to_stage)],
              "targets": [t.as_json() for t in targets], "rejected": rejected}
    art = write_json(ctx, f"{p.prefix}/p{pos}.json", report, "lm_targets", position=pos)
    ctx.log.info("targets.extracted", position=pos, spots=len(last), targets=len(targets),
                 rejected=len(rejected))
    return {**report, "artifacts": [art]}
