"""Square-map tiles the stitching could not place or vouch for: found from the map's own records, their
footprints, and the transfer's use of them (protocols/autoclem_maps.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from drivers.clock import VirtualClock
from protocols.autoclem_maps import unplaced_tiles
from protocols.plan import MemoryStepStore, StepContext

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
               "anchors": [{"tile": 2, "status": "used"}, {"tile": 3, "status": "ambiguous"}]}
    (tmp_path / "s1-map.json").write_text(json.dumps(sidecar))
    flagged = [{"index": 3, "correction_um": [0.0, 0.0], "expected_error_um": 1.0},
               {"index": 1, "correction_um": [1.6, 0.0], "expected_error_um": 0.24}]
    result = {"json": "s1-map.json", "flagged_tiles": flagged}
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
