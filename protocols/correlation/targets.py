"""Target transfer through image pixel->stage affines and a fitted correlation.

Correlation is fitted between stage frames in micrometres (LM stage -> EM stage), because
that is where scale is known to ~10% and where SerialEM navigator points live. Targets,
though, are picked in image pixels; these helpers carry them

    LM pixel --A_lm--> LM stage --correlation--> EM stage --A_em^-1--> EM pixel

with each 2x3 affine mapping ``stage = A[:, :2] @ [col, row] + A[:, 2]`` (drivers.base).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from drivers.base import apply_affine, invert_affine
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.transforms import Transform2D, as_points

FloatArray = NDArray[np.float64]


def _check_affine(matrix: ArrayLike, name: str) -> FloatArray:
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape != (2, 3) or not np.all(np.isfinite(a)):
        raise CorrelationInputError(f"{name}: expected a finite 2x3 affine, got shape {a.shape}")
    if abs(float(np.linalg.det(a[:, :2]))) < 1e-12:
        raise CorrelationInputError(f"{name}: affine is singular")
    return a


def pixel_to_stage(pixel_to_stage_affine: ArrayLike, points_px: ArrayLike) -> FloatArray:
    """Map (N, 2) pixel (col, row) coordinates to stage micrometres."""
    a = _check_affine(pixel_to_stage_affine, "pixel_to_stage")
    return apply_affine(a, as_points(points_px, "pixel points", 0))


def stage_to_pixel(pixel_to_stage_affine: ArrayLike, points_um: ArrayLike) -> FloatArray:
    """Map (N, 2) stage micrometres back to pixel (col, row) coordinates."""
    a = _check_affine(pixel_to_stage_affine, "pixel_to_stage")
    return apply_affine(invert_affine(a), as_points(points_um, "stage points", 0))


def pixel_size_um(pixel_to_stage_affine: ArrayLike) -> float:
    """Mean pixel size (um) of an affine: the square root of its area scale."""
    a = _check_affine(pixel_to_stage_affine, "pixel_to_stage")
    return float(np.sqrt(abs(np.linalg.det(a[:, :2]))))


@dataclass(frozen=True)
class TransferredTargets:
    """Targets carried into the EM image: pixels and stage um, with predicted errors."""

    em_px: FloatArray
    em_stage_um: FloatArray
    predicted_error_um: FloatArray
    predicted_error_px: FloatArray


def transfer_pixels(targets_lm_px: ArrayLike, lm_pixel_to_stage: ArrayLike,
                    lm_to_em: Transform2D, em_pixel_to_stage: ArrayLike) -> TransferredTargets:
    """Carry LM pixel targets to EM pixels through ``lm_to_em`` (fitted stage -> stage).

    The predicted error is the correlation's (see Transform2D.predicted_error), expressed
    in EM pixels with the EM image's mean pixel size.
    """
    lm_um = pixel_to_stage(lm_pixel_to_stage, targets_lm_px)
    em_um = lm_to_em.apply(lm_um) if len(lm_um) else np.zeros((0, 2))
    err_um = lm_to_em.predicted_error(lm_um) if len(lm_um) else np.zeros(0)
    em_px = stage_to_pixel(em_pixel_to_stage, em_um)
    return TransferredTargets(em_px=em_px, em_stage_um=em_um, predicted_error_um=err_um,
                              predicted_error_px=err_um / pixel_size_um(em_pixel_to_stage))
