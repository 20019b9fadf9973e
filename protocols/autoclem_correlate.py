"""The AutoCLEM session's own compute steps: the target list, both correlations, the transfer.

Why here and not in protocols/correlation: these steps only fetch the session's committed
images and results, call the correlation functions (register_atlas, the bead correlation
of protocols/autoclem_maps.py) and record what they answered, including refusals. A square
the atlas or its beads cannot place is not an error of the session: its targets are skipped
with the reason, the rest go on.

A target's predicted error is the bead correlation's, combined with the placement error of
any square-map tile under it that the stitching could not place (protocols/autoclem_maps.py,
which also keeps such tiles' beads out of the correlation).

Frames: every target is fixed at the checkpoint in pixels of its square's final set
(``lm_px``: target extraction registered the last time point, where the virus was found, to
the final set, another visit of the stage), with its LM stage um for people and navigators.
The square's bead correlation carries those pixels to pixels of the EM square map, whose
stitched affine gives the EM stage position the tilt series realigns to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from drivers.base import LimitViolation
from drivers.imaging import apply_affine, invert_affine
from protocols.autoclem_maps import correlate_map_beads, placed_tile_error, unplaced_tiles
from protocols.autoclem_params import AutoCLEMParams
from protocols.correlation.atlas import AtlasConfig, register_atlas
from protocols.correlation.errors import CorrelationInputError
from protocols.em_atlas import ATLAS_KEY
from protocols.em_montage import map_image
from protocols.lm_atlas import load_atlas
from protocols.lm_io import affine_from_json, load_images, write_json
from protocols.plan import InvalidStep, StepContext, StepResult
from protocols.square_map import ID_CHARS, map_key

__all__ = ["TRANSFER_KEY", "bead_image", "correlate_atlas", "correlate_square",
           "freeze_and_load", "transfer_targets"]

FloatArray = NDArray[np.float64]
TRANSFER_KEY = "targets/transfer"
CHECKPOINT = "checkpoint/freeze-and-load"
ATLAS = "correlate/atlas"


def _chosen(ctx: StepContext, p: AutoCLEMParams) -> list[dict[str, Any]]:
    selected: list[dict[str, Any]] = ctx.result(f"{p.square_selection.prefix}/select")["selected"]
    return selected


def _final_frame(ctx: StepContext, position: int) -> tuple[FloatArray, tuple[int, int]]:
    """Pixel-to-stage affine and shape (rows, cols) of a position's final set."""
    final = ctx.result(f"timelapse/p{position}/final")
    planes = load_images(ctx, final["path"])
    return affine_from_json(final["pixel_to_stage"]), planes[0].shape


def _client_id(raw: str, taken: set[str]) -> str:
    base = "c-" + "".join(ch if ch in ID_CHARS else "_" for ch in raw)[:28]
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base[:28]}.{n}"
    return out


