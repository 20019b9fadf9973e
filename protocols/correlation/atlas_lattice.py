"""The grid-bar lattice of one atlas, and the atlas resampled into lattice (square-index) space.

Why (docs/clem-workflow.md, "Atlas registration"): both modalities see the metal as dark, so
the picture compared is a dark-metal mask at a common working pixel size. The bars fix the
lattice angle (mod 90 degrees) and pitch from the strongest Fourier peak. Square openings
(bright blobs of about one opening's area) then give each square an integer index (i, j)
and, by a robust affine fit of index -> centre, a centre for every square, also for those
whose opening was not found (finder marks, partial squares, dark squares).

Every square is resampled into a ``k x k`` patch aligned with the lattice axes and centred
on its own measured opening where there is one, so that slow drifts of the lattice (a
slightly wrong pitch, distortion of a montage) do not leave a residual that looks like
content. Pixel (x, y) = (column, row).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from protocols.correlation.errors import CorrelationInputError

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
_Cell = TypeVar("_Cell", bound=np.generic)


def resample(img: FloatArray, pixel_um: float, work_um: float) -> FloatArray:
    """``img`` at ``work_um`` per pixel (area-averaged when shrinking)."""
    f = pixel_um / work_um
    h, w = img.shape
    size = (max(8, round(w * f)), max(8, round(h * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(img.astype(np.float32), size, interpolation=interp), np.float64)


def dark_mask(img: FloatArray) -> BoolArray:
    """Metal (and whatever is as dark): Otsu on the percentile-normalised image."""
    lo, hi = np.percentile(img, [1, 99])
    u8 = np.clip((img - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    u8 = cv2.GaussianBlur(u8, (0, 0), 1.0)
    _, mask = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.asarray(mask == 0)


def _flatten(img: FloatArray, pitch_px: float) -> FloatArray:
    """``img`` rescaled to 0..1 between its local darkest and brightest levels.

    The window (about 1.5 pitches) always holds both metal and an opening, so vignetting,
    stitching and montage steps and an ice-thickness gradient across the grid all drop out.
    """
    size = max(3, round(1.5 * pitch_px) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    f = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0)
    lo = cv2.GaussianBlur(cv2.erode(f, kernel), (0, 0), 0.5 * pitch_px)
    hi = cv2.GaussianBlur(cv2.dilate(f, kernel), (0, 0), 0.5 * pitch_px)
    span = np.maximum(hi - lo, 1e-6 + 1e-3 * float(np.ptp(f)))
    return np.asarray(np.clip((f - lo) / span, 0.0, 1.0), np.float64)


def _whole_openings(mask: BoolArray, pitch_px: float) -> int:
    """Openings whose area is within 30% of the typical one.

    A threshold that cuts squares in two (a cell or an ice gradient across the opening)
    yields more, smaller blobs; counting only blobs of the common size keeps such a mask
    from looking better than one that shows each square whole.
    """
    lab, n = ndimage.label(~mask)
    if n == 0:
        return 0
    area = ndimage.sum(np.ones(mask.shape), lab, np.arange(1, n + 1))
    nominal = (0.72 * pitch_px) ** 2
    area = area[(area > 0.35 * nominal) & (area < 1.6 * nominal)]
    if area.size == 0:
        return 0
    med = float(np.median(area))
    return int(np.sum(np.abs(area - med) <= 0.3 * med))


def metal_mask(img: FloatArray, work_um: float, min_pitch_um: float, max_pitch_um: float
               ) -> BoolArray:
    """The metal of the grid, whichever its polarity and wherever its threshold lies.

    One global threshold fails on real atlases: an EM atlas has three levels (black bars,
    grey ice, bright broken squares) and Otsu may split grey from bright; a reflected-light
    or inverted overview shows the metal bright. So the image is also flattened locally
    and every (polarity, level) is tried; a mask replaces the plain Otsu one only when it
    shows clearly more whole square openings - what the rest of the pipeline needs.
    """
    otsu = dark_mask(img)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip(img, lo, hi)
    pitches = {lattice_angle_pitch(x, work_um, min_pitch_um, max_pitch_um)[1]
               for x in (otsu, grey)}  # a bad mask can show a multiple of the pitch
    n_otsu = max(_whole_openings(otsu, p / work_um) for p in pitches)
    tried: list[tuple[int, float, BoolArray]] = []
    for pitch_um in sorted(pitches):
        flat = _flatten(img, pitch_um / work_um)
        for level in (0.2, 0.3, 0.4, 0.5, 0.6):
            for mask in (flat < level, flat > 1.0 - level):
                tried.append((_whole_openings(mask, pitch_um / work_um), level, mask))
    top = max(n for n, _, _ in tried)
    if n_otsu >= top / 1.1:
        return otsu
    # Near-ties: the level midway between metal and film keeps thin marks (finder letters)
    # that an extreme level erodes away.
    near = [t for t in tried if t[0] >= 0.97 * top]
    return np.asarray(min(near, key=lambda t: abs(t[1] - 0.45))[2], dtype=bool)


def lattice_angle_pitch(dark: BoolArray | FloatArray, work_um: float, min_pitch_um: float,
                        max_pitch_um: float) -> tuple[float, float]:
    """(angle_deg mod 90, pitch_um) of the strongest periodicity of the metal mask.

    The mask itself, not its edges: a bar profile's fundamental is its strongest harmonic
    whatever the bar width (|sin(n x) / n| <= |sin x|), whereas two edges per pitch can
    make the edges' third harmonic the strongest. A lower sub-multiple carrying at least
    half the peak is still preferred (a pattern repeating every other bar).
    """
    rep = dark.astype(np.float64)
    rep -= rep.mean()
    h, w = rep.shape
    spec = np.abs(np.fft.fftshift(np.fft.fft2(rep * np.outer(np.hanning(h), np.hanning(w)))))
    fy = (np.arange(h) - h // 2) / (h * work_um)
    fx = (np.arange(w) - w // 2) / (w * work_um)
    fr = np.hypot(fx[None, :], fy[:, None])
    spec = np.where((fr >= 1 / max_pitch_um) & (fr <= 1 / min_pitch_um), spec, 0.0)
    r, c = np.unravel_index(int(np.argmax(spec)), spec.shape)
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, h), max(c - 1, 0), min(c + 2, w)
    wgt = spec[r0:r1, c0:c1]
    yy, xx = np.mgrid[r0:r1, c0:c1]
    pr, pc = float((wgt * yy).sum() / wgt.sum()), float((wgt * xx).sum() / wgt.sum())
    fyp, fxp = (pr - h // 2) / (h * work_um), (pc - w // 2) / (w * work_um)
    top, n_best = spec[r, c], 1
    for n in range(2, 6):
        if np.hypot(fxp, fyp) / n < 1 / max_pitch_um:
            break
        rn, cn = round(h // 2 + (pr - h // 2) / n), round(w // 2 + (pc - w // 2) / n)
        local = spec[max(rn - 1, 0):rn + 2, max(cn - 1, 0):cn + 2]
        if local.size and float(local.max()) > 0.5 * top:
            n_best = n
    fxp, fyp = fxp / n_best, fyp / n_best
    return float(np.degrees(np.arctan2(fyp, fxp)) % 90.0), float(1.0 / np.hypot(fxp, fyp))


def openings(dark: BoolArray, pitch_px: float) -> FloatArray:
    """Centres (x, y) of square openings: bright blobs of about one opening's area."""
    lab, n = ndimage.label(~dark)
    if n == 0:
        return np.zeros((0, 2))
    idx = np.arange(1, n + 1)
    ones = np.ones(dark.shape)
    area = ndimage.sum(ones, lab, idx)
    com = np.array(ndimage.center_of_mass(ones, lab, idx)).reshape(-1, 2)
    nominal = (0.72 * pitch_px) ** 2
    ok = (area > 0.35 * nominal) & (area < 1.6 * nominal)
    return np.asarray(com[ok][:, ::-1], np.float64)


