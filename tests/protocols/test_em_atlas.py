"""EM atlas plan on the simulated TEM: tiles cover the grid disc, every tile lands within 1 um
of the truth after stitching, files re-open with their pixel size, and tiles outside the stage
limits refuse the plan before anything moves."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from em_sim import context, make_em, tile_errors_um

from drivers.base import LimitViolation
from protocols.em_acquire import load_frame
from protocols.em_atlas import ATLAS_KEY, EMAtlasParams, EMAtlasPlan
from protocols.plan import run_plan
from simulators.specimen import Specimen


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=4)


def test_atlas_tiles_are_placed_within_1um_and_files_reopen(spec: Specimen, tmp_path: Path) -> None:
    """Stage error on; the magnification calibration exact: at 200x a 0.5 % pixel-size error
    alone moves a tile corner 160 um from its centre by 0.8 um, which is the calibration's
    business, not the montage's."""
    em = make_em(spec, optics={"pixel_size_error_rms": 0.0, "rotation_error_rms_deg": 0.0})
    ctx = context(em, tmp_path)
    plan = EMAtlasPlan(EMAtlasParams(grid_radius_um=350.0))
    ran = run_plan(plan, ctx)
    tile_keys = [k for k in ran if "/tile-" in k]
    assert ran[-1] == ATLAS_KEY and len(ran) == len(tile_keys) + 1
    result = ctx.result(ATLAS_KEY)
    tiles = [load_frame(tmp_path, ctx.result(k)) for k in tile_keys]
    sidecar = json.loads((tmp_path / result["json"]).read_text())
    placed = []
    for tile, corr in zip(tiles, sidecar["tile_corrections_um"], strict=True):
        a = tile.pixel_to_stage.copy()
        a[:, 2] += corr
        placed.append(a)
    errors = tile_errors_um(em, tiles, placed)
    nominal = tile_errors_um(em, tiles, [t.pixel_to_stage for t in tiles])
    assert errors.max() < 1.0, errors
    assert nominal.max() > errors.max()          # the stage really missed
    with mrcfile.open(tmp_path / result["mrc"]) as mrc:
        assert mrc.data.shape == tuple(result["shape"])
        assert float(mrc.voxel_size.x) == pytest.approx(result["pixel_size_um"] * 1e4, rel=1e-5)
    assert np.allclose(sidecar["pixel_to_stage"], result["pixel_to_stage"])
    assert len(sidecar["overlaps"]) == result["stats"]["n_overlaps"]


def test_tiles_off_the_grid_disc_are_dropped(spec: Specimen) -> None:
    em = make_em(spec)
    layout = EMAtlasPlan(EMAtlasParams(grid_radius_um=1525.0)).layout(em)
    nx, ny = layout.tiles_xy
    assert 150 < nx * ny and len(layout.positions) < nx * ny
    assert max(np.hypot(*p) for p in layout.positions) < 1525.0 + 224.0


def test_tile_outside_stage_limits_refuses_before_moving(spec: Specimen, tmp_path: Path) -> None:
    em = make_em(spec)
    ctx = context(em, tmp_path)
    before, t0 = em.true_stage_position(), em.clock.now()
    plan = EMAtlasPlan(EMAtlasParams(centre_um=(1400.0, 0.0), grid_radius_um=400.0))
    with pytest.raises(LimitViolation, match=r"EM atlas refused before moving: tile \d+ at .*"
                                             r"stage x .* outside \[-1600, 1600\]"):
        run_plan(plan, ctx)
    assert em.true_stage_position() == before and em.clock.now() == t0
    assert not list(tmp_path.iterdir())


def test_params_refuse_unknown_keys() -> None:
    with pytest.raises(ValueError, match="grid_radius"):
        EMAtlasParams.model_validate({"grid_radius": 300.0})
