"""Light-microscope frames rendered from the virtual specimen, in expected photo-electrons.

Physics kept, and why: the correlation and focus algorithms downstream key on exactly these
effects, so a simplification here would let an algorithm pass that fails on a microscope.

- Geometry: every pixel maps to the grid frame through the *true* pixel-to-grid affine of
  the frame (stage error and camera rotation included); layers are sampled on it, point
  objects are placed analytically at sub-pixel positions.
- PSF: a Gaussian approximation of the Airy spot, sigma0 = 0.21 lambda / NA, widening with
  defocus dz as sigma0 * sqrt(1 + (dz / z_r)^2) with z_r = n lambda / NA^2 (axial FWHM of a
  point's peak 2 z_r, about 0.6 um at 100x/1.49), energy-conserving so the peak falls as
  1 / (1 + (dz / z_r)^2). Each point object has its own dz from the tilted film plane
  (``truth.lm_focus``) and its height; extended layers are blurred with the PSF at the
  local film defocus (two blur levels interpolated across a tilted frame).
- Transmitted light: glass outside the grid, opaque metal, a slightly absorbing carbon film
  with R2/2 holes, cells as phase objects: brightfield contrast from defocus only (the
  transport-of-intensity term -dz * laplacian(optical path)), DIC as the optical-path
  derivative along the shear direction with a bias retardation.
- Fluorescence: 405 = beads, 488 = viruses at the clock time, 640 = cell tracker
  proportional to the cell's thickness, split into an in-focus part (the thickness within
  the axial response around the focal plane) and out-of-focus haze. The grid is mounted
  bars down, film and cells on top, and imaged from below: metal blocks excitation and
  emission of whatever lies above a bar, and bars are dark in fluorescence.
- Faint autofluorescence of film and medium as background in every fluorescence channel.

Smooth layers are computed on a grid coarser than the camera when the PSF allows it, then
upsampled; point objects are always rendered at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy.special import erf

from drivers.imaging import apply_affine, invert_affine
from simulators.light_bleach import BleachLedger
from simulators.light_config import TRANSMITTED, ChannelConfig
from simulators.specimen import Specimen, SquareState

F32 = np.float32
SIGMA_PER_LAMBDA_NA = 0.21        # Gaussian sigma of the Airy spot, in lambda / NA
REFERENCE_NA = 1.49
REFERENCE_MAGNIFICATION = 100.0
VIRUS_SIGMA_UM = 0.03             # ~100 nm particle
CELL_DELTA_N = 0.05               # cytoplasm vs medium
CELL_ABSORPTION_PER_UM = 0.01
FILM_OPD_UM = 0.006               # ~15 nm carbon, delta n ~ 0.4
FILM_TRANSMISSION = 0.96
METAL_TRANSMISSION = 0.02         # stray light around opaque bars
DIC_BIAS_RAD = math.pi / 4
DIC_SHEAR_PER_RESOLUTION = 1.0    # shear = this x 0.61 lambda / NA
CONFOCAL_HAZE = 0.03              # out-of-focus light a pinhole lets through
LAYER_STEP_PER_SIGMA = 0.55       # coarse-grid step may be up to this x the PSF sigma
MAX_LAYER_STEP = 8
HOLE_PITCH_PIXELS = 16           # holes are drawn when a hole pitch spans this many pixels
STATE_STEP = 8                    # film presence changes only under bars: coarse is exact
MIN_FLUOR_BACKGROUND_STEP = 2     # a dim background needs no full-resolution metal edges


@dataclass(frozen=True)
class Optics:
    """The imaging geometry of one objective on the camera."""

    magnification: float
    numerical_aperture: float
    immersion_index: float
    pixel_size_um: float

    def sigma0_um(self, wavelength_nm: float) -> float:
        return SIGMA_PER_LAMBDA_NA * wavelength_nm * 1e-3 / self.numerical_aperture

    def axial_um(self, wavelength_nm: float) -> float:
        """z_r: defocus at which a point's peak has halved."""
        return self.immersion_index * wavelength_nm * 1e-3 / self.numerical_aperture ** 2

    def sigma_um(self, wavelength_nm: float, defocus_um: NDArray[np.floating] | float
                 ) -> NDArray[np.float64]:
        s0 = self.sigma0_um(wavelength_nm)
        zr = self.axial_um(wavelength_nm)
        return s0 * np.sqrt(1.0 + (np.asarray(defocus_um, dtype=float) / zr) ** 2)

    def fluorescence_gain(self) -> float:
        """Signal relative to 100x/1.49: collection ~ NA^2, irradiance ~ magnification^2."""
        return ((self.numerical_aperture / REFERENCE_NA) ** 2
                * (self.magnification / REFERENCE_MAGNIFICATION) ** 2)