@dataclass(frozen=True)
class LatticeCells:
    """One atlas in square-index space (working pixels of ``work_um``).

    ``index_to_px`` is the 3x2 affine with ``[i, j, 1] @ index_to_px`` = centre (x, y) of
    square (i, j); array cell ``[r, c]`` is square ``(i, j) = (c + lo[0], r + lo[1])``.
    ``patches`` (nj, ni, k, k) is the metal fraction of each square's neighbourhood (one
    pitch wide, lattice-aligned), NaN outside the image; ``found`` marks squares whose
    opening was measured, ``openness`` the open fraction of each square (mesh boundary).
    ``opening_px`` holds the measured centres (working pixels), NaN where none.
    ``brightness`` is the median intensity of each square's central part in the atlas'
    own image, turned so that metal is dark, and ``metal_level`` the median of the metal
    (both NaN/None when no image was given), and ``metal_sign`` how the image was turned
    (:func:`metal_sign`); see :func:`square_brightness`. ``film`` is
    each whole opening's log film transmission with the illumination taken out
    (atlas_film.with_film), NaN elsewhere; None until measured. ``cover`` is the fraction of
    each whole opening covered by something off the film's plane (cells, dirt), likewise.
    """

    angle_deg: float
    pitch_um: float
    index_to_px: FloatArray
    lo: tuple[int, int]
    patches: FloatArray
    found: BoolArray
    openness: FloatArray
    valid: BoolArray
    opening_px: FloatArray
    brightness: FloatArray | None = None
    metal_level: float = float("nan")
    metal_sign: float = 1.0
    film: FloatArray | None = None
    cover: FloatArray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the square grid."""
        return int(self.found.shape[0]), int(self.found.shape[1])

    def typical_openness(self, default: float = float("nan")) -> float:
        """Open fraction of a typical measured opening (``default`` when none was found):
        the yardstick for calling a square open, cut or closed."""
        found = self.found & self.valid
        return float(np.median(self.openness[found])) if found.any() else default


def _index_fit(centres: FloatArray, angle_deg: float, pitch_px: float
               ) -> tuple[NDArray[np.intp], FloatArray, BoolArray]:
    """Integer indices of opening centres and the robust affine index -> centre."""
    t = np.radians(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    ref = centres[int(np.argmin(np.linalg.norm(centres - np.median(centres, 0), axis=1)))]
    ij = np.rint((centres - ref) @ rot / pitch_px).astype(np.intp)
    keep = np.ones(len(ij), bool)
    coef = np.zeros((3, 2))
    for _ in range(4):  # re-index with the fitted lattice: corrects a slightly wrong pitch
        design = np.c_[ij, np.ones(len(ij))]
        coef = np.linalg.lstsq(design[keep], centres[keep], rcond=None)[0]
        ij = np.rint((centres - coef[2]) @ np.linalg.inv(coef[:2])).astype(np.intp)
        resid = np.linalg.norm(np.c_[ij, np.ones(len(ij))] @ coef - centres, axis=1)
        keep = resid < max(3.0 * float(np.median(resid)), 0.05 * pitch_px)
    return ij, coef, keep


def square_patches(img: FloatArray, centre: FloatArray, coef: FloatArray, k: int,
                   extent: float = 1.0) -> FloatArray:
    """``img`` sampled on a ``k x k`` lattice-aligned grid spanning ``extent`` pitches
    around every square centre: (rows, cols, k, k), NaN outside the image."""
    s = ((np.arange(k) + 0.5) / k - 0.5) * extent
    ou, ov = np.meshgrid(s, s)
    grid = (centre[:, :, None, None, :] + ou[None, None, :, :, None] * coef[0]
            + ov[None, None, :, :, None] * coef[1])
    nj, ni = centre.shape[:2]
    maps = grid.transpose(0, 2, 1, 3, 4).reshape(nj * k, ni * k, 2).astype(np.float32)
    out = cv2.remap(np.asarray(img, np.float32), maps[..., 0], maps[..., 1], cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    return np.asarray(out, np.float64).reshape(nj, k, ni, k).transpose(0, 2, 1, 3)


def window_stack(x: NDArray[_Cell], radius: int, fill: float) -> NDArray[_Cell]:
    """((2r+1)^2 - 1, rows, cols): every cell's neighbours within ``radius`` squares (the
    cell itself left out), ``fill`` beyond the edge of the square grid."""
    rows, cols = x.shape
    pad = np.pad(x, radius, constant_values=fill)
    return np.stack([pad[radius + dr:radius + dr + rows, radius + dc:radius + dc + cols]
                     for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)
                     if (dr, dc) != (0, 0)])


def metal_sign(img: FloatArray, dark: BoolArray) -> float:
    """1 when the metal is darker than the rest of ``img`` (transmitted light, EM), -1
    when brighter (reflected light, an inverted EM montage)."""
    return 1.0 if float(np.median(img[dark])) <= float(np.median(img[~dark])) else -1.0


def square_brightness(img: FloatArray, dark: BoolArray, centre: FloatArray, coef: FloatArray,
                      inner: float = 0.4, samples: int = 6) -> tuple[FloatArray, float, float]:
    """Median intensity of the central ``inner`` x ``inner`` pitch of every square, and of
    the metal, with the image turned so that metal is dark; and that turn (:func:`metal_sign`).

    Why: what most grids offer to tell the pose apart is not in the metal but in the film:
    broken squares (no film: brighter in transmitted light and far brighter in the EM),
    thick-ice squares (darker in both, nearly opaque in the EM), cells (darker in both).
    The centre of a square is inside its opening for any bar width, so this reads the film
    and not the bars.
    """
    sign = metal_sign(img, dark)
    vals = square_patches(sign * img, centre, coef, samples, inner)
    nj, ni = centre.shape[:2]
    flat = vals.reshape(nj, ni, -1)
    level = np.full((nj, ni), np.nan)
    whole = np.isfinite(flat).all(axis=2)
    level[whole] = np.median(flat[whole], axis=1)
    return level, float(np.median(sign * img[dark])), sign


def _spaced_at(centres: FloatArray, pitch_px: float, tolerance: float = 0.15) -> bool:
    """Whether the openings' median nearest-neighbour spacing is ``pitch_px``."""
    if len(centres) < 3:
        return False
    d = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=2)
    np.fill_diagonal(d, np.inf)
    return bool(abs(float(np.median(d.min(axis=1))) / pitch_px - 1.0) < tolerance)


