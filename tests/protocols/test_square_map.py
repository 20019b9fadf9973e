"""Square maps on the simulated TEM (stage error on): every point of the stitched map within
1 um of the truth, files re-open with their pixel size, bad input refused before moving."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from em_sim import context, em_xy, good_squares, make_em, tile_errors_um
from pydantic import ValidationError

from drivers.base import LimitViolation
from protocols.em_acquire import load_frame
from protocols.plan import run_plan
from protocols.square_map import SquareMapParams, SquareMapPlan, map_key
from simulators.specimen import Specimen


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=4)


@pytest.mark.parametrize(("cells", "square"), [(False, 1), (False, 3), (True, 1), (True, 4)],
                         ids=["plain-a", "plain-b", "cells-a", "cells-b"])
def test_square_map_is_within_1um_of_truth_everywhere(spec: Specimen, tmp_path: Path,
                                                      cells: bool, square: int) -> None:
    em = make_em(spec, seed=square)
    ctx = context(em, tmp_path)
    c = em_xy(spec, good_squares(spec, cells=cells)[square].centre_um)
    run_plan(SquareMapPlan(SquareMapParams(squares=({"id": "s1", "x_um": c[0], "y_um": c[1]},),
                                           tiles_xy=(4, 4))), ctx)
    result = ctx.result(map_key("s1"))
    sidecar = json.loads((tmp_path / result["json"]).read_text())
    tiles = [load_frame(tmp_path, ctx.result(f"square-s1/map/tile-{k:03d}")) for k in range(16)]
    placed = []
    for tile, corr in zip(tiles, sidecar["tile_corrections_um"], strict=True):
        a = tile.pixel_to_stage.copy()
        a[:, 2] += corr
        placed.append(a)
    # every map pixel comes from a tile placed this well: the whole map is within the bound
    errors = tile_errors_um(em, tiles, placed)
    nominal = tile_errors_um(em, tiles, [t.pixel_to_stage for t in tiles])
    flagged = {f["index"]: f for f in result["flagged_tiles"]}
    print(f"square map tile errors: max {errors.max():.2f} um, nominal {nominal.max():.2f} um, "
          f"flagged {sorted(flagged)}")
    assert errors.max() < 1.0
    assert errors.max() < nominal.max()             # stitching did better than the stage
    # the overview anchored the map; a tile nothing placed (opaque, or showing only a sliver
    # of cell edge) is flagged with the stage's error, and is mostly dark
    assert result["overview"]["anchors_used"] >= 8
    median = float(np.median([np.mean(t.data) for t in tiles]))
    for k, f in flagged.items():
        assert f["reason"].startswith(("opaque", "no usable overlap and no overview match"))
        assert f["expected_error_um"] >= 0.9, f
        assert float(np.mean(tiles[k].data)) < 0.25 * median, f   # mostly cell body
    assert len(flagged) <= (5 if cells else 0)
    with mrcfile.open(tmp_path / result["mrc"]) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(result["pixel_size_um"] * 1e4, rel=1e-5)
        assert mrc.data.shape == tuple(result["shape"])
    # the map affine puts the map's centre pixel on the square's centre, within stage error
    assert np.hypot(*(np.array(result["centre_um"]) - c)) < 1.5
    assert result["magnification"] == 4700.0 and result["square_id"] == "s1"


def test_without_overview_cell_tiles_keep_the_stage_error(spec: Specimen, tmp_path: Path) -> None:
    """The overview is what places the cell tiles: without it (overlaps only) the same square
    has tiles flagged as unplaced or placed only within their own group."""
    em = make_em(spec, seed=1)
    ctx = context(em, tmp_path)
    c = em_xy(spec, good_squares(spec, cells=True)[1].centre_um)
    run_plan(SquareMapPlan(SquareMapParams(squares=({"id": "s1", "x_um": c[0], "y_um": c[1]},),
                                           tiles_xy=(4, 4), overview=None)), ctx)
    result = ctx.result(map_key("s1"))
    assert result["overview"] is None
    assert sum(not f["reason"].startswith("opaque") for f in result["flagged_tiles"]) >= 4


def test_square_outside_stage_limits_refuses_before_moving(spec: Specimen, tmp_path: Path) -> None:
    em = make_em(spec)
    ctx = context(em, tmp_path)
    before, t0 = em.true_stage_position(), em.clock.now()
    params = SquareMapParams(squares=({"id": "ok", "x_um": 0.0, "y_um": 0.0},
                                      {"id": "edge", "x_um": 10.0, "y_um": -1595.0}))
    with pytest.raises(LimitViolation, match=r"square edge map refused before moving: tile 0 "
                                             r"at .*stage y .* outside"):
        run_plan(SquareMapPlan(params), ctx)
    assert em.true_stage_position() == before and em.clock.now() == t0


@pytest.mark.parametrize("bad", [
    {"squares": [{"id": "a", "x_um": 0, "y_um": 0}], "tiles": (2, 2)},
    {"squares": [{"id": "a", "x_um": 0, "y_um": 0}, {"id": "a", "x_um": 5, "y_um": 0}]},
    {"squares": [{"id": "a/b", "x_um": 0, "y_um": 0}]},
    {"squares": []},
], ids=["unknown-key", "duplicate-id", "id-with-slash", "no-squares"])
def test_bad_params_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SquareMapParams.model_validate(bad)
