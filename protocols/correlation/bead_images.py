"""Bead correlation from images: fLM bead channel and EM map of one square.

Chains :func:`detect_lm_beads`, :func:`detect_em_beads` and :func:`correlate_points` so
that the CLI, the benchmark and the session protocol get one answer from one input. The
point matching runs in micrometres of each image's own pixel frame, ``(col, row) *
pixel size`` with no flips: the matcher finds rotation and mirror itself, and the pixel
sizes give scale to ~10%, which is all it needs. Targets go in as LM pixels and come back
as EM pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.beads_em import EmBeadConfig, detect_em_beads
from protocols.correlation.beads_lm import BeadDetections, LmBeadConfig, detect_lm_beads
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.points import PointCorrelation, correlate_points
from protocols.correlation.transforms import as_points

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class BeadImageCorrelation:
    """Detections on both sides, the point correlation (um) and the targets in EM pixels.

    ``targets_em_px`` is None unless the beads matched (see PointCorrelation.status).
    """

    lm_beads: BeadDetections
    em_beads: BeadDetections
    points: PointCorrelation
    targets_em_px: FloatArray | None


def correlate_bead_images(lm_image: ArrayLike, lm_pixel_um: float, em_image: ArrayLike,
                          em_pixel_um: float, targets_lm_px: ArrayLike | None = None, *,
                          lm_config: LmBeadConfig | None = None,
                          em_config: EmBeadConfig | None = None) -> BeadImageCorrelation:
    """Detect beads in both images, match them, transfer LM pixel targets to EM pixels.

    Raises CorrelationInputError for unusable images or pixel sizes, or when either image
    yields fewer than 2 beads (nothing to match); a failed match is a result.
    """
    targets = (np.zeros((0, 2)) if targets_lm_px is None
               else as_points(targets_lm_px, "targets", 0))
    lm = detect_lm_beads(lm_image, lm_pixel_um, lm_config)
    em = detect_em_beads(em_image, em_pixel_um, em_config)
    for name, det in (("LM image", lm), ("EM image", em)):
        if len(det) < 2:
            raise CorrelationInputError(f"{name}: {len(det)} bead(s) detected, need at least 2")
    res = correlate_points(lm.xy_um(lm_pixel_um), em.xy_um(em_pixel_um),
                           targets * lm_pixel_um, lm_weights=lm.score, em_weights=em.score,
                           from_frame="lm_px_um", to_frame="em_px_um")
    em_px = None if res.targets_um is None else res.targets_um / em_pixel_um
    return BeadImageCorrelation(lm, em, res, em_px)