def lattice_cells(dark: BoolArray, work_um: float, k: int, min_pitch_um: float,
                  max_pitch_um: float, min_openings: int) -> LatticeCells:
    """Resample the mask ``dark`` (working pixels) into ``k x k`` patches per square
    (:func:`with_brightness` reads the squares' brightness from an image).

    Raises CorrelationInputError when fewer than ``min_openings`` square openings are
    found (no usable grid lattice in the image).
    """
    angle, pitch_um = lattice_angle_pitch(dark, work_um, min_pitch_um, max_pitch_um)
    # The spectrum may prefer a multiple of the pitch (montage tiles of ~3 pitches, a mark
    # or a ring along the lattice axes); the true pitch is the one whose openings are there.
    # Openings' spacing must then match the pitch they were found at.
    op = openings(dark, pitch_um / work_um)
    if not _spaced_at(op, pitch_um / work_um):
        for n in (2, 3, 4):
            alt = openings(dark, pitch_um / n / work_um)
            if pitch_um / n >= min_pitch_um and len(alt) >= min_openings and \
                    _spaced_at(alt, pitch_um / n / work_um):
                op, pitch_um = alt, pitch_um / n
                break
    pitch_px = pitch_um / work_um
    if len(op) < min_openings:
        raise CorrelationInputError(f"{len(op)} square openings found, need {min_openings}: "
                                    "no grid lattice visible or wrong pixel size")
    ij, coef, keep = _index_fit(op, angle, pitch_px)
    ij, op = ij[keep], op[keep]
    h, w = dark.shape
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], float)
    cij = (corners - coef[2]) @ np.linalg.inv(coef[:2])
    lo = np.floor(cij.min(0)).astype(int) - 1
    hi = np.ceil(cij.max(0)).astype(int) + 1
    gi, gj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
    centre = np.stack([gi, gj, np.ones_like(gi)], -1) @ coef
    found = np.zeros(gi.shape, bool)
    opening_px = np.full(centre.shape, np.nan)
    rows, cols = ij[:, 1] - lo[1], ij[:, 0] - lo[0]
    centre[rows, cols] = op
    found[rows, cols] = True
    opening_px[rows, cols] = op
    metal = dark.astype(np.float32)
    if pitch_px / k > 1.0:  # anti-alias before sampling at pitch / k
        metal = np.asarray(cv2.GaussianBlur(metal, (0, 0), 0.5 * pitch_px / k), np.float32)
    patches = square_patches(metal, centre, coef, k)
    valid = np.asarray(np.isfinite(patches).all(axis=(2, 3)), dtype=bool)
    openness = 1.0 - np.nanmean(np.where(np.isfinite(patches), patches, 1.0), axis=(2, 3))
    return LatticeCells(angle_deg=angle, pitch_um=pitch_um, index_to_px=coef,
                        lo=(int(lo[0]), int(lo[1])), patches=np.nan_to_num(patches, nan=0.0),
                        found=found, openness=openness, valid=valid, opening_px=opening_px)


def with_brightness(cells: LatticeCells, image: FloatArray, dark: BoolArray) -> LatticeCells:
    """``cells`` with each square's brightness, the metal's level and the image's turn read
    from ``image`` (whose metal mask is ``dark``; see :func:`square_brightness`), at the
    measured opening centres and the lattice's elsewhere.

    Why apart from :func:`lattice_cells`: the lattice is the mask's, the brightness the
    image's; the image is read after its tile flat field, which needs the lattice's pitch,
    is divided out (atlas_flatfield), without finding the lattice again.
    """
    rows, cols = cells.shape
    gi, gj = np.meshgrid(np.arange(cols) + cells.lo[0], np.arange(rows) + cells.lo[1])
    centre = np.stack([gi, gj, np.ones_like(gi)], -1) @ cells.index_to_px
    centre = np.where(cells.found[..., None], cells.opening_px, centre)
    brightness, metal_level, sign = square_brightness(image, dark, centre, cells.index_to_px)
    return replace(cells, brightness=brightness, metal_level=metal_level, metal_sign=sign)
