"""Navigator items of the simulated TEM and the image alignment behind RealignToNavItem.

SerialEM keeps navigator items (points, maps) with stage coordinates; returning to one
lands a micrometre or so off, so ``RealignToNavItem`` images the place at the map's
magnification, cross-correlates with the map and removes the offset with image shift.
``measure_shift`` is that correlation, written against the nominal pixel-to-stage affines
of both images only (what SerialEM itself knows), never against ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.fft
from numpy.typing import NDArray

from drivers.base import Image, NavItem
from drivers.errors import LimitViolation
from drivers.imaging import invert_affine

BANDPASS_SIGMAS_PX = (1.0, 12.0)


class Navigator:
    """In-memory navigator: items by id, ids unique and never reused."""

    def __init__(self) -> None:
        self._items: dict[int, NavItem] = {}
        self._next_id = 1

    def items(self) -> list[NavItem]:
        return list(self._items.values())

    def get(self, item_id: int) -> NavItem:
        if item_id not in self._items:
            raise LimitViolation(f"navigator item {item_id} does not exist")
        return self._items[item_id]

    def add(self, stage_um: tuple[float, float, float], *, kind: str, label: str = "",
            note: str = "", acquire: bool = False, map_image: Image | None = None) -> NavItem:
        item_id = self._next_id
        self._next_id += 1
        item = NavItem(item_id=item_id, label=label or str(item_id), stage_um=stage_um,
                       kind=kind, note=note, acquire=acquire, map_image=map_image)
        self._items[item_id] = item
        return item


@dataclass(frozen=True)
class ShiftMeasurement:
    """Where the specimen in ``image`` lies relative to where the reference predicts it.

    ``stage_um``: add this to the image shift to bring the reference's content back to its
    nominal place. ``score``: normalised correlation peak (0..1; below ~0.1 is a guess).
    """

    stage_um: tuple[float, float]
    pixels: tuple[float, float]
    score: float


def measure_shift(reference: Image, image: Image) -> ShiftMeasurement:
    """Cross-correlate ``image`` with ``reference`` warped into ``image``'s pixel grid."""
    ref_to_img = invert_affine(reference.pixel_to_stage)
    a_img = np.asarray(image.pixel_to_stage, dtype=float)
    # image pixel -> stage -> reference pixel (the map cv2 wants with WARP_INVERSE_MAP)
    m = np.hstack([ref_to_img[:, :2] @ a_img[:, :2],
                   (ref_to_img[:, :2] @ a_img[:, 2] + ref_to_img[:, 2])[:, None]])
    h, w = image.shape
    ref: NDArray[np.float32] = reference.data.astype(np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = np.asarray(cv2.warpAffine(ref, m, (w, h), flags=flags,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0.0),
                        dtype=np.float32)
    valid = np.asarray(cv2.warpAffine(np.ones_like(ref), m, (w, h), flags=flags,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0.0),
                       dtype=np.float32)
    mask = np.asarray(cv2.erode((valid > 0.999).astype(np.float32), np.ones((5, 5), np.uint8)),
                      dtype=np.float32)
    taper = mask * np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    a = _bandpass(warped, mask) * taper
    b = _bandpass(image.data.astype(np.float32), mask) * taper
    dx, dy, score = _xcorr_peak(a, b)
    d = a_img[:, :2] @ np.array([dx, dy])
    return ShiftMeasurement(stage_um=(float(d[0]), float(d[1])), pixels=(dx, dy), score=score)


def _bandpass(img: NDArray[np.float32], mask: NDArray[np.float32]) -> NDArray[np.float32]:
    """Difference of Gaussians inside ``mask`` (noise and slow shading both removed)."""
    lo, hi = BANDPASS_SIGMAS_PX
    m = img * mask
    fine = cv2.GaussianBlur(m, (0, 0), lo)
    coarse = cv2.GaussianBlur(m, (0, 0), hi)
    norm_f = cv2.GaussianBlur(mask, (0, 0), lo) + np.float32(1e-6)
    norm_c = cv2.GaussianBlur(mask, (0, 0), hi) + np.float32(1e-6)
    out: NDArray[np.float32] = (fine / norm_f - coarse / norm_c) * mask
    return out


def _xcorr_peak(a: NDArray[np.float32], b: NDArray[np.float32]) -> tuple[float, float, float]:
    """Shift d (pixels) that best maps ``a`` onto ``b`` (b(x) ~ a(x - d)), sub-pixel."""
    h, w = a.shape
    cc = scipy.fft.irfft2(np.conj(scipy.fft.rfft2(a)) * scipy.fft.rfft2(b), s=(h, w))
    iy, ix = np.unravel_index(int(np.argmax(cc)), cc.shape)
    peak = float(cc[iy, ix])

    def parabola(m1: float, c0: float, p1: float) -> float:
        denom = m1 - 2 * c0 + p1
        return 0.0 if denom >= 0 else 0.5 * (m1 - p1) / denom

    fx = parabola(float(cc[iy, (ix - 1) % w]), peak, float(cc[iy, (ix + 1) % w]))
    fy = parabola(float(cc[(iy - 1) % h, ix]), peak, float(cc[(iy + 1) % h, ix]))
    dx = ix + fx if ix < w / 2 else ix + fx - w
    dy = iy + fy if iy < h / 2 else iy + fy - h
    norm = float(np.sqrt((a * a).sum() * (b * b).sum())) or 1.0
    return float(dx), float(dy), peak / norm