@dataclass(frozen=True)
class View:
    """The true geometry of one frame: what the camera really looked at, and when."""

    pixel_to_grid: NDArray[np.float64]      # 2x3, true
    pixel_to_stage: NDArray[np.float64]     # 2x3, true
    shape: tuple[int, int]                  # (height, width)
    focal_plane_um: float                   # LM stage z of the plane in focus
    time_s: float

    def film_defocus(self, spec: Specimen, x: NDArray[np.float32] | float,
                     y: NDArray[np.float32] | float) -> NDArray[np.float32]:
        """Focal plane minus film height at pixel (x, y); linear because the film is a plane."""
        f = spec.truth.lm_focus
        a = self.pixel_to_stage
        sx, sy = f.slope
        c0 = self.focal_plane_um - f.z0_um - sx * a[0, 2] - sy * a[1, 2]
        cx = -(sx * a[0, 0] + sy * a[1, 0])
        cy = -(sx * a[0, 1] + sy * a[1, 1])
        return (F32(c0) + F32(cx) * np.asarray(x, F32) + F32(cy) * np.asarray(y, F32)).astype(F32)


def render_frame(spec: Specimen, view: View, optics: Optics, channel: ChannelConfig,
                 exposure_s: float, bleach: BleachLedger, dic_shear_deg: float,
                 vignetting: float) -> NDArray[np.float32]:
    """Expected photo-electrons per pixel of one frame (before noise)."""
    if channel.contrast in TRANSMITTED:
        img = _transmitted(spec, view, optics, channel, exposure_s, dic_shear_deg)
    else:
        img = _fluorescence(spec, view, optics, channel, exposure_s, bleach)
    if vignetting > 0:
        img *= _vignette(view.shape, vignetting)
    return img


# --------------------------------------------------------------------------- layers


def _layer_step(sigma_px: float, minimum: int = 1) -> int:
    return int(max(minimum, min(MAX_LAYER_STEP, int(sigma_px / LAYER_STEP_PER_SIGMA))))


def _coarse_affine(view: View, step: int) -> NDArray[np.float64]:
    """Pixel-to-grid affine of the coarse grid whose pixel c covers fine [c*s, (c+1)*s)."""
    a = view.pixel_to_grid
    off = (step - 1) / 2.0
    return np.hstack([a[:, :2] * step, (a[:, :2] @ np.array([off, off]) + a[:, 2])[:, None]])


