"""Square selection: find the grid squares in the LM atlas, rank them, inspect, choose.

AutoCLEM step 2 (docs/clem-workflow.md): a good square has intact film, one or two
well-spread cells whose thin periphery lies near the square centre, and at least 4-5 beads
around it. "Around" matters: beads under the cell are hidden in the EM map, and the bead
correlation is only trusted inside the hull of the beads it matched, so the beads off the
cell must surround the periphery where the viruses are. The atlas (20x transmitted light)
shows the film and roughly where cells are; beads, metal in the opening and the periphery
need 100x (protocols/lm_inspection.py). Thick ice forms at plunge-freezing, after the
choice, and no light image before it can show it: it is not a criterion here. The plan:

1. ``squares/find``: the bar lattice from the atlas: open (bright) regions of the
   transmitted-light atlas, their centroids in stage um through the atlas affine, the
   lattice fitted to the whole squares (so a square cut by the rim or a finder mark still
   gets its true centre), and per square from the atlas: brightness against the typical
   intact square (a torn film transmits ~3 % more; the atlas is flat-field corrected),
   metal inside (the centre mark, debris) and DIC texture near the centre (cells);
2. ``lm-inspect/<key>``: the ``inspect`` best candidates at 100x;
3. ``squares/select``: the ranked list with reasons; ``override`` (an operator's or
   client's choice of square keys) replaces the automatic choice, ``exclude`` removes keys.

Squares are keyed by lattice index from the square nearest ``centre_um``: ``sq+1-2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from skimage.filters import threshold_otsu

from drivers.imaging import apply_affine, invert_affine
from protocols.lm_atlas import load_atlas
from protocols.lm_inspection import InspectionParams, inspect_square
from protocols.lm_io import write_json
from protocols.plan import InvalidStep, Plan, Step, StepContext, StepResult

__all__ = ["Lattice", "SquareSelectionParams", "SquareSelectionPlan", "SquareSite",
           "atlas_scores", "find_squares", "rank_squares"]

FloatArray = NDArray[np.float64]


class SquareSelectionParams(BaseModel):
    """Grid geometry hints (200 mesh by default), how many squares to inspect and choose."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["square_selection"] = "square_selection"
    atlas_key: str = Field("lm-atlas/stitch", min_length=1)
    centre_um: tuple[float, float] = (0.0, 0.0)
    pitch_um: float = Field(125.0, gt=0)
    bar_width_um: float = Field(35.0, gt=0)
    transmitted_channel: str = Field("BF", min_length=1)
    texture_channel: str = Field("DIC", min_length=1)
    broken_brightness_ratio: float = Field(1.016, gt=1)
    max_interior_metal: float = Field(0.05, ge=0, le=1)
    inspect: int = Field(6, ge=0, le=400)
    select: int = Field(2, ge=1, le=100)
    #: Beads off the cell (visible in the EM map) for full marks. The paper asks for 4-5
    #: around the cell; an automatic match needs >= 5 pairs (protocols/correlation/points.py)
    #: after 20-30% of beads are lost at freezing, hence 8 seen in the light.
    min_beads: int = Field(8, ge=0)
    max_cells: int = Field(2, ge=1)
    min_periphery_in_beads: float = Field(0.6, ge=0, le=1)
    fill_below_criteria: bool = False
    override: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    inspection: InspectionParams = Field(
        default_factory=lambda: InspectionParams.model_validate({}))
    prefix: str = Field("squares", pattern=r"^[a-z0-9][a-z0-9_/-]*$")
    inspect_prefix: str = Field("lm-inspect", pattern=r"^[a-z0-9][a-z0-9_/-]*$")


@dataclass(frozen=True)
class Lattice:
    """Square centres ``origin + u * a + v * b`` in stage um."""

    origin_um: tuple[float, float]
    a_um: tuple[float, float]
    b_um: tuple[float, float]

    def centre(self, u: int, v: int) -> FloatArray:
        out: FloatArray = (np.asarray(self.origin_um) + u * np.asarray(self.a_um)
                           + v * np.asarray(self.b_um))
        return out

    def index(self, xy_um: FloatArray) -> NDArray[np.int_]:
        m = np.column_stack([self.a_um, self.b_um])
        return np.rint((np.asarray(xy_um) - self.origin_um) @ np.linalg.inv(m).T).astype(int)


