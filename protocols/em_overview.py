"""Anchor a montage to one lower-magnification overview of the whole area.

Why: overlaps give the fine relative placement of neighbouring tiles, but only where the
overlap shows something. Over a square with cells, tiles over thick cell bodies (3-6 um of
biological material: nothing gets through at 300 kV) have no usable overlap, so they kept
their stage position, and a TEM stage misses by ~1 um (worst tile 2.85 um in the benchmark).
Facilities anchor such maps to an overview: one image at an intermediate or LM-range
magnification whose field holds the whole montage. Each tile, downsampled to the overview's
pixel, is matched against it; the match is an absolute constraint (tile relative to the
overview, whose own stage miss and calibration error the solve estimates,
protocols/mosaic_solve.py), weighted by its score and by the overview's coarser pixel.

- ``overview_settings``: the highest magnification (at or below the montage's) whose field
  holds the montage footprint plus ``margin_um`` on every side, in the overview camera's own
  axes (LM and SA ranges differ by ~90 degrees of image rotation);
- ``match_tile``: the tile is smoothed (anti-aliasing) and resampled into the overview's
  pixel grid through both nominal affines; the overview crop around it, widened by the
  search radius, and the resampled tile are compared as smoothed gradients by masked NCC
  (protocols/overlap_registration.py). The match is ambiguous (and refused by the solve)
  when another shift scores alike: a hole lattice alone cannot anchor a tile, and an anchor
  has no loop of overlaps to catch a wrong period.

Pure computation besides ``overview_settings`` (which reads the magnification table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from drivers.base import AcquisitionSettings, ElectronMicroscope, Image
from drivers.errors import LimitViolation
from drivers.imaging import affine_from, apply_affine, invert_affine
from protocols.em_params import FrozenParams
from protocols.overlap_registration import (
    RegistrationSettings,
    context_px,
    register_overlap,
    structure,
)
from protocols.stitching import AnchorMatch

__all__ = ["OverviewParams", "match_tile", "match_tiles", "montage_corners", "overview_settings"]

FloatArray = NDArray[np.float64]


class OverviewParams(FrozenParams):
    """The overview that anchors a montage (None in a plan: no overview, overlaps only).

    ``mag_index`` None picks the highest magnification whose field holds the montage and
    ``margin_um`` around it (the stage misses of overview and tiles); ``binning``,
    ``exposure_s``, ``dose_rate_e_per_a2_s`` and ``defocus_offset_um`` None take the montage
    area's values (the same defocus keeps the overview looking like the tiles).
    ``smoothing_sigma_px`` (overview pixels) is the registration's gradient scale.
    """

    mag_index: int | None = Field(default=None, ge=0)
    binning: int | None = Field(default=4, ge=1, le=32)
    exposure_s: float | None = Field(default=None, gt=0)
    dose_rate_e_per_a2_s: float | None = Field(default=None, ge=0)
    defocus_offset_um: float | None = Field(default=None, ge=-500, le=500)
    margin_um: float = Field(default=3.0, ge=0, le=50)
    smoothing_sigma_px: float = Field(default=1.0, gt=0, le=10)


def _field_holds(em: ElectronMicroscope, mag_index: int, corners_um: FloatArray) -> bool:
    """Whether the unbinned camera field at ``mag_index`` holds these stage points around
    its centre (the points' bounding box centre), in its own camera axes."""
    mag = em.magnification(mag_index)
    h, w = em.camera_shape(1)
    cam = invert_affine(affine_from(1.0, mag.rotation_deg, (0.0, 0.0), (1, 1)))[:, :2]
    local = (corners_um - corners_um.mean(axis=0)) @ cam.T
    extent = local.max(axis=0) - local.min(axis=0)
    return bool(extent[0] <= w * mag.pixel_size_um and extent[1] <= h * mag.pixel_size_um)


def overview_settings(em: ElectronMicroscope, base: AcquisitionSettings,
                      tile_corners_um: FloatArray, p: OverviewParams) -> AcquisitionSettings:
    """Settings of the overview shot for a montage whose tiles' corners are given (stage um).

    LimitViolation when ``p.mag_index`` is not in the table or no magnification at or below
    the montage's holds the montage (reduce the tiles or the margin, or set ``mag_index``).
    """
    lo, hi = tile_corners_um.min(axis=0) - p.margin_um, tile_corners_um.max(axis=0) + p.margin_um
    box = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    if p.mag_index is not None:
        em.magnification(p.mag_index)
        index = p.mag_index
    else:
        top = em.magnification(base.mag_index).magnification
        fits = [m for m in em.magnifications.values()
                if m.magnification <= top and _field_holds(em, m.index, box)]
        if not fits:
            raise LimitViolation(f"no magnification at or below {top:g}x holds the montage "
                                 f"({hi[0] - lo[0]:.0f} x {hi[1] - lo[1]:.0f} um with "
                                 f"overview.margin_um {p.margin_um:g}): set overview.mag_index "
                                 "or overview None")
        index = max(fits, key=lambda m: m.magnification).index
    return AcquisitionSettings(
        mag_index=index, exposure_s=base.exposure_s if p.exposure_s is None else p.exposure_s,
        binning=base.binning if p.binning is None else p.binning,
        dose_rate_e_per_a2_s=(base.dose_rate_e_per_a2_s if p.dose_rate_e_per_a2_s is None
                              else p.dose_rate_e_per_a2_s),
        defocus_offset_um=(base.defocus_offset_um if p.defocus_offset_um is None
                           else p.defocus_offset_um))


def montage_corners(em: ElectronMicroscope, positions: Sequence[tuple[float, float]],
                    settings: AcquisitionSettings) -> FloatArray:
    """Stage corners (4 per tile) of a montage's tiles, from their nominal centres."""
    mag = em.magnification(settings.mag_index)
    h, w = em.camera_shape(settings.binning)
    px = mag.pixel_size_um * settings.binning
    out = []
    for x, y in positions:
        a = affine_from(px, mag.rotation_deg, (x, y), (h, w))
        out.append(apply_affine(a, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]],
                                            float)))
    return np.vstack(out)


