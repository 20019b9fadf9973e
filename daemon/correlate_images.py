"""Image inputs of `clemd correlate beads|atlas`: reading TIFF/MRC, and their runners.

Pixel (x, y) = (column, row) of the 2D array exactly as tifffile / mrcfile return it; no
flips anywhere. Anything unreadable or not a 2D image becomes a CorrelationInputError with
one line naming the file, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from daemon.correlate_schema import (
    CorrelateOutput,
    DetectionsOut,
    MatchOut,
    PairOut,
    TargetOut,
    output_model,
)
from protocols.correlation.atlas import register_atlas
from protocols.correlation.bead_images import correlate_bead_images
from protocols.correlation.beads_lm import BeadDetections
from protocols.correlation.errors import CorrelationInputError

MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".st", ".rec")


def read_image(path: Path, label: str) -> NDArray[np.generic]:
    """The 2D array of a TIFF or MRC file (singleton axes dropped, nothing flipped)."""
    if not path.is_file():
        raise CorrelationInputError(f"{label} {path}: no such file")
    try:
        if path.suffix.lower() in MRC_SUFFIXES:
            import mrcfile

            with mrcfile.open(path, permissive=False) as mrc:
                if mrc.data is None:
                    raise ValueError("no image data")
                data = np.array(mrc.data)
        else:
            import tifffile

            data = np.asarray(tifffile.imread(path))
    except CorrelationInputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError,
            zlib.error) as err:
        # tifffile raises TiffFileError (a ValueError); mrcfile ValueError or OSError.
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorrelationInputError(f"{label} {path}: cannot read image ({first})") from err
    if data.size == 0:
        raise CorrelationInputError(f"{label} {path}: cannot read image (no pixel data)")
    squeezed = np.squeeze(data)
    if squeezed.ndim != 2:
        raise CorrelationInputError(f"{label} {path}: expected a 2D image, got shape "
                                    f"{data.shape}")
    return squeezed


def _pixel(value: float, flag: str) -> float:
    if value is None or not np.isfinite(value) or value <= 0:
        raise CorrelationInputError(f"{flag}: pixel size must be a positive number of um, "
                                    f"got {value!r}")
    return float(value)


def _listed(det: BeadDetections) -> list[tuple[float, float, float]]:
    return [(float(x), float(y), float(s)) for (x, y), s in zip(det.xy_px, det.score)]


def run_beads(args: argparse.Namespace, started: float, ids: list[str],
              targets_px: NDArray[np.float64]) -> CorrelateOutput:
    """`correlate beads`: targets in LM pixels in, EM pixels out."""
    lm_px = _pixel(args.lm_pixel_um, "--lm-pixel-um")
    em_px = _pixel(args.em_pixel_um, "--em-pixel-um")
    lm_img = read_image(args.lm, "LM")
    em_img = read_image(args.em, "EM")
    res = correlate_bead_images(lm_img, lm_px, em_img, em_px, targets_px)
    det = DetectionsOut(lm_count=len(res.lm_beads), em_count=len(res.em_beads),
                        lm_xy_score=_listed(res.lm_beads), em_xy_score=_listed(res.em_beads))
    return output_model("beads", res.points, res.lm_beads.xy_px, res.em_beads.xy_px, ids,
                        "px", started, targets_xy=res.targets_em_px, detections=det)


def run_atlas(args: argparse.Namespace, started: float, ids: list[str],
              points_px: NDArray[np.float64]) -> CorrelateOutput:
    """`correlate atlas`: points (e.g. square centres) in LM pixels in, EM pixels out."""
    lm_px = _pixel(args.lm_pixel_um, "--lm-pixel-um")
    em_px = _pixel(args.em_pixel_um, "--em-pixel-um")
    res = register_atlas(read_image(args.lm, "LM"), lm_px, read_image(args.em, "EM"), em_px,
                         points_px)
    t = res.transform
    pts, errs = res.points_em_px, res.points_error_um
    ok = res.status == "ok" and t is not None and pts is not None and errs is not None
    targets = [TargetOut(id=i, x=float(p[0]), y=float(p[1]), predicted_error_um=float(e),
                         reliable=bool(e <= 0.25 * res.pitch_um))
               for i, p, e in zip(ids, pts, errs)] if ok and pts is not None \
        and errs is not None else []
    pairs = [PairOut(lm_index=k, em_index=k, lm_x=float(a[0]), lm_y=float(a[1]),
                     em_x=float(b[0]), em_y=float(b[1]), residual_um=float(r), loo_error_um=None)
             for k, (a, b, r) in enumerate(zip(res.lm_squares_px, res.em_squares_px,
                                               res.square_residuals_um))]
    match = MatchOut(n_inliers=len(pairs), runner_up_inliers=None, gate_radius_um=0.0,
                     nfa=None, hypotheses=8)
    transform = None if t is None else {**t.to_dict(), "mirrored": res.mirrored,
                                        "rotation_deg": res.rotation_deg,
                                        "confidence_sigmas": res.confidence,
                                        "z_best_sigmas": res.z_best, "score": res.score,
                                        "runner_up_score": res.runner_up}
    status: Literal["ok", "no_confident_match"] = "ok" if ok else "no_confident_match"
    return CorrelateOutput(command="atlas", status=status, reason=res.reason, units="px",
                           targets=targets, transform=transform, pairs=pairs,
                           leave_one_out_errors_um=[], match=match,
                           elapsed_s=time.perf_counter() - started)


__all__ = ["read_image", "run_atlas", "run_beads"]
