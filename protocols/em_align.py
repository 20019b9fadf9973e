"""Align an EM image to a reference through both nominal pixel-to-stage affines.

Why through the affines: the reference (a square map at 4,700x, or the previous tilt) and the
new image differ in magnification, binning, rotation and image shift; the affines say where
each pixel should be, so the reference is resampled onto the new image's pixel grid and only
the residual displacement is left to measure. That displacement is the stage error
(realign) or the drift caused by tilting (tracking).

How: the reference is warped (optionally stretched across the tilt axis by the change in
foreshortening, about given anchor points), both are band-passed (difference of Gaussians
scaled to the coarser pixel, inside the overlap mask, tapered), cross-correlated by FFT, and
the peak is searched only within ``max_shift_um`` of zero: lattices (the 4 um hole pitch) give
several equally good peaks, and the nearest one to the prediction is the right one as long as
the prediction is better than half a period. Sub-pixel by parabola fits.

Pure computation; raises ``AlignmentError`` when the images do not overlap enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import scipy.fft
from numpy.typing import NDArray

from drivers.base import Image
from drivers.errors import ClemdError
from drivers.imaging import invert_affine

__all__ = ["Alignment", "AlignmentError", "align_to_reference", "stretch_across_axis"]

FloatArray = NDArray[np.float64]


class AlignmentError(ClemdError, ValueError):
    """Reference and image share too little area to be aligned (wrong map, target off it)."""


@dataclass(frozen=True)
class Alignment:
    """Where the reference's content really lies in the new image.

    ``shift_px``: content displacement in image pixels (image(x) ~ reference(x - d)).
    ``shift_um``: the same in stage micrometres; adding it to the image shift re-centres the
    beam on what the reference predicted at the image centre. ``score``: normalised
    correlation at the peak (0..1; below ~0.05 the peak is noise). ``overlap``: fraction of the
    image the reference covered.
    """

    shift_px: tuple[float, float]
    shift_um: tuple[float, float]
    score: float
    overlap: float

    @property
    def magnitude_um(self) -> float:
        return float(math.hypot(*self.shift_um))


def stretch_across_axis(axis_deg: float, factor: float) -> FloatArray:
    """2x2 stage-frame matrix scaling by ``factor`` perpendicular to the tilt axis.

    Going from tilt t_ref to t_new, the specimen foreshortens across the axis by
    cos(t_new) / cos(t_ref); along the axis nothing changes.
    """
    a = math.radians(axis_deg)
    u = np.array([math.cos(a), math.sin(a)])
    v = np.array([-math.sin(a), math.cos(a)])
    return np.outer(u, u) + factor * np.outer(v, v)


def _image_to_reference(reference: Image, image: Image, stretch: FloatArray | None,
                        ref_anchor_um: FloatArray | None,
                        image_anchor_um: FloatArray | None) -> FloatArray:
    """2x3 map from image pixels to reference pixels."""
    a_img = np.vstack([np.asarray(image.pixel_to_stage, float), [0.0, 0.0, 1.0]])
    to_ref = np.vstack([invert_affine(reference.pixel_to_stage), [0.0, 0.0, 1.0]])
    model = np.eye(3)
    if stretch is not None:
        ra = np.zeros(2) if ref_anchor_um is None else np.asarray(ref_anchor_um, float)
        ia = np.zeros(2) if image_anchor_um is None else np.asarray(image_anchor_um, float)
        inv = np.linalg.inv(np.asarray(stretch, float))
        model[:2, :2] = inv
        model[:2, 2] = ra - inv @ ia
    elif ref_anchor_um is not None or image_anchor_um is not None:
        ra = np.zeros(2) if ref_anchor_um is None else np.asarray(ref_anchor_um, float)
        ia = np.zeros(2) if image_anchor_um is None else np.asarray(image_anchor_um, float)
        model[:2, 2] = ra - ia
    out: FloatArray = (to_ref @ model @ a_img)[:2]
    return out


def _bandpass(img: NDArray[np.float32], mask: NDArray[np.float32], lo: float,
              hi: float) -> NDArray[np.float32]:
    """Difference of Gaussians normalised inside ``mask`` (noise and shading removed)."""
    m = img * mask
    fine = cv2.GaussianBlur(m, (0, 0), lo) / (cv2.GaussianBlur(mask, (0, 0), lo) + 1e-6)
    coarse = cv2.GaussianBlur(m, (0, 0), hi) / (cv2.GaussianBlur(mask, (0, 0), hi) + 1e-6)
    out: NDArray[np.float32] = ((fine - coarse) * mask).astype(np.float32)
    return out


def _peak(cc: FloatArray, max_shift_px: float, expect_px: FloatArray
          ) -> tuple[float, float, float]:
    """Sub-pixel (dx, dy) of the highest peak within ``max_shift_px`` of ``expect_px``."""
    h, w = cc.shape
    fy = np.fft.fftfreq(h) * h
    fx = np.fft.fftfreq(w) * w
    allowed = np.hypot(fx[None, :] - expect_px[0], fy[:, None] - expect_px[1]) <= max_shift_px
    masked = np.where(allowed, cc, -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(masked)), cc.shape)
    peak = float(cc[iy, ix])

    def parabola(m1: float, c0: float, p1: float) -> float:
        denom = m1 - 2 * c0 + p1
        return 0.0 if denom >= 0 else float(np.clip(0.5 * (m1 - p1) / denom, -0.5, 0.5))

    sx = parabola(float(cc[iy, (ix - 1) % w]), peak, float(cc[iy, (ix + 1) % w]))
    sy = parabola(float(cc[(iy - 1) % h, ix]), peak, float(cc[(iy + 1) % h, ix]))
    return float(fx[ix] + sx), float(fy[iy] + sy), peak


def align_to_reference(reference: Image, image: Image, *, max_shift_um: float,
                       stretch: FloatArray | None = None,
                       ref_anchor_um: FloatArray | None = None,
                       image_anchor_um: FloatArray | None = None,
                       expect_um: tuple[float, float] = (0.0, 0.0),
                       smooth_px: float = 1.0, min_overlap: float = 0.3) -> Alignment:
    """Measure how far ``image``'s content lies from where ``reference`` predicts it.

    Without ``stretch`` both images are placed by their affines in the same stage frame.
    With it, reference stage point X_r is predicted at ``image_anchor + S (X_r - ref_anchor)``
    (tracking: the anchors are where the target was and where the beam now points).
    ``max_shift_um`` bounds the search around ``expect_um`` (the displacement already known,
    e.g. the stage error a coarser image measured; keep the bound under half a lattice period
    when the images show a lattice). ``smooth_px`` is the least band-pass sigma (noise). Raises AlignmentError when under ``min_overlap`` of the image is covered.
    """
    if not max_shift_um > 0:
        raise AlignmentError(f"max_shift_um must be > 0, got {max_shift_um}")
    h, w = image.shape
    m = _image_to_reference(reference, image, stretch, ref_anchor_um, image_anchor_um)
    ratio = reference.pixel_size_um / image.pixel_size_um   # > 1: reference is coarser
    ref: NDArray[np.float32] = reference.data.astype(np.float32)
    if ratio < 0.7:   # reference finer than the image: blur before sampling it coarsely
        ref = np.asarray(cv2.GaussianBlur(ref, (0, 0), 0.5 / ratio), dtype=np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(ref, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0.0)
    valid = cv2.warpAffine(np.ones_like(ref), m, (w, h), flags=flags,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    mask = np.asarray(cv2.erode((valid > 0.999).astype(np.float32), np.ones((5, 5), np.uint8)),
                      dtype=np.float32)
    overlap = float(mask.mean())
    if overlap < min_overlap:
        raise AlignmentError(f"reference covers {overlap:.0%} of the image, less than "
                             f"{min_overlap:.0%}: is the target on this map?")
    lo = max(smooth_px, ratio)
    hi = max(8.0 * lo, min(h, w) / 16)
    taper = (mask * np.outer(np.hanning(h), np.hanning(w))).astype(np.float32)
    a = _bandpass(np.asarray(warped, np.float32), mask, lo, hi) * taper
    b = _bandpass(image.data.astype(np.float32), mask, lo, hi) * taper
    fa = scipy.fft.rfft2(a)
    fb = scipy.fft.rfft2(b)
    cc = np.asarray(scipy.fft.irfft2(np.conj(fa) * fb, s=(h, w)), dtype=np.float64)
    linear = np.asarray(image.pixel_to_stage, float)[:, :2]
    max_px = max_shift_um / image.pixel_size_um
    expect_px = np.linalg.solve(linear, np.asarray(expect_um, float))
    dx, dy, peak = _peak(cc, max_px, expect_px)
    norm = float(np.sqrt(float((a * a).sum()) * float((b * b).sum()))) or 1.0
    d_um = linear @ np.array([dx, dy])
    return Alignment((dx, dy), (float(d_um[0]), float(d_um[1])), peak / norm, overlap)