@dataclass(frozen=True)
class SquareSite:
    """One square as the atlas shows it; fractions in [0, 1], ratios against typical."""

    key: str
    u: int
    v: int
    centre_um: tuple[float, float]
    open_fraction: float
    partial: bool
    brightness_ratio: float = 1.0
    interior_metal: float = 0.0
    texture_ratio: float = 1.0

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["centre_um"] = list(self.centre_um)
        return d


def square_key(u: int, v: int) -> str:
    return f"sq{u:+d}{v:+d}"


def _open_mask(bf: FloatArray) -> NDArray[np.bool_]:
    step = max(1, math.ceil(math.sqrt(bf.size / 4e6)))
    level = float(threshold_otsu(bf[::step, ::step]))  # type: ignore[no-untyped-call]  # skimage is untyped
    return np.asarray(bf > level)


def find_squares(bf: FloatArray, pixel_to_stage: FloatArray, p: SquareSelectionParams
                 ) -> tuple[Lattice, list[SquareSite]]:
    """The bar lattice and every (whole or partial) square the atlas shows.

    Raises InvalidStep when fewer than three whole squares are found (no lattice to fit).
    """
    px = float(np.sqrt(abs(np.linalg.det(pixel_to_stage[:, :2]))))
    opening = p.pitch_um - p.bar_width_um
    expected = opening * opening / (px * px)
    mask = _open_mask(bf)
    labels, n = ndimage.label(mask)
    if n == 0:
        raise InvalidStep("no open area in the atlas: is it a transmitted-light image?")
    idx = np.arange(1, n + 1)
    areas = np.asarray(ndimage.sum(mask, labels, idx))
    cents = np.asarray(ndimage.center_of_mass(mask, labels, idx)).reshape(-1, 2)[:, ::-1]
    whole = (areas >= 0.8 * expected) & (areas <= 1.15 * expected)
    some = (areas >= 0.15 * expected) & (areas <= 1.15 * expected)
    if whole.sum() < 3:
        raise InvalidStep(f"only {int(whole.sum())} whole squares of ~{opening:g} um found in "
                          "the atlas; check pitch_um and bar_width_um")
    xy = apply_affine(pixel_to_stage, cents)
    lattice = _fit_lattice(xy[whole], p)
    sites: dict[tuple[int, int], SquareSite] = {}
    for k in np.nonzero(some)[0]:
        u, v = (int(i) for i in lattice.index(xy[k]))
        c = lattice.centre(u, v)
        frac = float(min(1.0, areas[k] / expected))
        prev = sites.get((u, v))
        if prev is not None and prev.open_fraction >= frac:
            continue
        sites[(u, v)] = SquareSite(square_key(u, v), u, v, (float(c[0]), float(c[1])), frac,
                                   partial=not bool(whole[k]))
    return lattice, sorted(sites.values(), key=lambda s: (s.v, s.u))


def _fit_lattice(xy: FloatArray, p: SquareSelectionParams) -> Lattice:
    """Lattice through whole-square centroids: angle from neighbour vectors (mod 90 deg),
    then least squares of origin and both vectors over the indexed squares."""
    d = xy[None, :, :] - xy[:, None, :]
    dist = np.hypot(d[..., 0], d[..., 1])
    near = (dist > 0.75 * p.pitch_um) & (dist < 1.25 * p.pitch_um)
    if not near.any():
        raise InvalidStep(f"no two squares one pitch ({p.pitch_um:g} um) apart in the atlas")
    ang = np.arctan2(d[..., 1][near], d[..., 0][near])
    theta = float(np.angle(np.mean(np.exp(4j * ang)))) / 4
    pitch = float(np.median(dist[near]))
    a = pitch * np.array([math.cos(theta), math.sin(theta)])
    b = np.array([-a[1], a[0]])
    ref = xy[int(np.argmin(np.hypot(*(xy - np.asarray(p.centre_um)).T)))]
    rough = Lattice((float(ref[0]), float(ref[1])), (float(a[0]), float(a[1])),
                    (float(b[0]), float(b[1])))
    uv = rough.index(xy)
    design = np.column_stack([np.ones(len(xy)), uv[:, 0], uv[:, 1]])
    coef, *_ = np.linalg.lstsq(design, xy, rcond=None)
    return Lattice((float(coef[0, 0]), float(coef[0, 1])), (float(coef[1, 0]), float(coef[1, 1])),
                   (float(coef[2, 0]), float(coef[2, 1])))