def freeze_and_load(ctx: StepContext, p: AutoCLEMParams,
                    client_targets: Callable[[], list[dict[str, Any]]]) -> StepResult:
    """The operator has frozen and loaded the grid: fix the session's targets.

    Proposals of every position plus client targets in ``lm_stage`` that fall inside a
    position's field (assigned to that square); anything else is listed with the reason.
    """
    chosen = _chosen(ctx, p)
    ext = p.extraction()
    extracted = [ctx.result(f"{ext.prefix}/p{k}") for k in range(len(chosen))]
    targets: list[dict[str, Any]] = []
    for k, square in enumerate(chosen):
        final = extracted[k]["final"]
        if final is None:
            raise InvalidStep(f"targets/p{k} has no final set to place its targets in (the "
                              "bead correlation needs them in the final set's pixels)")
        for t in extracted[k]["targets"]:
            targets.append({"id": t["id"], "source": "auto", "square": square["key"],
                            "position": k, "lm_stage_um": [t["x"], t["y"]], "z_um": t["z"],
                            "score": t["score"], "lm_px": [t["final_x_px"], t["final_y_px"]],
                            "lm_frame": final["frame"],
                            "outside_beads_um": t["outside_beads_um"]})
    frames = [_final_frame(ctx, k) for k in range(len(chosen))]
    taken = {t["id"] for t in targets}
    skipped: list[dict[str, Any]] = []
    for c in client_targets():
        tid = _client_id(str(c["id"]), taken)
        if c.get("frame") != "lm_stage":
            skipped.append({"id": tid, "client_id": c["id"], "reason":
                            f"frame {c.get('frame')!r}: the session transfers lm_stage targets"})
            continue
        xy = np.array([float(c["x"]), float(c["y"])])
        at = _position_of(xy, frames)
        if at is None:
            skipped.append({"id": tid, "client_id": c["id"], "reason":
                            "outside the field of every time-lapse position"})
            continue
        taken.add(tid)
        # picked in the last time point's frame, as the proposals were; moved into the
        # final set's pixels by the same registered offset
        got = extracted[at]
        px = (apply_affine(np.asarray(got["stage_to_pixel"], float), xy)
              + np.asarray(got["final"]["offset_px"], float))
        targets.append({"id": tid, "client_id": c["id"], "source": "client",
                        "square": chosen[at]["key"], "position": at,
                        "lm_stage_um": [float(xy[0]), float(xy[1])], "z_um": c.get("z"),
                        "score": None, "lm_px": [float(px[0]), float(px[1])],
                        "lm_frame": got["final"]["frame"], "outside_beads_um": None})
    ctx.log.info("autoclem.targets_fixed", targets=len(targets), skipped=len(skipped),
                 client=sum(t["source"] == "client" for t in targets))
    art = write_json(ctx, "targets/session-targets.json",
                     {"targets": targets, "skipped": skipped}, "autoclem_targets")
    return {"confirmed_at_s": ctx.clock.now(), "targets": targets, "skipped": skipped,
            "artifacts": [art]}


def _position_of(xy: FloatArray, frames: list[tuple[FloatArray, tuple[int, int]]]
                 ) -> int | None:
    """The position whose final image holds ``xy`` furthest from its edges, if any."""
    best: int | None = None
    best_margin = 0.0
    for k, (a, (h, w)) in enumerate(frames):
        px = apply_affine(invert_affine(a), xy)
        margin = float(min(px[0], px[1], w - 1 - px[0], h - 1 - px[1]))
        if margin > best_margin:
            best, best_margin = k, margin
    return best


def correlate_atlas(ctx: StepContext, p: AutoCLEMParams) -> StepResult:
    """Register the LM atlas to the EM atlas; the chosen squares' EM stage centres."""
    c = p.correlation
    planes, a_lm = load_atlas(ctx, ctx.result(f"{p.lm_atlas.prefix}/stitch"))
    plane = next((im for im in planes if im.channel == c.atlas_channel), None)
    if plane is None:
        raise InvalidStep(f"LM atlas has no {c.atlas_channel!r} plane (correlation."
                          f"atlas_channel); channels: {[im.channel for im in planes]}")
    em_res = ctx.result(ATLAS_KEY)
    em = map_image(em_res, ctx.data_dir)
    chosen = _chosen(ctx, p)
    centres = np.array([s["centre_um"] for s in chosen], dtype=float).reshape(-1, 2)
    lm_px = apply_affine(invert_affine(a_lm), centres).reshape(-1, 2)
    pitch = p.square_selection.pitch_um
    cfg = AtlasConfig(min_pitch_um=c.atlas_pitch_range[0] * pitch,
                      max_pitch_um=c.atlas_pitch_range[1] * pitch,
                      min_squares=c.atlas_min_squares)
    out: dict[str, Any] = {"lm_pixel_um": plane.pixel_size_um, "em_pixel_um": em.pixel_size_um}
    try:
        res = register_atlas(plane.data, plane.pixel_size_um, em.data, em.pixel_size_um,
                             lm_px, cfg)
    except CorrelationInputError as err:
        ctx.log.warning("autoclem.atlas_unusable", reason=str(err))
        status, reason, em_px, err_um = "unusable_input", str(err), None, None
    else:
        status, reason = res.status, res.reason
        em_px, err_um = res.points_em_px, res.points_error_um
        out.update(mirrored=res.mirrored, rotation_deg=res.rotation_deg, score=res.score,
                   runner_up=res.runner_up, confidence=res.confidence, pitch_um=res.pitch_um,
                   lm_squares_px=res.lm_squares_px.tolist(),
                   em_squares_px=res.em_squares_px.tolist(),
                   square_residuals_um=res.square_residuals_um.tolist(),
                   transform=None if res.transform is None else res.transform.to_dict())
    squares = []
    a_em = np.asarray(em_res["pixel_to_stage"], dtype=float)
    for k, s in enumerate(chosen):
        row: dict[str, Any] = {"key": s["key"], "id": s["key"], "position": k,
                               "lm_stage_um": list(s["centre_um"]),
                               "lm_atlas_px": lm_px[k].tolist(), "status": status,
                               "reason": reason}
        if status == "ok" and em_px is not None and err_um is not None:
            xy = apply_affine(a_em, em_px[k])
            row.update(em_atlas_px=em_px[k].tolist(), em_stage_um=[float(v) for v in xy],
                       predicted_error_um=float(err_um[k]))
            row["status"], row["reason"] = _reachable(ctx, xy)
        squares.append(row)
    out.update(status=status, reason=reason, squares=squares)
    ctx.log.info("autoclem.atlas_correlated", status=status, reason=reason,
                 squares=[(r["key"], r["status"]) for r in squares])
    art = write_json(ctx, "correlate/atlas.json", out, "autoclem_atlas_correlation")
    return {**out, "artifacts": [art]}


