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


@pytest.mark.parametrize("square", [1, 3], ids=["square-a", "square-b"])
def test_square_map_is_within_1um_of_truth_everywhere(spec: Specimen, tmp_path: Path,
                                                      square: int) -> None:
    em = make_em(spec, seed=square)
    ctx = context(em, tmp_path)
    c = em_xy(spec, good_squares(spec, cells=False)[square].centre_um)
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
    print(f"square map tile errors: max {errors.max():.2f} um, nominal {nominal.max():.2f} um")
    assert errors.max() < 1.0
    assert errors.max() < nominal.max()             # stitching did better than the stage
    with mrcfile.open(tmp_path / result["mrc"]) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(result["pixel_size_um"] * 1e4, rel=1e-5)
        assert mrc.data.shape == tuple(result["shape"])
    # the map affine puts the map's centre pixel on the square's centre, within stage error
    assert np.hypot(*(np.array(result["centre_um"]) - c)) < 1.5
    assert result["magnification"] == 4700.0 and result["square_id"] == "s1"


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
