"""The AutoCLEM session report: ``report/index.html`` and its PNGs, from committed results.

What an operator needs the morning after (issue 7): the LM atlas with the chosen squares,
the EM atlas with where they were found, the bead matches per square, the targets on the EM
square maps, a row per target (predicted error, true error in simulation, tilt series
written, or why not) and the time per stage against AutoCLEM's figures (10 min for the atlas
correlation, 10 min per square for bead correlation and transfer).

True error is for simulations only and never feeds a decision: the service's simulated
world (or a test) puts a ``TruthProbe`` in ``ctx.params["truth_probe"]``; protocols never
import simulators, so without a probe the column stays empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from protocols.autoclem_correlate import CHECKPOINT as CHECKPOINT_KEY
from protocols.autoclem_correlate import bead_image
from protocols.autoclem_params import AutoCLEMParams
from protocols.em_atlas import ATLAS_KEY
from protocols.em_montage import map_image
from protocols.lm_atlas import load_atlas
from protocols.lm_features import cell_masks, max_projection
from protocols.lm_io import artifact, load_images, write_json
from protocols.plan import StepContext, StepResult
from protocols.report import (
    CYAN,
    GREEN,
    GREY,
    MAGENTA,
    RED,
    WHITE,
    YELLOW,
    Figure,
    Link,
    Marker,
    ReportData,
    StageTiming,
    TargetRow,
    draw,
    font_scale,
    legend,
    save_png,
    side_by_side,
    to_display,
    with_insets,
    write_report,
)
from protocols.square_map import map_key

__all__ = ["AUTOCLEM_ATLAS_S", "AUTOCLEM_SQUARE_S", "TruthProbe", "stage_of",
           "stage_timings", "write_session_report"]

#: AutoCLEM's times (docs/clem-workflow.md): square correlation 10 min, beads + transfer
#: 10 min per square.
AUTOCLEM_ATLAS_S = 600.0
AUTOCLEM_SQUARE_S = 600.0
REPORT_DIR = "report"
INSET_PX = 560      # close-ups of the chosen squares: two fit the page's width


class TruthProbe(Protocol):
    """Simulation only: the true miss (nm) of a target at its tilt-series position.

    Called with the session's record of the target as the checkpoint fixed it (``id``,
    ``lm_stage_um``, ``lm_px`` in its ``lm_frame``) and the frame metadata of its record
    closest to 0 degrees (protocols/em_acquire.py ``frame_meta``: path, pixel_to_stage,
    shape, ``extra`` with the instrument's frame id). Returns None when it cannot tell (a
    frame taken before the service restarted, say).
    """

    def __call__(self, target: Mapping[str, Any], record: Mapping[str, Any]
                 ) -> float | None: ...


def stage_of(key: str, p: AutoCLEMParams) -> str | None:
    """The report's stage of a step key (None: the operator checkpoint, the report)."""
    sel = p.selection()
    ext = p.extraction()
    table = [
        (f"{p.lm_atlas.prefix}/", "LM atlas"),
        (f"{sel.prefix}/", "square selection and 100x inspection"),
        (f"{sel.inspect_prefix}/", "square selection and 100x inspection"),
        ("timelapse/", "live time-lapse and final bead set"),
        (f"{ext.prefix}/p", "target extraction"),
        ("em-atlas/", "EM atlas"),
        ("correlate/atlas", "atlas correlation"),
        ("correlate/square-", "bead correlation and target transfer"),
        ("targets/transfer", "bead correlation and target transfer"),
        ("em-navigator/", "navigator"),
    ]
    for prefix, stage in table:
        if key.startswith(prefix):
            return stage
    if key.startswith("square-") and "/map/" in key:
        return "square maps"
    if key.startswith("target-"):
        return "realign and tilt series"
    return None


def stage_timings(ctx: StepContext, p: AutoCLEMParams, keys: Sequence[str]
                  ) -> list[StageTiming]:
    """Compute and modelled instrument seconds per stage, in session order, with AutoCLEM's."""
    order: list[str] = []
    compute: dict[str, float] = {}
    hardware: dict[str, float] = {}
    squares = 0
    for key in keys:
        stage = stage_of(key, p)
        r = ctx.store.get(key)
        if stage is None or r is None:
            continue
        if stage not in compute:
            order.append(stage)
            compute[stage] = hardware[stage] = 0.0
        timing = r.get("timing") or {}
        compute[stage] += float(timing.get("compute_s", 0.0))
        hardware[stage] += float(timing.get("hardware_s", 0.0))
        squares += key.startswith("correlate/square-")
    paper = {"atlas correlation": AUTOCLEM_ATLAS_S,
             "bead correlation and target transfer": AUTOCLEM_SQUARE_S * max(squares, 1)}
    return [StageTiming(s, compute[s], hardware[s], paper.get(s)) for s in order]