def atlas_scores(bf: FloatArray, dic: FloatArray | None, pixel_to_stage: FloatArray,
                 sites: list[SquareSite], p: SquareSelectionParams) -> list[SquareSite]:
    """Brightness, interior metal and centre texture of each square from the atlas."""
    to_px = invert_affine(pixel_to_stage)
    px = float(np.sqrt(abs(np.linalg.det(pixel_to_stage[:, :2]))))
    half = 0.35 * (p.pitch_um - p.bar_width_um) / px
    mask = _open_mask(bf)
    hp = None
    if dic is not None:
        hp = np.abs(dic - ndimage.gaussian_filter(dic, max(1.0, 3.0 / px)))
    raw = []
    for s in sites:
        cx, cy = apply_affine(to_px, np.asarray(s.centre_um))
        r0, r1 = int(max(0, cy - half)), int(min(bf.shape[0], cy + half + 1))
        c0, c1 = int(max(0, cx - half)), int(min(bf.shape[1], cx + half + 1))
        if r1 - r0 < 3 or c1 - c0 < 3:
            raw.append((np.nan, 1.0, np.nan))
            continue
        m = mask[r0:r1, c0:c1]
        bright = float(np.median(bf[r0:r1, c0:c1][m])) if m.any() else np.nan
        tex = float(np.mean(hp[r0:r1, c0:c1]) / max(float(np.median(dic[r0:r1, c0:c1])), 1e-9)
                    ) if hp is not None and dic is not None else np.nan
        raw.append((bright, float(1.0 - m.mean()), tex))
    arr = np.array(raw, dtype=float)
    whole = np.array([not s.partial for s in sites]) & np.isfinite(arr[:, 0])
    ref_b = float(np.median(arr[whole, 0])) if whole.any() else 1.0
    tex_ok = whole & np.isfinite(arr[:, 2])
    ref_t = float(np.percentile(arr[tex_ok, 2], 20)) if tex_ok.any() else 1.0
    out = []
    for s, (b, metal, t) in zip(sites, arr, strict=True):
        out.append(SquareSite(s.key, s.u, s.v, s.centre_um, s.open_fraction, s.partial,
                              float(b / ref_b) if np.isfinite(b) else 0.0, float(metal),
                              float(t / ref_t) if np.isfinite(t) and ref_t > 0 else 1.0))
    return out


def atlas_verdict(s: SquareSite, p: SquareSelectionParams) -> tuple[float, list[str]]:
    """Pre-score from the atlas alone (0 = unusable) and the reasons."""
    reasons = []
    if s.partial:
        reasons.append(f"cut by the rim or the atlas edge ({s.open_fraction:.0%} open)")
    if s.brightness_ratio > p.broken_brightness_ratio:
        reasons.append(f"broken film: {s.brightness_ratio - 1:+.1%} brighter than intact squares")
    if s.interior_metal > p.max_interior_metal:
        reasons.append(f"metal in the square ({s.interior_metal:.0%}: centre mark or debris)")
    if reasons:
        return 0.0, reasons
    return float(s.texture_ratio), [f"DIC texture near centre x{s.texture_ratio:.2f}"]


