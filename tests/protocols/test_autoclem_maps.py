"""Square-map tiles the stitching could not place or vouch for: found from the map's own records, their
footprints, and the transfer's use of them (protocols/autoclem_maps.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from drivers.clock import VirtualClock
from protocols.autoclem_correlate import ATLAS, CHECKPOINT, transfer_targets
from protocols.autoclem_maps import placed_tile_error, unplaced_tiles
from protocols.autoclem_params import AutoCLEMParams
from protocols.plan import MemoryStepStore, StepContext
from protocols.square_map import map_key

PX = 0.1      # um per tile pixel; tiles 100 x 100 px = 10 um, 8 um apart (20% overlap)


def _context(tmp_path: Path) -> tuple[StepContext, dict[str, object]]:
    store = MemoryStepStore()
    for k in range(4):                         # 2 x 2 tiles
        x0, y0 = 8.0 * (k % 2), 8.0 * (k // 2)
        store.put(f"square-s1/map/tile-{k:03d}",
                  {"pixel_to_stage": [[PX, 0.0, x0], [0.0, PX, y0]], "shape": [100, 100]})
    sidecar = {"overlaps": [{"i": 0, "j": 1, "status": "used"},
                            {"i": 1, "j": 3, "status": "ambiguous"},
                            {"i": 2, "j": 3, "status": "ambiguous"}],
               "anchors": [{"tile": 2, "status": "used"}, {"tile": 3, "status": "ambiguous"}],
               # as placed (tile 1 moved 1.6 um), with each tile's local error
               "tiles": [{"index": k, "shape": [100, 100],
                          "pixel_to_stage": [[PX, 0.0, 8.0 * (k % 2) + (1.6 if k == 1 else 0)],
                                             [0.0, PX, 8.0 * (k // 2)]],
                          "local_error_um": e} for k, e in enumerate((0.12, 0.24, 0.02, 1.0))]}
    (tmp_path / "s1-map.json").write_text(json.dumps(sidecar))
    flagged = [{"index": 3, "correction_um": [0.0, 0.0], "expected_error_um": 1.0},
               {"index": 1, "correction_um": [1.6, 0.0], "expected_error_um": 0.24}]
    result = {"json": "s1-map.json", "flagged_tiles": flagged, "shape": [180, 180],
              "pixel_to_stage": [[PX, 0.0, 0.0], [0.0, PX, 0.0]]}
    return StepContext(clock=VirtualClock(), data_dir=tmp_path, store=store), result


def test_every_flagged_tile_is_untrusted(tmp_path: Path) -> None:
    ctx, result = _context(tmp_path)
    tiles = unplaced_tiles(ctx, "s1", result)
    # tile 3 had nothing to place it; tile 1 was placed by its overlap with tile 0 but moved
    # far (possibly a hole-lattice period off): neither is trusted, each with its own error
    assert [t.index for t in tiles] == [3, 1]
    assert [t.expected_error_um for t in tiles] == [1.0, 0.24]
    holds = tiles[0].holds(np.array([[12.0, 12.0], [8.5, 9.0], [3.0, 3.0], [18.5, 12.0]]))
    assert holds.tolist() == [True, True, False, False]


def test_placed_tile_error_is_the_largest_local_error_of_the_trusted_tiles_under_a_point(
        tmp_path: Path) -> None:
    ctx, result = _context(tmp_path)
    assert placed_tile_error(ctx, result, np.array([3.0, 3.0])) == (0, 0.12)
    # the overlap of tiles 0 and 2: the worse of the two
    assert placed_tile_error(ctx, result, np.array([3.0, 9.0])) == (0, 0.12)
    assert placed_tile_error(ctx, result, np.array([3.0, 15.0])) == (2, 0.02)
    # only on flagged tile 3: that is unplaced_tiles' business
    assert placed_tile_error(ctx, result, np.array([17.0, 17.0])) is None


def test_a_placed_tiles_local_error_joins_the_targets_predicted_error(tmp_path: Path) -> None:
    ctx, result = _context(tmp_path)
    ctx.store.put(map_key("s1"), result)
    ctx.store.put(ATLAS, {"squares": [{"key": "A1", "id": "s1", "status": "ok"}]})
    ctx.store.put(CHECKPOINT, {"skipped": [], "targets": [
        {"id": t, "source": "manual", "square": "A1", "lm_stage_um": [0.0, 0.0]}
        for t in ("t0", "t2")]})
    ctx.store.put("correlate/square-s1", {"status": "ok", "targets": [
        {"id": "t0", "em_px": [30.0, 30.0], "predicted_error_um": 0.05, "reliable": True},
        {"id": "t2", "em_px": [30.0, 150.0], "predicted_error_um": 0.05, "reliable": True}]})
    rows = {r["id"]: r for r in transfer_targets(ctx, AutoCLEMParams())["targets"]}
    # t0 lies on tile 0, placed with a 120 nm local error the beads cannot absorb
    assert rows["t0"]["predicted_error_um"] == np.hypot(0.05, 0.12)
    assert rows["t0"]["correlation_error_um"] == 0.05
    assert rows["t0"]["map_tile_local_error_um"] == {"tile": 0, "local_error_um": 0.12}
    assert rows["t2"]["predicted_error_um"] == np.hypot(0.05, 0.02)
    assert all(r["status"] == "transferred" for r in rows.values())


def test_flagged_tiles_of_a_serialem_montage_come_from_its_one_step(tmp_path: Path) -> None:
    """With SerialEM's Montage the tiles' metadata sit in the montage step, not in per-tile
    steps: the same flagged tiles, the same footprints."""
    ctx, result = _context(tmp_path)
    tiles = [ctx.store.get(f"square-s1/map/tile-{k:03d}") for k in range(4)]
    montage = StepContext(clock=ctx.clock, data_dir=tmp_path, store=MemoryStepStore())
    montage.store.put("square-s1/map/montage", {"tiles": tiles})
    expected = unplaced_tiles(ctx, "s1", result)
    got = unplaced_tiles(montage, "s1", result)
    assert [(t.index, t.expected_error_um, t.shape) for t in got] == \
        [(t.index, t.expected_error_um, t.shape) for t in expected]
    assert all(np.allclose(a.stage_to_px, b.stage_to_px) for a, b in zip(got, expected,
                                                                           strict=True))
