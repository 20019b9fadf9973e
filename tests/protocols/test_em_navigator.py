"""The navigator file: maps whose MapScaleMat reproduces the mosaic affine (SerialEM's rule
pixel = M (stage - StageXY) + (W/2, H/2)), targets as points to acquire drawn on their map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from em_sim import MappedSquare, context, make_em

from drivers.base import LimitViolation
from drivers.imaging import apply_affine
from drivers.serialem.navigator import ItemType, read
from protocols.em_navigator import (
    EMNavigatorParams,
    EMNavigatorPlan,
    NavMap,
    NavTarget,
    build_navigator,
)
from protocols.plan import run_plan
from simulators.specimen import Specimen


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> MappedSquare:
    spec = Specimen.generate(seed=4)
    return MappedSquare(make_em(spec), spec, tmp_path_factory.mktemp("nav"), tiles_xy=(2, 2))


def test_navigator_holds_maps_and_targets_that_serialem_reads_back(mapped: MappedSquare) -> None:
    ctx = context(mapped.em, mapped.data_dir, mapped.store)
    t1 = mapped.centre + np.array([3.0, 2.0])
    params = EMNavigatorParams(atlas=False, square_ids=("m",), targets=(
        {"id": "v1", "x_um": t1[0], "y_um": t1[1], "square_id": "m", "note": "virus 1"},
        {"id": "v2", "x_um": t1[0] - 5, "y_um": t1[1]}))
    run_plan(EMNavigatorPlan(params), ctx)
    nav = read(mapped.data_dir / "clemd.nav")
    assert ctx.result("em-navigator/write")["artifacts"][0]["path"] == "clemd.nav"
    (the_map,) = nav.maps()
    assert the_map.label == "square-m" and the_map.type == ItemType.MAP
    assert (mapped.data_dir / the_map.raw("MapFile")).exists()
    affine = np.asarray(mapped.result["pixel_to_stage"])
    pixels = np.array([[0.0, 0.0], [100.0, 40.0], [700.0, 900.0]])
    # SerialEM's rule, as the file stores it, maps stage to the same pixels as our affine, up to
    # the 6 significant digits SerialEM writes (StageXYZ 1025.39 um: +-5 nm, 0.3 map pixels)
    assert the_map.stage_to_pixel(apply_affine(affine, pixels)) == pytest.approx(pixels, abs=0.5)
    assert the_map.map_width_height == (mapped.result["shape"][1], mapped.result["shape"][0])
    points = [it for it in nav.items if it.type == ItemType.POINT]
    assert [p.label for p in points] == ["v1", "v2"]
    assert all(p.acquire for p in points)
    assert points[0].drawn_id == the_map.map_id and points[1].drawn_id is None
    assert points[0].stage_xyz[:2] == pytest.approx(tuple(t1), abs=0.006)   # 6 digits
    assert points[0].note == "virus 1"


def test_target_on_an_unknown_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LimitViolation, match="map 'square-x' is not in the navigator"):
        build_navigator([NavMap("square-m", "m.mrc", {"pixel_to_stage": [[1, 0, 0], [0, 1, 0]],
                                                      "shape": [10, 10]})],
                        [NavTarget("t", 1.0, 2.0, map_label="square-x")])