def rank_squares(sites: list[SquareSite], inspected: dict[str, dict[str, Any]],
                 p: SquareSelectionParams) -> list[dict[str, Any]]:
    """All squares, best first, each with its score and the reasons for it.

    Inspected squares are ranked above the rest by their 100x evidence: intact film (the
    hole lattice), no metal in the opening, 1..``max_cells`` cells, beads off the cell (full
    marks from ``min_beads``: beads under a cell are hidden in the EM map), the thin
    periphery near the centre, and how much of it the beads' hull covers (targets outside
    it are extrapolated and skipped). Squares meeting every criterion rank first (score
    >= 2), usable ones below them (>= 1); a square the atlas already refused (rim, torn,
    metal) or with metal at 100x scores 0; the others keep their atlas pre-score (< 1).
    """
    rows = []
    for s in sites:
        pre, reasons = atlas_verdict(s, p)
        row: dict[str, Any] = {"key": s.key, "centre_um": list(s.centre_um),
                               "atlas": s.as_json(), "atlas_score": pre, "inspected": False}
        sc = inspected.get(s.key)
        score = 0.0
        if sc is not None:
            row["inspected"], row["inspection"] = True, sc
            score, reasons, meets = _inspected_score(sc, pre, reasons, p)
            row["meets_criteria"] = meets
        else:
            score = 0.0 if pre == 0 else min(0.99, 0.1 * pre)
        row.setdefault("meets_criteria", False)
        row["score"], row["reasons"] = float(score), reasons
        rows.append(row)
    rows.sort(key=lambda r: (-r["score"], r["key"]))
    return rows


def _inspected_score(sc: dict[str, Any], pre: float, atlas_reasons: list[str],
                     p: SquareSelectionParams) -> tuple[float, list[str], bool]:
    """Score, reasons and whether every criterion is met, from one 100x inspection."""
    reasons = list(atlas_reasons) if pre == 0 else []
    usable = pre > 0
    film = 1.0 if sc["film_ok"] else 0.0
    if not sc["film_ok"]:
        reasons.append(f"no hole lattice at 100x (ratio {sc['film_ratio']:.1f}): broken film")
    metal = float(sc.get("metal_fraction", 0.0))
    if metal > p.max_interior_metal:
        usable = False
        reasons.append(f"metal in the opening at 100x ({metal:.0%}: centre mark or debris)")
    n = int(sc["cells"])
    cells = 1.0 if 1 <= n <= p.max_cells else (0.3 if n > p.max_cells else 0.0)
    reasons.append(f"{n} cell(s)" + ("" if cells == 1.0 else f" (want 1-{p.max_cells})"))
    off = int(sc.get("beads_off_cell", sc["beads"]))
    beads = min(1.0, off / max(p.min_beads, 1)) if p.min_beads else 1.0
    reasons.append(f"{off} bead(s) off the cell of {sc['beads']}"
                   + ("" if beads >= 1.0 else f" (want >= {p.min_beads})"))
    periphery = float(sc["centre_periphery_fraction"])
    reasons.append(f"thin periphery covers {periphery:.0%} of the centre")
    around = float(sc.get("periphery_in_beads", 1.0))
    reasons.append(f"{around:.0%} of the periphery inside the beads"
                   + ("" if around >= p.min_periphery_in_beads
                      else f" (want >= {p.min_periphery_in_beads:.0%})"))
    quality = (film * cells * beads * (0.25 + 0.75 * min(1.0, 2 * periphery))
               * (0.25 + 0.75 * around)) if usable else 0.0
    meets = (usable and film == 1.0 and cells == 1.0 and beads >= 1.0
             and around >= p.min_periphery_in_beads)
    # meeting every criterion ranks first, then usable inspected squares, then the rest
    score = (2.0 if meets else 1.0) + quality if quality > 0 else 0.0
    return score, reasons, meets