def _record_near_zero(ctx: StepContext, target_id: str, keys: Sequence[str]
                      ) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    for key in keys:
        if not key.startswith(f"target-{target_id}/tilt/"):
            continue
        r = ctx.store.get(key)
        if r is None or r.get("status") != "ok":
            continue
        if best is None or abs(r["tilt_deg"]) < abs(best["tilt_deg"]):
            best = r
    return None if best is None else dict(best["record"])


def target_rows(ctx: StepContext, keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per target: where it went, errors, the tilt series written, or why not."""
    probe: TruthProbe | None = ctx.params.get("truth_probe")
    fixed = {t["id"]: t for t in ctx.result(CHECKPOINT_KEY)["targets"]}
    rows = []
    for t in ctx.result("targets/transfer")["targets"]:
        row = {"id": t["id"], "square": t.get("square") or "-",
               "lm_stage_um": t.get("lm_stage_um"), "em_stage_um": t.get("em_stage_um"),
               "predicted_error_um": t.get("predicted_error_um"),
               "true_error_nm": None, "tilt_series": None, "status": t["status"],
               "reason": t.get("reason", "")}
        if t["status"] == "transferred":
            stack = ctx.store.get(f"target-{t['id']}/stack")
            skipped = next((r for r in (ctx.store.get(f"target-{t['id']}/{s}")
                                        for s in ("eucentric", "realign"))
                            if r is not None and r.get("status") == "skipped"), None)
            if stack is not None:
                row.update(tilt_series=stack["mrc"], status="collected",
                           n_tilts=stack["n_tilts"], lost_tilts_deg=stack["lost_tilts_deg"])
            elif skipped is not None:
                row.update(status="skipped", reason=skipped["reason"])
            record = _record_near_zero(ctx, t["id"], keys)
            if probe is not None and record is not None:
                row["true_error_nm"] = probe(fixed.get(t["id"], t), record)
                row["record_0deg"] = record["path"]
        rows.append(row)
    return rows


def _marker_radius(size_um: float, pixel_um: float, scale: float) -> int:
    return max(6, round(size_um / pixel_um * scale / 2))


def _close_up(image: NDArray[np.generic], pixel_um: float, centre_px: Sequence[float],
              half_um: float, text: str, box_um: float) -> NDArray[np.uint8]:
    """A square's neighbourhood from a full-resolution atlas, marked and labelled."""
    half = max(4, round(half_um / pixel_um))
    cx, cy = (round(float(v)) for v in centre_px)
    h, w = image.shape
    r0, r1, c0, c1 = max(0, cy - half), min(h, cy + half), max(0, cx - half), min(w, cx + half)
    pic, s = to_display(np.asarray(image)[r0:r1, c0:c1], INSET_PX)
    if pic.shape[1] < INSET_PX:   # coarse atlases: enlarge so the box and label are legible
        pic = np.asarray(cv2.resize(pic, (INSET_PX, round(INSET_PX * pic.shape[0]
                                                          / pic.shape[1])),
                                    interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    s = pic.shape[1] / max(c1 - c0, 1)
    r = _marker_radius(box_um, pixel_um, s)
    return _titled(draw(pic, s, [Marker(cx - c0, cy - r0, "", GREEN, r, "square")]), text)


def _titled(pic: NDArray[np.uint8], text: str) -> NDArray[np.uint8]:
    return legend(pic, [(text, GREEN)])


def _atlas_figures(ctx: StepContext, p: AutoCLEMParams, out: Path) -> list[Figure]:
    atlas = ctx.result("correlate/atlas")
    opening = p.square_selection.pitch_um - p.square_selection.bar_width_um
    near = 1.6 * p.square_selection.pitch_um
    planes, _ = load_atlas(ctx, ctx.result(f"{p.lm_atlas.prefix}/stitch"))
    lm = next((im for im in planes if im.channel == p.correlation.atlas_channel), planes[0])
    pic, s = to_display(lm.data)
    r = _marker_radius(opening, lm.pixel_size_um, s)
    marks = [Marker(sq["lm_atlas_px"][0], sq["lm_atlas_px"][1], sq["key"], GREEN, r, "square")
             for sq in atlas["squares"]]
    insets = [_close_up(lm.data, lm.pixel_size_um, sq["lm_atlas_px"], near, sq["key"], opening)
              for sq in atlas["squares"]]
    save_png(with_insets(draw(pic, s, marks), insets), out / "lm_atlas.png")
    em = map_image(ctx.result(ATLAS_KEY), ctx.data_dir)
    pic, s = to_display(em.data)
    r = _marker_radius(opening, em.pixel_size_um, s)
    placed = [sq for sq in atlas["squares"] if "em_atlas_px" in sq]
    marks = [Marker(sq["em_atlas_px"][0], sq["em_atlas_px"][1], sq["key"], GREEN, r, "square")
             for sq in placed]
    insets = [_close_up(em.data, em.pixel_size_um, sq["em_atlas_px"], near,
                        f"{sq['key']} +-{sq['predicted_error_um']:.2f} um", opening)
              for sq in placed]
    save_png(with_insets(draw(pic, s, marks), insets), out / "em_atlas.png")
    return [Figure("LM atlas with the chosen squares", "lm_atlas.png",
                   "green boxes: squares chosen after the 100x inspection; below, each chosen "
                   "square and its neighbours enlarged"),
            Figure("EM atlas with the squares found by atlas correlation", "em_atlas.png",
                   f"green boxes: where the atlas correlation put the chosen squares (close-ups "
                   f"below, with the predicted error of each centre); atlas correlation: "
                   f"{atlas['status']} ({atlas['reason']})")]


def _bead_figure(ctx: StepContext, p: AutoCLEMParams, corr: StepResult, position: int,
                 out: Path) -> Figure:
    lm, _, _ = bead_image(ctx, position, p.correlation.bead_channel)
    em = map_image(ctx.result(map_key(corr["id"])), ctx.data_dir)
    lpic, ls = to_display(lm, 800)
    epic, es = to_display(em.data, 800)
    lb, eb = np.asarray(corr["lm_beads_px"]).reshape(-1, 2), np.asarray(
        corr["em_beads_px"]).reshape(-1, 2)
    pairs = [(int(i), int(j)) for i, j in corr["pairs"]]
    lm_used, em_used = {i for i, _ in pairs}, {j for _, j in pairs}
    lpic = _outline_cell(ctx, p, position, lpic)
    lpic = draw(lpic, ls, [Marker(x, y, "", CYAN if k in lm_used else GREY, 9)
                           for k, (x, y) in enumerate(lb)])
    epic = draw(epic, es, [Marker(x, y, "", CYAN if k in em_used else GREY, 9)
                           for k, (x, y) in enumerate(eb)])
    lpic = legend(lpic, [(f"fLM final {p.correlation.bead_channel} (max projection)", WHITE),
                         (f"cell ({p.extraction().cell_channel})", RED)])
    epic = legend(epic, [("EM square map", WHITE)])
    canvas, dx = side_by_side(lpic, epic)
    links = [Link(lb[i, 0] * ls, lb[i, 1] * ls, eb[j, 0] * es + dx, eb[j, 1] * es, YELLOW)
             for i, j in pairs]
    name = f"beads-{corr['id']}.png"
    save_png(draw(canvas, 1.0, links=links), out / name)
    return Figure(f"Bead matches, square {corr['square']}", name,
                  f"cyan: beads used by the fit, joined in yellow ({len(pairs)} pairs); grey: "
                  f"beads found but not matched (lost at freezing, hidden under the cell, or "
                  f"contamination); {corr['status']}: {corr['reason']}")


def _outline_cell(ctx: StepContext, p: AutoCLEMParams, position: int,
                  picture: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The cell's outline (cell channel of the final set) on the bead picture: beads inside
    it are the ones the EM map cannot show."""
    channel = p.extraction().cell_channel
    final = load_images(ctx, ctx.result(f"timelapse/p{position}/final")["path"])
    if not any(im.channel == channel for im in final):
        return picture
    mip, _, ref = max_projection(final, channel)
    cell, _ = cell_masks(mip, ref.pixel_size_um)
    small = cv2.resize(cell.astype(np.uint8), (picture.shape[1], picture.shape[0]),
                       interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = picture.copy()
    cv2.drawContours(out, contours, -1, RED, max(2, round(2 * font_scale(out))))
    return out


def _targets_figure(ctx: StepContext, corr: StepResult, rows: list[dict[str, Any]],
                    out: Path) -> Figure:
    em = map_image(ctx.result(map_key(corr["id"])), ctx.data_dir)
    pic, s = to_display(em.data)
    by_id = {r["id"]: r for r in rows}
    marks = []
    for t in corr["targets"]:
        if "em_px" not in t:
            continue
        row = by_id.get(t["id"], {})
        ok = row.get("status") == "collected"
        true = row.get("true_error_nm")
        # the transfer's figure, else the correlation's; neither when the correlation refused
        # (it may still have mapped the targets, e.g. an ambiguous match)
        predicted = row.get("predicted_error_um")
        if predicted is None:
            predicted = t.get("predicted_error_um")
        text = (f"{t['id']} " + ("-" if predicted is None else f"{predicted * 1e3:.0f}")
                + ("" if true is None else f"/{true:.0f}") + " nm")
        marks.append(Marker(t["em_px"][0], t["em_px"][1], text, MAGENTA if ok else RED, 16,
                            "cross"))
    name = f"targets-{corr['id']}.png"
    keys = [("tilt series collected", MAGENTA), ("skipped (see the table)", RED)]
    save_png(legend(draw(pic, s, marks), keys), out / name)
    return Figure(f"Targets on the EM map of square {corr['square']}", name,
                  "labels: target, predicted error / true error (simulation) in nm; magenta: "
                  "tilt series collected; red: skipped, with the reason in the table")


def write_session_report(ctx: StepContext, p: AutoCLEMParams, keys: Sequence[str]
                         ) -> StepResult:
    """Write the report from the committed results of ``keys`` (the session's steps)."""
    out = ctx.data_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = target_rows(ctx, keys)
    figures = _atlas_figures(ctx, p, out)
    atlas = ctx.result("correlate/atlas")
    positions = {sq["id"]: int(sq["position"]) for sq in atlas["squares"]}
    corrs = [ctx.result(k) for k in keys if k.startswith("correlate/square-")]
    for corr in corrs:
        if "pairs" in corr:
            figures.append(_bead_figure(ctx, p, corr, positions[corr["id"]], out))
        figures.append(_targets_figure(ctx, corr, rows, out))
    timings = stage_timings(ctx, p, keys)
    table = [TargetRow(r["id"], r["square"], None if r["em_stage_um"] is None else (
        float(r["em_stage_um"][0]), float(r["em_stage_um"][1])),
        None if r["predicted_error_um"] is None else r["predicted_error_um"] * 1e3,
        r["true_error_nm"], None if r["tilt_series"] is None else Path(r["tilt_series"]).name,
        r["status"] if r["status"] == "collected" else f"{r['status']}: {r['reason']}")
        for r in rows]
    collected = [r for r in rows if r["status"] == "collected"]
    true = [r["true_error_nm"] for r in collected if r["true_error_nm"] is not None]
    summary = [("squares chosen", str(len(atlas["squares"]))),
               ("squares placed in the EM", str(sum(s["status"] == "ok"
                                                    for s in atlas["squares"]))),
               ("targets", f"{len(collected)} collected of {len(rows)}"),
               ("compute (s)", f"{sum(t.compute_s for t in timings):.1f}"),
               ("instrument time, modelled (s)", f"{sum(t.hardware_s for t in timings):.0f}")]
    if true:
        summary.append(("within 100 nm (simulation)",
                        f"{sum(e <= 100.0 for e in true)} / {len(true)}"))
    notes = [f"square {s['key']}: {s['reason']}" for s in atlas["squares"]
             if s["status"] != "ok"]
    data = ReportData(session_id=ctx.data_dir.name, title="AutoCLEM session", summary=summary,
                      figures=figures, targets=table, timings=timings, notes=notes)
    page = write_report(data, out)
    pngs = [f"{REPORT_DIR}/{f.png}" for f in figures]
    timing_rows = [{"stage": t.stage, "compute_s": t.compute_s, "hardware_s": t.hardware_s,
                    "autoclem_s": t.autoclem_s} for t in timings]
    summary_art = write_json(ctx, f"{REPORT_DIR}/summary.json",
                             {"targets": rows, "timings": timing_rows,
                              "summary": dict(summary)}, "report_summary")
    ctx.log.info("autoclem.report", path=str(page), targets=len(rows), collected=len(collected))
    return {"html": f"{REPORT_DIR}/index.html", "pngs": pngs, "targets": rows,
            "timings": timing_rows,
            "artifacts": [artifact(f"{REPORT_DIR}/index.html", "report"), summary_art,
                          *(artifact(png, "report_figure") for png in pngs)]}
