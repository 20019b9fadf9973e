"""Acquisition-protocol benchmarks; prints ONE JSON object to stdout: a dict of sections.

Sections (more to come: realign, tracking, overhead):

- ``stitching``: stitching error against ground truth. Synthetic specimens with ground truth
  (tests/protocols/mosaic_truth.py) are cut into tiles at true positions (commanded + stage
  error) and labelled with commanded positions, as an instrument reports them:

  * ``lm_atlas_5x5``: transmitted-light 20x grid atlas, 25 tiles of 1024 x 1024 at 0.65 um
    (binned 2k camera), 10 % overlap, stage error 3 um per axis (clipped at 3 sigma);
  * ``em_montage_12x12``: medium-magnification map of one grid square, 144 tiles of
    384 x 384 at 25 nm, 20 % overlap, R2/2 hole lattice, low-dose shot noise, stage error
    0.3 um per axis.

  Per case: worst tile-corner error vs truth after stitching and with nominal positions
  (um); the same after removing the mosaic's common offset (``relative``: what stitching
  controls; the common offset is the mean stage error of the tiles, about sigma / sqrt(n),
  which no stitcher can see); mosaic feature error (the stitched array resampled against the specimen through the
  mosaic's affine, at 9 points), flagged tiles, overlaps used, solve residuals, seconds.

Run: ``.venv/bin/python -m benchmarks.protocols [--seeds N] [--section stitching]`` from the root
(the file name shadows the ``protocols`` package for scripts run from benchmarks/; this
script puts the repository root first on sys.path for that reason).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "protocols"))
from mosaic_truth import TiledTruth, cut_tiles, field_shape_for, render_field

from benchmarks.lm_protocols import lm_section
from benchmarks.protocols_em import em_section
from drivers.imaging import affine_from, invert_affine
from protocols.overlap_registration import structure
from protocols.stitching import Mosaic, StitchSettings, stitch

CASES: dict[str, dict[str, Any]] = {
    "lm_atlas_5x5": {"kind": "lm", "grid": (5, 5), "tile_shape": (1024, 1024), "overlap": 0.1,
                     "pixel_um": 0.65, "stage_error_um": 3.0,
                     "settings": StitchSettings(max_stage_error_um=9.0)},
    "em_montage_12x12": {"kind": "em", "grid": (12, 12), "tile_shape": (384, 384),
                         "overlap": 0.2, "pixel_um": 0.025, "stage_error_um": 0.3,
                         "settings": StitchSettings(max_stage_error_um=0.95,
                                                    smoothing_sigma_px=1.5)},
}


def _patch_shift(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Shift between two patches by windowed phase correlation of their smoothed gradients (a
    Hann window keeps the patch borders, at the same place in both, from pulling the answer
    to zero; gradients keep the flat bars and the illumination out of it)."""
    window = cv2.createHanningWindow(expected.shape[::-1], cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(structure(expected, 1.5), structure(actual, 1.5), window)
    return float(dx), float(dy)


def _feature_errors_um(truth: TiledTruth, mosaic: Mosaic, half: int = 48) -> list[float]:
    """Shift between the mosaic and the specimen seen through the mosaic's affine, at 9 points."""
    field_affine = affine_from(truth.field_pixel_um, 0.0, (0.0, 0.0), (1, 1))
    m = (np.vstack([invert_affine(field_affine), [0, 0, 1]])
         @ np.vstack([mosaic.pixel_to_stage, [0, 0, 1]]))[:2]
    expected = cv2.warpAffine(truth.field, m, mosaic.data.shape[::-1],
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    h, w = mosaic.data.shape
    out = []
    for fy in (0.2, 0.5, 0.8):
        for fx in (0.2, 0.5, 0.8):
            r, c = int(fy * h), int(fx * w)
            shift = _patch_shift(expected[r - half:r + half, c - half:c + half],
                                 mosaic.data[r - half:r + half, c - half:c + half])
            out.append(float(np.hypot(*shift) * mosaic.pixel_size_um))
    return out


def _stitch_case(name: str, spec: dict[str, Any], seed: int) -> dict[str, Any]:
    shape = field_shape_for(spec["grid"], spec["tile_shape"], spec["overlap"], spec["pixel_um"],
                            spec["stage_error_um"])
    field = render_field(spec["kind"], shape, spec["pixel_um"], seed=seed)
    truth = cut_tiles(field, spec["pixel_um"], spec["grid"], spec["tile_shape"], spec["overlap"],
                      spec["stage_error_um"], seed=seed + 1000, instrument=spec["kind"])
    start = time.perf_counter()
    mosaic = stitch(truth.tiles, spec["settings"])
    elapsed = time.perf_counter() - start
    stitched = truth.tile_errors_um([t.pixel_to_stage for t in mosaic.tiles])
    # the mosaic keeps the mean nominal position, so its absolute frame is off by the mean stage
    # error (~sigma / sqrt(n)); the relative error is what stitching itself controls
    offset = np.mean([t.pixel_to_stage[:, 2] - a[:, 2]
                      for t, a in zip(mosaic.tiles, truth.true_affines, strict=True)], axis=0)
    relative = truth.tile_errors_um([t.pixel_to_stage - np.hstack([np.zeros((2, 2)), offset[:, None]])
                                     for t in mosaic.tiles])
    nominal = truth.tile_errors_um([t.pixel_to_stage for t in truth.tiles])
    features = _feature_errors_um(truth, mosaic)
    statuses = [o.status for o in mosaic.overlaps]
    return {
        "seed": seed,
        "tile_error_um": {"max": float(stitched.max()), "median": float(np.median(stitched)),
                          "p95": float(np.percentile(stitched, 95))},
        "relative_tile_error_um": {"max": float(relative.max()),
                                   "median": float(np.median(relative))},
        "frame_offset_um": float(np.hypot(*offset)),
        "nominal_tile_error_um": {"max": float(nominal.max()),
                                  "median": float(np.median(nominal))},
        "feature_error_um": {"max": max(features), "median": float(np.median(features))},
        "tiles_within_1um": int((stitched < 1.0).sum()), "n_tiles": len(truth.tiles),
        "flagged_tiles": int(sum(t.flagged for t in mosaic.tiles)),
        "overlaps": {s: statuses.count(s) for s in sorted(set(statuses))},
        "rms_residual_um": mosaic.stats["rms_residual_um"],
        "max_residual_um": mosaic.stats["max_residual_um"],
        "mosaic_shape": list(mosaic.data.shape),
        "stitch_s": round(elapsed, 3),
    }


def stitching_section(seeds: int) -> dict[str, Any]:
    """Stitching error vs truth, per case and seed, with a summary per case."""
    out: dict[str, Any] = {"unit": "um", "criterion": "every tile within 1 um of truth"}
    for name, spec in CASES.items():
        runs = [_stitch_case(name, spec, seed) for seed in range(seeds)]
        out[name] = {
            "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()
                     if k != "settings"},
            "summary": {
                "worst_tile_error_um": max(r["tile_error_um"]["max"] for r in runs),
                "worst_relative_tile_error_um": max(r["relative_tile_error_um"]["max"]
                                                    for r in runs),
                "worst_feature_error_um": max(r["feature_error_um"]["max"] for r in runs),
                "worst_nominal_tile_error_um": max(r["nominal_tile_error_um"]["max"] for r in runs),
                "all_tiles_within_1um": all(r["tiles_within_1um"] == r["n_tiles"] for r in runs),
                "mean_stitch_s": float(np.mean([r["stitch_s"] for r in runs])),
                "max_stitch_s": max(r["stitch_s"] for r in runs),
            },
            "runs": runs,
        }
    return out


SECTIONS: dict[str, Callable[[int], dict[str, Any]]] = {"stitching": stitching_section,
                                                        "em": em_section, "lm": lm_section}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="random specimens per case")
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS),
                        help="run only these sections (default: all)")
    args = parser.parse_args(argv)
    structlog.configure(  # library logs to stderr, so stdout holds only the JSON
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30))
    report = {name: SECTIONS[name](args.seeds) for name in (args.section or sorted(SECTIONS))}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