class SquareSelectionPlan(Plan):
    """``squares/find``, ``lm-inspect/<key>`` for the best candidates, ``squares/select``."""

    name = "square_selection"

    def __init__(self, params: SquareSelectionParams) -> None:
        self.p = params

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        p = self.p
        yield Step(f"{p.prefix}/find", self._find, title="find squares in the atlas",
                   estimate_s=3.0)
        found = ctx.result(f"{p.prefix}/find")
        candidates = [k for k in found["candidates"] if k not in p.exclude][:p.inspect]
        if p.override is not None:
            candidates = list(dict.fromkeys([*p.override, *candidates]))[:max(p.inspect,
                                                                              len(p.override))]
        centres = {s["key"]: s["centre_um"] for s in found["squares"]}
        for key in candidates:
            if key not in centres:
                raise InvalidStep(f"square {key!r} is not in the atlas (squares: "
                                  f"{sorted(centres)[:20]}...)")
            yield Step(f"{p.inspect_prefix}/{key}", self._inspect(key, centres[key],
                                                                   found["focus_z_um"]),
                       title=f"inspect {key} at 100x", estimate_s=20.0, instrument="lm")
        yield Step(f"{p.prefix}/select", self._select(candidates), title="rank and select squares")

    def _find(self, ctx: StepContext) -> StepResult:
        p = self.p
        atlas = ctx.result(p.atlas_key)
        planes, affine = load_atlas(ctx, atlas)
        by = {im.channel: np.asarray(im.data, dtype=np.float64) for im in planes}
        if p.transmitted_channel not in by:
            raise InvalidStep(f"atlas has no {p.transmitted_channel!r} plane "
                              f"(channels: {sorted(str(c) for c in by)})")
        lattice, sites = find_squares(by[p.transmitted_channel], affine, p)
        sites = atlas_scores(by[p.transmitted_channel], by.get(p.texture_channel), affine,
                             sites, p)
        ranked = rank_squares(sites, {}, p)
        candidates = [r["key"] for r in ranked if r["atlas_score"] > 0]
        tiles = [k for k in atlas.get("tile_keys", [])]
        report = {"lattice": asdict(lattice), "squares": [s.as_json() for s in sites],
                  "candidates": candidates, "focus_z_um": _atlas_focus(ctx, atlas, tiles)}
        art = write_json(ctx, f"{p.prefix}/found.json", report, "lm_squares")
        ctx.log.info("squares.found", squares=len(sites), candidates=len(candidates))
        return {**report, "artifacts": [art]}

    def _inspect(self, key: str, centre: list[float], focus: float | None) -> Any:
        def action(ctx: StepContext) -> StepResult:
            lm = ctx.require_lm()
            return inspect_square(ctx, lm, self.p.inspection, f"{self.p.inspect_prefix}/{key}",
                                  (float(centre[0]), float(centre[1])), focus)
        return action

    def _select(self, candidates: list[str]) -> Any:
        def action(ctx: StepContext) -> StepResult:
            p = self.p
            found = ctx.result(f"{p.prefix}/find")
            sites = [SquareSite(**{**s, "centre_um": tuple(s["centre_um"])})
                     for s in found["squares"]]
            inspected = {k: ctx.result(f"{p.inspect_prefix}/{k}")["scores"] for k in candidates}
            ranked = [r for r in rank_squares(sites, inspected, p) if r["key"] not in p.exclude]
            if p.override is not None:
                chosen = list(p.override)
                how = "override"
            else:
                chosen = [r["key"] for r in ranked if r["meets_criteria"]][:p.select]
                if p.fill_below_criteria:
                    chosen += [r["key"] for r in ranked if r["inspected"] and r["score"] > 0
                               and not r["meets_criteria"]][:p.select - len(chosen)]
                how = "automatic"
                if len(chosen) < p.select:
                    ctx.log.warning("squares.too_few", wanted=p.select, chosen=len(chosen),
                                    reason="too few inspected squares meet the criteria")
            by_key = {r["key"]: r for r in ranked}
            selected = [{"key": k, "centre_um": by_key[k]["centre_um"],
                         "focus_z_um": ctx.result(f"{p.inspect_prefix}/{k}")["scores"][
                             "focus_z_um"] if k in inspected else None,
                         "score": by_key[k]["score"], "reasons": by_key[k]["reasons"]}
                        for k in chosen]
            report = {"how": how, "selected": selected, "ranking": ranked}
            art = write_json(ctx, f"{p.prefix}/selection.json", report, "lm_square_selection")
            ctx.log.info("squares.selected", how=how, selected=chosen)
            return {"how": how, "selected": selected,
                    "ranking": [{"key": r["key"], "score": r["score"], "reasons": r["reasons"]}
                                for r in ranked[:50]], "artifacts": [art]}
        return action


def _atlas_focus(ctx: StepContext, atlas: StepResult, tiles: list[str]) -> float | None:
    """Median 20x focus of the atlas tiles: the centre of the 100x focus search."""
    zs = [float(ctx.result(k)["z_um"]) for k in tiles]
    return float(np.median(zs)) if zs else None
