"""The simulated autofocus: how well a beam-tilt pair measures defocus in a given field.

SerialEM's autofocus (FocusManager: AutoFocusStart -> DetectFocus -> AutoFocusData) takes two
shots with the beam tilted either way and reads the defocus from the image displacement
between them. What limits it is what the field holds: carbon and hole edges correlate well
(50-100 nm rms), thin featureless ice poorly, and an empty hole or a grid bar not at all (no
correlation peak; SerialEM then reports the autofocus as failed). This module judges a field
from the specimen maps the renderer made for it and turns the true defocus error into a
measurement with that noise, or raises ``AutofocusFailed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.base import AutofocusFailed
from simulators.electron_config import AutofocusModel
from simulators.electron_render import SpecimenMaps

#: Band of the contrast judgement (pixels of the focus frame): below the camera blur nothing
#: correlates, above ~a tenth of the field the displacement is ambiguous.
BAND_FINE_PX = 1.5
BAND_COARSE_PX = 12.0


@dataclass(frozen=True)
class FocusField:
    """What a focus field offers the correlation: mean transmission and contrast (rad rms)."""

    transmission: float
    contrast: float


def judge_field(maps: SpecimenMaps) -> FocusField:
    """Mean transmission, and the band-passed phase rms weighted by the transmission (a
    feature under a bar transmits nothing and so contributes nothing)."""
    t = maps.transmission.astype(np.float32)
    ph = maps.phase.astype(np.float32)
    band = cv2.GaussianBlur(ph, (0, 0), BAND_FINE_PX) - cv2.GaussianBlur(ph, (0, 0),
                                                                          BAND_COARSE_PX)
    weight = float(t.mean())
    contrast = math.sqrt(float(np.mean(t * band * band)) / weight) if weight > 0 else 0.0
    return FocusField(transmission=weight, contrast=contrast)


def measure_error(field: FocusField, true_error_um: float, model: AutofocusModel,
                  rng: np.random.Generator, where: str) -> float:
    """The defocus error a beam-tilt pair reports for ``field`` (um), or AutofocusFailed.

    ``where`` names the place for the message (area and stage position).
    """
    if field.transmission < model.min_transmission:
        raise AutofocusFailed(
            f"autofocus failed at {where}: mean transmission {field.transmission:.3f} under "
            f"{model.min_transmission:g} (em.autofocus.min_transmission): a grid bar or "
            f"thick ice")
    if field.contrast < model.min_contrast:
        raise AutofocusFailed(
            f"autofocus failed at {where}: contrast {field.contrast:.4f} rad under "
            f"{model.min_contrast:g} (em.autofocus.min_contrast): nothing to correlate "
            f"(empty hole or torn film)")
    scale = math.sqrt(max(1.0, model.reference_contrast / field.contrast))
    sigma = min(model.max_noise_rms_um, model.noise_rms_um * scale)
    return float(true_error_um + rng.normal(0.0, sigma))