def _centre_um(img: Image) -> FloatArray:
    h, w = img.shape
    return np.asarray(apply_affine(img.pixel_to_stage, np.array([(w - 1) / 2, (h - 1) / 2])),
                      dtype=np.float64)


def match_tile(tile: Image, overview: Image, index: int, max_shift_um: float,
               sigma_px: float = 1.0, min_inside: float = 0.5, log_scale: bool = False
               ) -> AnchorMatch | None:
    """Match ``tile`` against ``overview`` within ``max_shift_um`` (per axis) of where the
    nominal affines put it; None when less than ``min_inside`` of the tile lies in the
    overview with room to search. ``log_scale``: compare log-compressed gradients
    (protocols/overlap_registration.py ``structure``)."""
    ratio = overview.pixel_size_um / tile.pixel_size_um
    # tile pixel -> overview pixel
    t2o = (np.vstack([invert_affine(overview.pixel_to_stage), [0, 0, 1]])
           @ np.vstack([np.asarray(tile.pixel_to_stage, float), [0, 0, 1]]))[:2]
    th, tw = tile.shape
    corners = apply_affine(t2o, np.array([[0, 0], [tw - 1, 0], [0, th - 1], [tw - 1, th - 1]],
                                         float))
    oh, ow = overview.shape
    search = max_shift_um / overview.pixel_size_um
    margin = math.ceil(search) + context_px(sigma_px) + 1
    x0, y0 = (math.floor(v) for v in corners.min(axis=0))
    x1, y1 = (math.ceil(v) + 1 for v in corners.max(axis=0))
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(ow, x1), min(oh, y1)
    inside = max(0, cx1 - cx0) * max(0, cy1 - cy0) / max(1, (x1 - x0) * (y1 - y0))
    if inside < min_inside or cx0 - margin < 0 or cy0 - margin < 0 \
            or cx1 + margin > ow or cy1 + margin > oh:
        return None
    # the tile in the overview's pixels over [cx0, cx1) x [cy0, cy1), smoothed against aliasing
    src = np.asarray(tile.data, np.float32)
    if ratio > 1.5:
        src = np.asarray(cv2.GaussianBlur(src, (0, 0), 0.5 * ratio), np.float32)
    shift = np.array([[1.0, 0.0, cx0], [0.0, 1.0, cy0], [0.0, 0.0, 1.0]])
    o2t = (np.vstack([invert_affine(t2o), [0, 0, 1]]) @ shift)[:2]
    size = (cx1 - cx0, cy1 - cy0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    b = cv2.warpAffine(src, o2t, size, flags=flags, borderMode=cv2.BORDER_REFLECT)
    valid = cv2.warpAffine(np.ones_like(src), o2t, size, flags=flags,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    c = context_px(sigma_px)
    mask_b = cv2.erode((valid > 0.999).astype(np.uint8), np.ones((2 * c + 1, 2 * c + 1),
                                                                 np.uint8)) > 0
    a_raw = np.asarray(overview.data[cy0 - margin:cy1 + margin, cx0 - margin:cx1 + margin],
                       np.float32)
    a, fb = structure(a_raw, sigma_px, log_scale), structure(b, sigma_px, log_scale)
    a_mask = np.ones(a.shape, bool)
    reg = RegistrationSettings(max_shift_px=search, peak_sigma_px=sigma_px)
    match = register_overlap(a, fb, (margin, margin), reg, a_mask, mask_b)
    linear = np.asarray(overview.pixel_to_stage, float)[:, :2]
    d_um = linear @ np.asarray(match.shift_px)
    lever = _centre_um(tile) - _centre_um(overview)
    return AnchorMatch(index, (float(d_um[0]), float(d_um[1])),
                       (float(lever[0]), float(lever[1])), match.ncc, match.z_score,
                       match.peak_ratio, match.ambiguous, float(ratio))


def match_tiles(tiles: Sequence[Image], overview: Image, max_shift_um: float,
                sigma_px: float = 1.0, log_scale: bool = False) -> list[AnchorMatch]:
    """``match_tile`` for every tile (tile index = position in ``tiles``); tiles outside the
    overview are left out."""
    out = []
    for k, tile in enumerate(tiles):
        m = match_tile(tile, overview, k, max_shift_um, sigma_px, log_scale=log_scale)
        if m is not None:
            out.append(m)
    return out
