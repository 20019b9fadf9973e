"""LM grid atlas on the simulated microscope, against the specimen's ground truth.

The atlas is a real stitched one: 16 tiles of 512 x 512 at 20x over the whole mesh of a
small grid, with the simulator's stage error (0.7 um rms plus backlash), camera rotation and
tilted film. Its placement is checked against each frame's true pose and, independently, by
comparing the atlas with the specimen rendered through the atlas's own affine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydantic
import pytest
import tifffile
from lm_sim import (
    GRID_UM,
    RIM_UM,
    context,
    corner_error_um,
    grid_centre,
    scope,
    small_grid,
    true_affine,
)

from drivers.errors import LimitViolation
from drivers.imaging import apply_affine
from protocols.lm_atlas import LMAtlasParams, LMAtlasPlan, fit_focus_plane, tile_layout
from protocols.ome_tiff import read_ome_tiff
from protocols.overlap_registration import structure
from protocols.plan import StepContext, run_plan
from simulators.light import SimulatedLightMicroscope
from simulators.light_render import View
from simulators.specimen import Specimen

MESH_UM = GRID_UM - 2 * RIM_UM


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Specimen, SimulatedLightMicroscope, StepContext]]:
    spec = small_grid(seed=3)
    lm = scope(spec, (512, 512), seed=2)
    ctx = context(lm, tmp_path_factory.mktemp("atlas"))
    params = LMAtlasParams(centre_um=grid_centre(spec), diameter_um=MESH_UM, overlap=0.15)
    run_plan(LMAtlasPlan(params), ctx)
    yield spec, lm, ctx
    lm.close()


def test_tile_layout_covers_the_disc_along_camera_axes() -> None:
    tiles = tile_layout((100.0, -50.0), 3050.0, 0.325, 0.7, False, (2048, 2048), 0.1)
    assert len(tiles) == 25                       # the paper's 5 x 5 at 20x
    keys = [(t.row, t.col) for t in tiles]
    assert keys[:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 4)]   # serpentine
    step = np.hypot(tiles[1].x_um - tiles[0].x_um, tiles[1].y_um - tiles[0].y_um)
    assert step == pytest.approx(2048 * 0.9 * 0.325)
    angle = np.degrees(np.arctan2(tiles[1].y_um - tiles[0].y_um, tiles[1].x_um - tiles[0].x_um))
    assert angle == pytest.approx(0.7)
    assert np.mean([t.x_um for t in tiles]) == pytest.approx(100.0)


def test_focus_plane_drops_a_bad_point() -> None:
    xy = np.array([[0, 0], [500, 0], [0, 500], [-500, 0], [0, -500], [300, 300]], float)
    z = 2.0 + 1e-3 * xy[:, 0] - 2e-3 * xy[:, 1]
    z[5] += 8.0                                   # locked onto dirt
    plane = fit_focus_plane(np.column_stack([xy, z]), 1.5)
    assert 5 not in plane.used
    assert plane.z_at(1000, 1000) == pytest.approx(2.0 + 1.0 - 2.0, abs=1e-9)


def test_atlas_tiles_within_1um_of_truth(atlas_run: Any) -> None:
    _spec, lm, ctx = atlas_run
    stitch = ctx.result("lm-atlas/stitch")
    report = json.loads((ctx.data_dir / stitch["report"]).read_text())
    assert len(report["tiles"]) == 16 and stitch["flagged_tiles"] == []
    stitched, nominal = [], []
    for tile in report["tiles"]:
        frame = ctx.result(tile["key"])["frames"][0]
        truth = true_affine(lm, frame)
        stitched.append(corner_error_um(np.array(tile["pixel_to_stage"]), truth, (512, 512)))
        nominal.append(corner_error_um(np.array(frame["pixel_to_stage"]), truth, (512, 512)))
    assert max(stitched) < 1.0, stitched
    assert max(nominal) > max(stitched)           # the stage alone is worse than the atlas
    used = [o for o in report["overlaps"] if o["status"] == "used"]
    assert len(used) >= 20 and max(o["residual_um"] for o in used) < 0.3


def test_overlaps_are_registered_in_the_tile_steps(atlas_run: Any) -> None:
    """Each tile step commits its overlaps with the neighbours acquired before it (left or
    right in the serpentine, and above); the stitch step solves with exactly those."""
    _spec, _lm, ctx = atlas_run
    stitch = ctx.result("lm-atlas/stitch")
    committed = {}
    for j, key in enumerate(stitch["tile_keys"]):
        for e in ctx.result(key)["pairs"]:
            assert e["j"] == j and e["i"] < j       # only with tiles acquired earlier
            committed[(e["i"], e["j"])] = e["measured"]
    report = json.loads((ctx.data_dir / stitch["report"]).read_text())
    keys = stitch["tile_keys"]
    reported = {(keys.index(o["a"]), keys.index(o["b"])): o["measured_shift_px"]
                for o in report["overlaps"]}
    assert len(committed) == 24                     # 4 x 4 tiles: 12 + 12 edge neighbours
    assert reported == committed


def _render_truth(lm: SimulatedLightMicroscope, spec: Specimen, affine: np.ndarray,
                  origin_px: tuple[int, int], size: int) -> np.ndarray:
    """The specimen as a perfect in-focus camera would see it through ``affine``."""
    a = affine.copy()
    a[:, 2] = apply_affine(affine, np.array(origin_px, float))
    pts = np.array([[0, 0], [1, 0], [0, 1]], float)
    g = spec.truth.lm_stage_to_grid(apply_affine(a, pts))
    to_grid = np.column_stack([g[1] - g[0], g[2] - g[0], g[0]])
    centre = apply_affine(a, np.array([size / 2, size / 2]))
    focal = float(spec.truth.lm_focus.height(centre))
    view = View(pixel_to_grid=to_grid, pixel_to_stage=a, shape=(size, size),
                focal_plane_um=focal, time_s=0.0)
    return lm.render_expected("BF", 0.01, view)


def test_atlas_matches_the_specimen_everywhere(atlas_run: Any) -> None:
    """Independent of tile bookkeeping: patches of the atlas against the specimen rendered
    through the atlas affine, at bar edges all over the mesh."""
    spec, lm, ctx = atlas_run
    stitch = ctx.result("lm-atlas/stitch")
    atlas = read_ome_tiff(ctx.data_dir / stitch["path"])
    bf = next(im for im in atlas if im.channel == "BF")
    affine = np.array(stitch["pixel_to_stage"])
    h, w = bf.shape
    size = 128
    errors = []
    for fy in np.linspace(0.2, 0.8, 4):
        for fx in np.linspace(0.2, 0.8, 4):
            r, c = int(fy * h) - size // 2, int(fx * w) - size // 2
            patch = np.asarray(bf.data[r:r + size, c:c + size], np.float32)
            if patch.std() < 0.1 * patch.mean():
                continue                          # no bar edge here: nothing to measure
            expected = _render_truth(lm, spec, affine, (c, r), size)
            window = cv2.createHanningWindow((size, size), cv2.CV_32F)
            (dx, dy), _ = cv2.phaseCorrelate(structure(expected, 1.5), structure(patch, 1.5),
                                             window)
            errors.append(float(np.hypot(dx, dy) * bf.pixel_size_um))
    assert len(errors) >= 6
    assert max(errors) < 1.0, errors


def test_atlas_and_tiles_reopen_with_metadata(atlas_run: Any) -> None:
    _, _lm, ctx = atlas_run
    stitch = ctx.result("lm-atlas/stitch")
    path = ctx.data_dir / stitch["path"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
        data = tif.series[0].asarray()
    pixels = ome["Image"]["Pixels"]
    assert pixels["PhysicalSizeX"] == pytest.approx(stitch["pixel_size_um"])
    assert [c["Name"] for c in pixels["Channel"]] == ["BF", "DIC"]
    assert data.shape[-2:] == tuple(stitch["shape"])
    planes = read_ome_tiff(path)
    assert np.allclose(planes[0].pixel_to_stage, stitch["pixel_to_stage"])
    tile = ctx.result("lm-atlas/tile-r01-c02")
    tplanes = read_ome_tiff(ctx.data_dir / tile["path"])
    assert [p.channel for p in tplanes] == ["BF", "DIC"]
    assert tplanes[0].stage_um == pytest.approx(tuple(tile["stage_um"]))
    assert tplanes[0].objective == "20x" and tplanes[0].pixel_size_um == pytest.approx(0.325)
    assert {a["path"] for a in tile["artifacts"]} == {tile["path"]}


def test_focus_map_puts_tiles_in_focus(atlas_run: Any) -> None:
    _, lm, ctx = atlas_run
    for key in ("lm-atlas/tile-r00-c00", "lm-atlas/tile-r03-c03", "lm-atlas/tile-r02-c01"):
        tile = ctx.result(key)
        x, y, z = tile["stage_um"]
        assert z == pytest.approx(lm.focus_z_for((x, y), objective="20x"), abs=0.5)


def test_tile_grid_outside_stage_refused_before_moving(tmp_path: Path) -> None:
    lm = scope(small_grid(seed=3), (256, 256))
    ctx = context(lm, tmp_path)
    before = (lm.position_xy(), lm.position_z(), lm.clock.now())
    with pytest.raises(LimitViolation, match="stage x .* outside"):
        run_plan(LMAtlasPlan(LMAtlasParams(centre_um=(4900.0, 0.0), diameter_um=700.0)), ctx)
    with pytest.raises(LimitViolation, match="channel 'GFP' not available"):
        run_plan(LMAtlasPlan(LMAtlasParams(channels=("BF", "GFP"))), ctx)
    with pytest.raises(LimitViolation, match="objective '60x' not available"):
        run_plan(LMAtlasPlan(LMAtlasParams(objective="60x")), ctx)
    assert (lm.position_xy(), lm.position_z(), lm.clock.now()) == before
    assert ctx.store.get("lm-atlas/focus-00") is None


def test_params_are_strict() -> None:
    with pytest.raises(pydantic.ValidationError):
        LMAtlasParams.model_validate({"overlapp": 0.2})
    with pytest.raises(pydantic.ValidationError, match="lists a channel twice"):
        LMAtlasParams(channels=("BF", "BF"))
    assert LMAtlasParams().kind == "lm_atlas"