def _layer_grid(view: View, step: int) -> tuple[NDArray[np.float32], NDArray[np.float32],
                                                 NDArray[np.float64], NDArray[np.float32],
                                                 NDArray[np.float32]]:
    """Grid coordinates of the coarse grid, its affine, and its pixels' fine coordinates."""
    h, w = view.shape
    hc, wc = -(-h // step), -(-w // step)
    a = _coarse_affine(view, step)
    cx = np.arange(wc, dtype=F32)[None, :]
    cy = np.arange(hc, dtype=F32)[:, None]
    gx = F32(a[0, 0]) * cx + F32(a[0, 1]) * cy + F32(a[0, 2])
    gy = F32(a[1, 0]) * cx + F32(a[1, 1]) * cy + F32(a[1, 2])
    off = F32((step - 1) / 2.0)
    return gx, gy, a, cx * F32(step) + off, cy * F32(step) + off


def _upsample(layer: NDArray[np.float32], step: int, shape: tuple[int, int]) -> NDArray[np.float32]:
    if step == 1:
        return layer
    hc, wc = layer.shape
    big = cv2.resize(layer, (wc * step, hc * step), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(big[:shape[0], :shape[1]])


def _blur(layer: NDArray[np.float32], sigma_px: float) -> NDArray[np.float32]:
    if sigma_px < 0.3:
        return layer
    out = cv2.GaussianBlur(layer, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    return np.asarray(out, dtype=F32)


def _blur_for_defocus(layer: NDArray[np.float32], optics: Optics, wavelength_nm: float,
                      defocus: NDArray[np.float32], px_um: float,
                      extra_sigma_um: float = 0.0) -> NDArray[np.float32]:
    """Blur with the PSF at each pixel's defocus: exact at the frame's extremes, interpolated
    between them, which is what a tilted film needs across a 20x field."""
    d_lo, d_hi = float(defocus.min()), float(defocus.max())
    a_lo = 0.0 if d_lo <= 0.0 <= d_hi else min(abs(d_lo), abs(d_hi))
    a_hi = max(abs(d_lo), abs(d_hi))
    s_lo = math.hypot(float(optics.sigma_um(wavelength_nm, a_lo)), extra_sigma_um) / px_um
    s_hi = math.hypot(float(optics.sigma_um(wavelength_nm, a_hi)), extra_sigma_um) / px_um
    if s_hi - s_lo < 0.1 * s_lo + 0.1:
        return _blur(layer, 0.5 * (s_lo + s_hi))
    sig = np.sqrt(optics.sigma_um(wavelength_nm, defocus) ** 2 + extra_sigma_um ** 2) / px_um
    wgt = np.clip((sig - s_lo) / (s_hi - s_lo), 0, 1).astype(F32)
    lo, hi = _blur(layer, s_lo), _blur(layer, s_hi)
    return (lo + wgt * (hi - lo)).astype(F32)


@lru_cache(maxsize=8)
def _vignette(shape: tuple[int, int], strength: float) -> NDArray[np.float32]:
    h, w = shape
    y = (np.arange(h, dtype=F32) - (h - 1) / 2) / max((h - 1) / 2, 1)
    x = (np.arange(w, dtype=F32) - (w - 1) / 2) / max((w - 1) / 2, 1)
    r2 = (x[None, :] ** 2 + y[:, None] ** 2) / 2
    out = (1 - F32(strength) * r2).astype(F32)
    out.setflags(write=False)
    return out


def _centre_step(optics: Optics, view: View, spec: Specimen, wavelength_nm: float,
                 defocus_map: bool) -> float:
    """Smallest PSF sigma in the frame, in camera pixels (the coarse grid must resolve it)."""
    h, w = view.shape
    if not defocus_map:
        return optics.sigma0_um(wavelength_nm) / optics.pixel_size_um
    corners = view.film_defocus(spec, np.array([0, w - 1, 0, w - 1], F32),
                                np.array([0, 0, h - 1, h - 1], F32))
    lo, hi = float(corners.min()), float(corners.max())
    a = 0.0 if lo <= 0.0 <= hi else min(abs(lo), abs(hi))
    return float(optics.sigma_um(wavelength_nm, a)) / optics.pixel_size_um


# --------------------------------------------------------------------------- transmitted


def _film_present(spec: Specimen, gx: NDArray[np.float32], gy: NDArray[np.float32]
                  ) -> NDArray[np.float32]:
    """1 where carbon film spans the square (not broken, inside the mesh), else 0.

    Square borders lie under the bars, so a grid STATE_STEP times coarser is exact enough.
    """
    state = spec.square_state(gx[::STATE_STEP, ::STATE_STEP], gy[::STATE_STEP, ::STATE_STEP])
    film = ((state >= 0) & (state != int(SquareState.BROKEN))).astype(F32)
    big = np.repeat(np.repeat(film, STATE_STEP, axis=0), STATE_STEP, axis=1)
    return np.ascontiguousarray(big[:gx.shape[0], :gx.shape[1]])


def _transmitted(spec: Specimen, view: View, optics: Optics, channel: ChannelConfig,
                 exposure_s: float, dic_shear_deg: float) -> NDArray[np.float32]:
    lam = channel.emission_nm
    px = optics.pixel_size_um
    step = _layer_step(_centre_step(optics, view, spec, lam, True))
    gx, gy, a_c, fx, fy = _layer_grid(view, step)
    pxc = px * step
    metal = spec.metal(gx, gy, pxc)
    film = _film_present(spec, gx, gy)
    cfg = spec.config
    if pxc <= cfg.hole_pitch_um / HOLE_PITCH_PIXELS:
        film *= 1 - spec.hole_fraction(gx, gy, pxc)
    else:       # holes unresolved: the film's mean cover
        film *= F32(1 - math.pi * cfg.hole_diameter_um ** 2 / 4 / cfg.hole_pitch_um ** 2)
    thick = spec.cell_thickness_um(gx, gy, a_c)
    open_t = 1 - F32(1 - FILM_TRANSMISSION) * film
    opd = F32(FILM_OPD_UM) * film
    if thick.any():
        open_t *= np.exp(-F32(CELL_ABSORPTION_PER_UM) * thick)
        opd += F32(CELL_DELTA_N) * thick
    trans = (1 - metal) * open_t + F32(METAL_TRANSMISSION) * metal
    defocus = view.film_defocus(spec, fx, fy)
    lap = cv2.Laplacian(opd, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT) / F32(pxc * pxc)
    img = trans * np.clip(1 - defocus * lap, 0.2, 2.0)
    if channel.contrast == "dic":
        dx = cv2.Sobel(opd, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REFLECT)
        dy = cv2.Sobel(opd, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REFLECT)
        t = math.radians(dic_shear_deg)
        slope = (F32(math.cos(t)) * dx + F32(math.sin(t)) * dy) / F32(2 * pxc)
        shear_um = DIC_SHEAR_PER_RESOLUTION * 0.61 * lam * 1e-3 / optics.numerical_aperture
        delta = F32(2 * math.pi / (lam * 1e-3) * shear_um) * slope
        img *= (1 - np.cos(F32(DIC_BIAS_RAD) + delta)) * F32(0.5)
    img = _blur_for_defocus(img.astype(F32), optics, lam, defocus, pxc)
    img *= F32(channel.photons_per_s * exposure_s)
    return _upsample(img, step, view.shape)


# --------------------------------------------------------------------------- fluorescence


def _fluorescence(spec: Specimen, view: View, optics: Optics, channel: ChannelConfig,
                  exposure_s: float, bleach: BleachLedger) -> NDArray[np.float32]:
    lam = channel.emission_nm
    px = optics.pixel_size_um
    gain = channel.photons_per_s * exposure_s * optics.fluorescence_gain()
    cells = channel.contrast == "cell_tracker"
    sig_px = _centre_step(optics, view, spec, lam, not cells)
    step = _layer_step(sig_px, 1 if cells else MIN_FLUOR_BACKGROUND_STEP)
    gx, gy, a_c, fx, fy = _layer_grid(view, step)
    pxc = px * step
    defocus = view.film_defocus(spec, fx, fy)
    clear = 1 - spec.metal(gx, gy, pxc)
    bg_e = (channel.background_per_um2_s * exposure_s * optics.fluorescence_gain() * px * px)
    layer = _blur_for_defocus(clear * F32(bg_e), optics, lam, defocus, pxc)
    if cells:
        layer += _cell_tracker(spec, view, optics, channel, gain * px * px, bleach,
                               (gx, gy, a_c, defocus, clear, pxc))
    img = _upsample(layer.astype(F32), step, view.shape)
    if not cells:
        _add_points(img, spec, view, optics, channel, gain, bleach)
    return img


def _cell_tracker(spec: Specimen, view: View, optics: Optics, channel: ChannelConfig,
                  gain_per_um: float, bleach: BleachLedger,
                  grid: tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float64],
                              NDArray[np.float32], NDArray[np.float32], float]
                  ) -> NDArray[np.float32]:
    """Dye column between the film and the cell's top, split into in-focus part and haze."""
    gx, gy, a_c, defocus, clear, pxc = grid
    lam = channel.emission_nm
    out = np.zeros(gx.shape, dtype=F32)
    full = spec.cell_thickness_um(gx, gy, a_c)
    rows, cols = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
    if rows.size == 0:
        return out
    # Work only on the cells' bounding box plus room for the haze to spread.
    pad = int(np.ceil(4 * float(optics.sigma_um(lam, float(np.abs(defocus).max()) + 1.5)) / pxc))
    box = (slice(max(0, rows[0] - pad), rows[-1] + pad + 1),
           slice(max(0, cols[0] - pad), cols[-1] + pad + 1))
    gx, gy, defocus = gx[box], gy[box], defocus[box]
    thick = full[box] * clear[box]
    thick *= bleach.remaining(channel.contrast, channel.bleach_tau_s, gx, gy)
    confocal = channel.section_um is not None
    z_ax = F32(channel.section_um / 2 if channel.section_um else optics.axial_um(lam))
    # Film at height 0, focal plane at `defocus` above it: the axial response
    # 1 / (1 + (u / z_ax)^2) integrated over the column [0, thick].
    sharp = z_ax * (np.arctan((thick - defocus) / z_ax) - np.arctan(-defocus / z_ax))
    sharp = np.minimum(sharp, thick)
    haze = (thick - sharp) * F32(CONFOCAL_HAZE if confocal else 1.0)
    mid = float(np.abs(defocus).mean()) + 1.5
    s0 = optics.sigma0_um(lam) / pxc
    s_haze = float(optics.sigma_um(lam, mid)) / pxc
    out[box] = (_blur(sharp.astype(F32), s0) + _blur(haze.astype(F32), s_haze)) * F32(gain_per_um)
    return out


def _add_points(img: NDArray[np.float32], spec: Specimen, view: View, optics: Optics,
                channel: ChannelConfig, gain: float, bleach: BleachLedger) -> None:
    """Beads (405) or viruses (488) as PSF spots at their sub-pixel positions, in place."""
    h, w = view.shape
    corners = apply_affine(view.pixel_to_grid, [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)])
    margin = 15.0
    lo, hi = corners.min(axis=0) - margin, corners.max(axis=0) + margin
    if channel.contrast == "beads":
        # After plunge freezing (cryo-fLM) the beads lost at freezing are gone.
        frozen = view.time_s >= spec.config.freeze_time_s
        idx = spec.beads_in((lo[0], lo[1], hi[0], hi[1]), em=frozen)
        xy = spec.beads.xy_um[idx]
        height = spec.bead_heights_um()[idx]
        bright = spec.beads.brightness[idx]
        size_um = spec.beads.diameter_um / 4
    else:
        allxy = spec.viruses.at(view.time_s)
        m = np.all((allxy >= lo) & (allxy <= hi), axis=1)
        xy, height, bright = allxy[m], spec.viruses.height_um[m], spec.viruses.brightness[m]
        size_um = VIRUS_SIGMA_UM
    if len(xy) == 0:
        return
    lam = channel.emission_nm
    film = spec.truth.lm_focus.height(spec.truth.grid_to_lm_stage(xy))
    dz = view.focal_plane_um - (film + height)
    sigma_px = np.sqrt(optics.sigma_um(lam, dz) ** 2 + size_um ** 2) / optics.pixel_size_um
    gx = xy[:, 0].astype(F32)[None, :]
    gy = xy[:, 1].astype(F32)[None, :]
    clear = 1 - spec.metal(gx, gy, optics.pixel_size_um)[0]
    amp = gain * bright * clear * bleach.remaining(channel.contrast, channel.bleach_tau_s,
                                                   xy[:, 0], xy[:, 1])
    if channel.section_um is not None:
        amp = amp / (1 + (dz / (channel.section_um / 2)) ** 2)
    pix = apply_affine(invert_affine(view.pixel_to_grid), xy)
    for (x0, y0), s, a in zip(pix, sigma_px, amp, strict=True):
        _add_spot(img, float(x0), float(y0), float(s), float(a))


def _add_spot(img: NDArray[np.float32], x0: float, y0: float, sigma: float, amp: float) -> None:
    """Add a Gaussian spot integrated over each pixel's area (sub-pixel exact centroid)."""
    h, w = img.shape
    r = 4.0 * sigma + 1.0
    c0, c1 = max(0, int(math.floor(x0 - r))), min(w, int(math.ceil(x0 + r)) + 1)
    r0, r1 = max(0, int(math.floor(y0 - r))), min(h, int(math.ceil(y0 + r)) + 1)
    if c0 >= c1 or r0 >= r1 or amp <= 0:
        return
    k = 1.0 / (math.sqrt(2.0) * sigma)
    ex = erf((np.arange(c0, c1 + 1) - 0.5 - x0) * k)
    ey = erf((np.arange(r0, r1 + 1) - 0.5 - y0) * k)
    px = 0.5 * np.diff(ex)
    py = 0.5 * np.diff(ey)
    img[r0:r1, c0:c1] += (amp * np.outer(py, px)).astype(F32)


__all__ = ["Optics", "View", "render_frame"]
