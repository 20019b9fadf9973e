"""Stitching against ground truth: tiles cut at true positions, labelled with nominal ones.

Absolute accuracy of any stitched mosaic is limited by the mean stage error of its tiles
(the mosaic keeps the mean nominal position), about sigma / sqrt(n) per axis, which no
stitcher can see. The cases below keep that under the 1 um the issue asks for, while single
tiles are off by up to 3 sigma; what stitching itself controls, the placement relative to
the other tiles, is checked separately and much tighter.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cv2
import numpy as np
import pytest
from mosaic_truth import TiledTruth, cut_tiles, field_shape_for, render_field

from drivers.errors import ConfigError
from drivers.imaging import Image, affine_from, invert_affine
from protocols.overlap_registration import RegistrationSettings, register_overlap, structure
from protocols.stitching import Mosaic, StitchingError, StitchSettings, stitch

LM: dict[str, Any] = {"grid": (4, 4), "tile_shape": (320, 320), "overlap": 0.1,
                      "pixel_um": 0.65, "stage_error_um": 1.5}
EM: dict[str, Any] = {"grid": (6, 6), "tile_shape": (192, 192), "overlap": 0.2,
                      "pixel_um": 0.04, "stage_error_um": 0.3}


def _truth(kind: str, spec: dict, seed: int, texture: float = 1.0, rotation_deg: float = 0.0
           ) -> TiledTruth:
    shape = field_shape_for(spec["grid"], spec["tile_shape"], spec["overlap"], spec["pixel_um"],
                            spec["stage_error_um"])
    field = render_field(kind, shape, spec["pixel_um"], seed=seed, texture=texture)  # type: ignore[arg-type]
    return cut_tiles(field, spec["pixel_um"], spec["grid"], spec["tile_shape"], spec["overlap"],
                     spec["stage_error_um"], seed=seed + 1, rotation_deg=rotation_deg,
                     instrument=kind)


@pytest.fixture(scope="module")
def lm_truth() -> TiledTruth:
    return _truth("lm", LM, seed=11)


@pytest.fixture(scope="module")
def em_truth() -> TiledTruth:
    return _truth("em", EM, seed=21)


def _errors(truth: TiledTruth, mosaic: Mosaic) -> np.ndarray:
    return truth.tile_errors_um([t.pixel_to_stage for t in mosaic.tiles])


def _relative_errors(truth: TiledTruth, mosaic: Mosaic) -> np.ndarray:
    """Tile errors after removing the common offset of the unflagged tiles."""
    keep = [k for k, t in enumerate(mosaic.tiles) if not t.flagged]
    offset = np.mean([mosaic.tiles[k].pixel_to_stage[:, 2] - truth.true_affines[k][:, 2]
                      for k in keep], axis=0)
    shift = np.hstack([np.zeros((2, 2)), offset[:, None]])
    return truth.tile_errors_um([t.pixel_to_stage - shift for t in mosaic.tiles])


def _nominal_errors(truth: TiledTruth) -> np.ndarray:
    return truth.tile_errors_um([t.pixel_to_stage for t in truth.tiles])


@pytest.mark.parametrize("rotation_deg", [0.0, 31.0], ids=["lm-camera-aligned", "lm-rotated-31deg"])
def test_lm_atlas_places_every_tile_within_1um_of_truth(rotation_deg: float) -> None:
    truth = _truth("lm", LM, seed=11, rotation_deg=rotation_deg)
    mosaic = stitch(truth.tiles, StitchSettings(max_stage_error_um=5.0))
    assert _nominal_errors(truth).max() > 2.0  # the stage alone would fail this test
    errors = _errors(truth, mosaic)
    assert errors.max() < 1.0, errors.round(2)
    assert _relative_errors(truth, mosaic).max() < 0.3
    assert not any(t.flagged for t in mosaic.tiles)
    used = [o for o in mosaic.overlaps if o.status == "used"]
    assert len(used) >= 2 * 4 * 3  # at least every edge-sharing pair
    assert max(o.residual_um for o in used) < 1.0


def test_em_square_map_places_every_tile_within_1um_of_truth(em_truth: TiledTruth) -> None:
    mosaic = stitch(em_truth.tiles, StitchSettings(max_stage_error_um=0.95, smoothing_sigma_px=1.5))
    assert _nominal_errors(em_truth).max() > 0.5
    errors = _errors(em_truth, mosaic)
    assert errors.max() < 1.0, errors.round(3)
    # 192-px tiles at ~40 counts per pixel: a corner tile may find no overlap it can trust; it
    # keeps its nominal place and says so, every other tile is far inside the 1 um asked for
    flagged = np.array([t.flagged for t in mosaic.tiles])
    assert flagged.sum() <= 2
    assert errors[~flagged].max() < 0.25, errors.round(3)


def _patch_shift(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Shift between two patches by windowed phase correlation of their smoothed gradients (a
    Hann window keeps the patch borders, at the same place in both, from pulling the answer
    to zero; gradients keep the flat bars and the illumination out of it)."""
    window = cv2.createHanningWindow(expected.shape[::-1], cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(structure(expected, 1.5), structure(actual, 1.5), window)
    return float(dx), float(dy)


@pytest.mark.parametrize("output_pixel_um", [None, 1.3], ids=["full-resolution", "downsampled-2x"])
def test_mosaic_affine_maps_specimen_features_within_1um(lm_truth: TiledTruth,
                                                         output_pixel_um: float | None) -> None:
    mosaic = stitch(lm_truth.tiles, StitchSettings(max_stage_error_um=5.0,
                                                   output_pixel_um=output_pixel_um))
    expected_px = output_pixel_um or LM["pixel_um"]
    assert mosaic.pixel_size_um == pytest.approx(expected_px)
    # what the mosaic should look like: the specimen resampled through the mosaic's affine
    field_affine = affine_from(lm_truth.field_pixel_um, 0.0, (0.0, 0.0), (1, 1))
    mosaic_to_field = (np.vstack([invert_affine(field_affine), [0, 0, 1]])
                       @ np.vstack([mosaic.pixel_to_stage, [0, 0, 1]]))[:2]
    expected = cv2.warpAffine(lm_truth.field, mosaic_to_field, mosaic.data.shape[::-1],
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    h, w = mosaic.data.shape
    half = 48
    for fy, fx in [(0.25, 0.25), (0.5, 0.5), (0.75, 0.3), (0.3, 0.8), (0.8, 0.75)]:
        r, c = int(fy * h), int(fx * w)
        shift = _patch_shift(expected[r - half:r + half, c - half:c + half],
                             mosaic.data[r - half:r + half, c - half:c + half])
        assert np.hypot(*shift) * mosaic.pixel_size_um < 1.0, (fy, fx, shift)


def test_featureless_tile_keeps_nominal_position_and_is_flagged(lm_truth: TiledTruth) -> None:
    rng = np.random.default_rng(5)
    blank = 500.0 + rng.normal(0, 10.0, LM["tile_shape"]).astype(np.float32)
    k = 5  # an inner tile: its neighbours still link the rest of the mosaic
    tiles = list(lm_truth.tiles)
    tiles[k] = tiles[k].with_data(blank)
    mosaic = stitch(tiles, StitchSettings(max_stage_error_um=5.0))
    tile = mosaic.tiles[k]
    assert tile.flagged and "no usable overlap" in tile.reason
    assert tile.n_overlaps_used == 0
    np.testing.assert_allclose(tile.pixel_to_stage, tiles[k].pixel_to_stage)
    assert all(o.status == "low_score" for o in mosaic.overlaps if k in (o.i, o.j))
    assert np.delete(_errors(lm_truth, mosaic), k).max() < 1.0
    assert np.delete(_relative_errors(lm_truth, mosaic), k).max() < 0.3
    assert sum(t.flagged for t in mosaic.tiles) == 1
    # the unplaced tile's local error is the stage's, like its expected error; a placed tile's
    # is its own edges' residuals (at least half a pixel), without the mosaic's common offset
    assert tile.local_error_um == tile.expected_error_um
    px = float(tiles[0].pixel_size_um)
    for t in mosaic.tiles:
        if not t.flagged:
            assert 0.5 * px - 1e-12 <= t.local_error_um < t.expected_error_um


def _lattice(shape: tuple[int, int], period_px: float, shift: tuple[float, float] = (0, 0)
             ) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    x, y = x + shift[0], y + shift[1]
    return (np.cos(2 * np.pi * x / period_px) + np.cos(2 * np.pi * y / period_px)).astype(np.float32)


@pytest.mark.parametrize(
    ("max_shift_px", "ambiguous"),
    [(15.0, False), (30.0, True)],
    ids=["search-within-half-period", "search-spans-a-period"],
)
def test_pure_lattice_prefers_peak_nearest_nominal_and_flags_ambiguity(
        max_shift_px: float, ambiguous: bool) -> None:
    a = _lattice((120, 200), 40.0)
    true = (7.0, -5.0)
    b = _lattice((80, 160), 40.0, (20 + true[0], 20 + true[1]))  # b sits at (20, 20) in a
    match = register_overlap(a, b, (20, 20), RegistrationSettings(max_shift_px=max_shift_px))
    assert match.shift_px == pytest.approx(true, abs=0.3)
    assert match.ambiguous is ambiguous
    assert (match.peak_ratio > 0.9) is ambiguous


def test_pure_lattice_mosaic_is_placed_when_errors_stay_within_half_a_period() -> None:
    # nothing but the 4 um hole lattice and shot noise; 3 sigma = 0.9 um < pitch / 4
    truth = _truth("em", EM, seed=31, texture=0.0)
    mosaic = stitch(truth.tiles, StitchSettings(max_stage_error_um=0.95, smoothing_sigma_px=1.5))
    assert _errors(truth, mosaic).max() < 0.25
    # the same tiles searched over more than a period: refused as ambiguous, never used wrongly
    wide = stitch(truth.tiles, StitchSettings(max_stage_error_um=3.0, smoothing_sigma_px=1.5))
    assert any(o.status == "ambiguous" for o in wide.overlaps)
    flagged = np.array([t.flagged for t in wide.tiles])
    assert np.all(_errors(truth, wide)[~flagged] < 1.0)


def test_overlap_report_measures_the_true_relative_shift(lm_truth: TiledTruth) -> None:
    mosaic = stitch(lm_truth.tiles, StitchSettings(max_stage_error_um=5.0))
    inv = invert_affine(lm_truth.tiles[0].pixel_to_stage)[:, :2]
    for o in mosaic.overlaps:
        if o.status != "used":
            continue
        true_px = inv @ (lm_truth.true_affines[o.j][:, 2] - lm_truth.true_affines[o.i][:, 2])
        assert np.hypot(*(np.asarray(o.measured_shift_px) - true_px)) * o.pixel_size_um < 1.0
        assert o.ncc >= 0.25 and o.residual_px < 3.0


def test_unusable_input_is_refused_before_registration(lm_truth: TiledTruth) -> None:
    with pytest.raises(StitchingError, match="no tiles"):
        stitch([])
    odd = lm_truth.tiles[1]
    odd = replace(odd, pixel_to_stage=odd.pixel_to_stage * np.array([[1.1, 1.1, 1], [1.1, 1.1, 1]]))
    with pytest.raises(StitchingError, match="tile 1: pixel size or rotation"):
        stitch([lm_truth.tiles[0], odd])
    with pytest.raises(StitchingError, match="output_pixel_um"):
        stitch(lm_truth.tiles, StitchSettings(max_output_pixels=1000))
    with pytest.raises(ConfigError, match="stitching.max_stage_error_um"):
        StitchSettings(max_stage_error_um=0.0)
    with pytest.raises(ConfigError, match="stitching.blend"):
        StitchSettings(blend="median")  # type: ignore[arg-type]


def test_single_tile_is_its_own_mosaic() -> None:
    data = np.arange(64 * 48, dtype=np.float32).reshape(48, 64)
    tile = Image(data=data, pixel_size_um=0.5, instrument="lm",
                 pixel_to_stage=affine_from(0.5, 0.0, (100.0, 200.0), data.shape))
    mosaic = stitch([tile])
    np.testing.assert_allclose(mosaic.data, data)
    np.testing.assert_allclose(mosaic.pixel_to_stage, tile.pixel_to_stage)
    assert mosaic.tiles[0].flagged  # nothing to check it against
    image = mosaic.as_image(tile)
    assert image.shape == data.shape and image.extra["mosaic_tiles"] == 1


def test_structure_and_placement_are_bit_identical_from_call_to_call(em_truth: TiledTruth
                                                                     ) -> None:
    """The same tiles give the same bits every time (a session replayed with one seed must
    decide the same): cv2.magnitude rounded differently with the output buffer's alignment,
    which moved placements by 1e-10 um between calls and, downstream, a bead match."""
    image = np.asarray(em_truth.tiles[0].data, np.float32)
    for log_scale in (False, True):
        outputs, junk = set(), []
        for k in range(12):
            junk.append(np.empty(1 + 4099 * k, np.float32))    # vary where arrays land
            outputs.add(structure(image, 1.5, log_scale).tobytes())
        assert len(outputs) == 1
    settings = StitchSettings(max_stage_error_um=0.6)
    placements = {np.stack([t.pixel_to_stage for t in stitch(em_truth.tiles, settings).tiles])
                  .tobytes() for _ in range(3)}
    assert len(placements) == 1