def _reachable(ctx: StepContext, xy: FloatArray) -> tuple[str, str]:
    if ctx.em is None:
        return "ok", "mapped"
    try:
        ctx.em.limits.check_xy(float(xy[0]), float(xy[1]))
    except LimitViolation as err:
        return "out_of_reach", str(err)
    return "ok", "mapped"


def bead_image(ctx: StepContext, position: int, channel: str
               ) -> tuple[FloatArray, float, FloatArray]:
    """Maximum projection of the final set's bead channel, its pixel size and its affine."""
    final = ctx.result(f"timelapse/p{position}/final")
    planes = [im for im in load_images(ctx, final["path"]) if im.channel == channel]
    if not planes:
        raise InvalidStep(f"final set of position {position} has no {channel!r} planes "
                          "(correlation.bead_channel)")
    mip = np.max(np.stack([np.asarray(im.data, dtype=np.float64) for im in planes]), axis=0)
    return mip, float(planes[0].pixel_size_um), np.asarray(planes[0].pixel_to_stage, float)


def correlate_square(ctx: StepContext, p: AutoCLEMParams, square: dict[str, Any]
                     ) -> StepResult:
    """Beads of the final 405 image <-> the EM square map; the square's targets in map pixels."""
    pos = int(square["position"])
    targets = [t for t in ctx.result(CHECKPOINT)["targets"] if t["square"] == square["key"]]
    lm, lm_px, _ = bead_image(ctx, pos, p.correlation.bead_channel)
    map_res = ctx.result(map_key(square["id"]))
    em = map_image(map_res, ctx.data_dir)
    t_px = np.array([t["lm_px"] for t in targets], dtype=float).reshape(-1, 2)
    out: dict[str, Any] = {"square": square["key"], "id": square["id"], "lm_pixel_um": lm_px,
                           "em_pixel_um": em.pixel_size_um}
    try:
        res, dropped = correlate_map_beads(lm, lm_px, em.data, em.pixel_size_um,
                                           np.asarray(map_res["pixel_to_stage"], float),
                                           unplaced_tiles(ctx, square["id"], map_res), t_px)
    except CorrelationInputError as err:
        ctx.log.warning("autoclem.beads_unusable", square=square["key"], reason=str(err))
        out.update(status="unusable_input", reason=str(err), targets=[])
        return out
    pc = res.points
    rows = []
    for k, t in enumerate(targets):
        row: dict[str, Any] = {"id": t["id"], "lm_px": t_px[k].tolist()}
        if res.targets_em_px is not None and pc.target_errors_um is not None:
            row.update(em_px=res.targets_em_px[k].tolist(),
                       predicted_error_um=float(pc.target_errors_um[k]),
                       reliable=bool(pc.target_reliable[k]) if pc.target_reliable is not None
                       else False)
        rows.append(row)
    out.update(status=pc.status, reason=pc.reason, targets=rows,
               lm_beads_px=res.lm_beads.xy_px.tolist(), em_beads_px=res.em_beads.xy_px.tolist(),
               pairs=pc.pairs.tolist(), em_beads_on_unplaced_tiles=dropped,
               transform=None if pc.transform is None else pc.transform.to_dict())
    ctx.log.info("autoclem.beads_correlated", square=square["key"], status=pc.status,
                 lm_beads=len(res.lm_beads), em_beads=len(res.em_beads), pairs=len(pc.pairs))
    art = write_json(ctx, f"correlate/square-{square['id']}.json", out,
                     "autoclem_bead_correlation", square=square["key"])
    return {**out, "artifacts": [art]}


def transfer_targets(ctx: StepContext, p: AutoCLEMParams) -> StepResult:
    """Every target's EM stage position and predicted error, or why it has none."""
    fixed = ctx.result(CHECKPOINT)
    squares = {s["key"]: s for s in ctx.result(ATLAS)["squares"]}
    limit = p.correlation.max_target_error_um
    rows: list[dict[str, Any]] = [{**s, "status": "skipped", "square": None}
                                  for s in fixed["skipped"]]
    for t in fixed["targets"]:
        sq = squares[t["square"]]
        row: dict[str, Any] = {"id": t["id"], "source": t["source"], "square": t["square"],
                               "square_id": sq["id"], "lm_stage_um": t["lm_stage_um"],
                               "status": "skipped", "predicted_error_um": None}
        rows.append(row)
        if sq["status"] != "ok":
            row["reason"] = f"square {sq['key']} not placed in the EM: {sq['reason']}"
            continue
        corr = ctx.result(f"correlate/square-{sq['id']}")
        if corr["status"] != "ok":
            row["reason"] = f"bead correlation {corr['status']}: {corr['reason']}"
            continue
        mine = next(r for r in corr["targets"] if r["id"] == t["id"])
        map_res = ctx.result(map_key(sq["id"]))
        h, w = map_res["shape"]
        x, y = mine["em_px"]
        xy = apply_affine(np.asarray(map_res["pixel_to_stage"], float), np.array([x, y]))
        shaky = sorted(((u.index, u.expected_error_um) for u in unplaced_tiles(
            ctx, sq["id"], map_res) if u.holds(xy)[0]), key=lambda ke: -ke[1])
        tile_err = max((e for _, e in shaky), default=0.0)
        # the placed tile's own misplacement (its edges' residuals): the beads, fitted over
        # the whole map, do not absorb it
        placed = placed_tile_error(ctx, map_res, xy)
        local_err = 0.0 if placed is None else placed[1]
        row["predicted_error_um"] = float(np.hypot(mine["predicted_error_um"],
                                                   max(tile_err, local_err)))
        row["correlation_error_um"] = mine["predicted_error_um"]
        row["map_tile_local_error_um"] = None if placed is None else {
            "tile": placed[0], "local_error_um": placed[1]}
        row["map_tiles_unplaced"] = [{"tile": k, "expected_error_um": e} for k, e in shaky]
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            row["reason"] = f"outside the square map at pixel ({x:.0f}, {y:.0f})"
        elif tile_err > limit:
            row["reason"] = (f"on square-map tile {shaky[0][0]}, which the stitching could not "
                             f"place reliably (expected error {tile_err * 1e3:.0f} nm): realign "
                             "would align to a misplaced picture")
        elif row["predicted_error_um"] > limit:
            row["reason"] = (f"predicted error {row['predicted_error_um'] * 1e3:.0f} nm over "
                             f"{limit * 1e3:.0f} nm (correlation.max_target_error_um)")
        elif not mine["reliable"]:
            row["reason"] = ("far outside the matched beads (extrapolated; predicted error "
                             f"{mine['predicted_error_um'] * 1e3:.0f} nm not trusted)")
        else:
            row.update(status="transferred", em_px=[x, y],
                       em_stage_um=[float(xy[0]), float(xy[1])], reason="")
    done = [r for r in rows if r["status"] == "transferred"]
    ctx.log.info("autoclem.targets_transferred", transferred=len(done),
                 skipped=len(rows) - len(done))
    for r in rows:
        if r["status"] == "skipped":
            ctx.log.warning("autoclem.target_skipped", target=r["id"], reason=r["reason"])
    art = write_json(ctx, "targets/transfer.json", {"targets": rows}, "autoclem_transfer")
    return {"targets": rows, "transferred": len(done), "skipped": len(rows) - len(done),
            "artifacts": [art]}


