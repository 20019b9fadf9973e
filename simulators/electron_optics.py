"""Image formation of the simulated TEM: phase contrast, camera blur and electron noise.

``electron_render.py`` turns the specimen into a transmission map ``T`` (mass-thickness:
what the objective aperture lets through) and a phase map ``phi`` (radians). This module
makes the picture a camera records from them:

- phase contrast through the contrast transfer function, ``C = F^-1[-2 sin(chi) E F[phi]]``
  with ``chi = pi lambda dz k^2 - pi/2 Cs lambda^3 k^4`` (dz > 0 underfocus) and envelopes
  for partial coherence and a B-factor. At large defocus and low magnification this is the
  transport-of-intensity regime (``C ~ dz lambda / 2 pi * laplacian(phi)``): beads and hole
  edges get dark cores and bright fringes; at 39,000x and 5-8 um it oscillates as real
  tomograms do. ``I = T * (1 + C)``, clipped where the weak-phase picture breaks down.
- a Gaussian camera MTF, then electron counting: each pixel receives Poisson(I * N) electrons
  with N = dose rate * exposure * pixel area. The camera is modelled in counting mode, so
  the output is uint16 electron counts (saturating at 65535).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import cv2
import numpy as np
import scipy.fft
from numpy.typing import NDArray

from simulators.electron_config import OpticsModel

ELECTRON_REST_KEV = 510.999
ANSCOMBE_MIN_COUNTS = 4.0
_KERNEL_CACHE_SIZE = 6
_NOISE_BAND_ROWS = 64
MAX_PAD_PX = 160
#: Below this phase error at Nyquist the CTF filter changes nothing a camera could see.
NEGLIGIBLE_CHI_RAD = 1e-3


def wavelength_nm(kv: float) -> float:
    """Relativistic electron wavelength (nm) at ``kv`` kilovolts."""
    v = kv * 1e3
    return 1.226426 / math.sqrt(v * (1 + 0.97848e-6 * v))


def interaction_constant(kv: float) -> float:
    """Phase shift per volt and nanometre (rad V^-1 nm^-1) at ``kv`` kilovolts."""
    lam = wavelength_nm(kv)
    e = kv
    return 2 * math.pi / (lam * kv * 1e3) * (ELECTRON_REST_KEV + e) / (2 * ELECTRON_REST_KEV + e)


class PhaseContrast:
    """CTF filtering with a small cache of kernels (a montage or a tilt series reuses one)."""

    def __init__(self, optics: OpticsModel) -> None:
        self.optics = optics
        self._kernels: OrderedDict[tuple[object, ...], NDArray[np.float32] | None] = OrderedDict()

    def kernel(self, shape: tuple[int, int], pixel_nm: float,
               defocus_um: float) -> NDArray[np.float32] | None:
        """-2 sin(chi) E(k) on the rfft grid, or None when phase contrast is negligible."""
        key = (shape, round(pixel_nm, 9), round(defocus_um, 6))
        if key in self._kernels:
            self._kernels.move_to_end(key)
            return self._kernels[key]
        o = self.optics
        lam = wavelength_nm(o.high_voltage_kv)
        dz = -defocus_um * 1e3                       # SerialEM: negative = underfocus
        cs = o.cs_mm * 1e6
        h, w = shape
        fy = np.fft.fftfreq(h, d=pixel_nm).astype(np.float32)[:, None]
        fx = np.fft.rfftfreq(w, d=pixel_nm).astype(np.float32)[None, :]
        k2 = fy * fy + fx * fx
        chi = np.float32(math.pi * lam * dz) * k2 - np.float32(0.5 * math.pi * cs * lam ** 3) * k2 * k2
        kernel: NDArray[np.float32] | None
        if float(np.abs(chi).max()) < NEGLIGIBLE_CHI_RAD:
            kernel = None
        else:
            k = np.sqrt(k2)
            grad = np.float32(cs * lam ** 3) * k2 * k + np.float32(dz * lam) * k
            alpha = o.illumination_aperture_mrad * 1e-3
            envelope = np.exp(-np.float32((math.pi * alpha / lam) ** 2) * grad * grad
                              - np.float32(o.b_factor_nm2 / 4) * k2)
            kernel = (np.float32(-2.0) * np.sin(chi) * envelope).astype(np.float32)
        self._kernels[key] = kernel
        while len(self._kernels) > _KERNEL_CACHE_SIZE:
            self._kernels.popitem(last=False)
        return kernel

    def apply(self, phi: NDArray[np.float32], pixel_nm: float,
              defocus_um: float) -> NDArray[np.float32] | None:
        """Phase contrast ``C`` of a phase map, or None when negligible.

        The map is mirror-padded by the delocalisation of the CTF (how far defocus spreads
        a detail), so that the FFT's periodic wrap puts no fringes along the frame edges.
        """
        h, w = phi.shape
        pad = self.padding_px(pixel_nm, defocus_um)
        hp = scipy.fft.next_fast_len(h + 2 * pad, real=True)
        wp = scipy.fft.next_fast_len(w + 2 * pad, real=True)
        kernel = self.kernel((hp, wp), pixel_nm, defocus_um)
        if kernel is None:
            return None
        top, left = (hp - h) // 2, (wp - w) // 2
        src: NDArray[np.float32] = phi
        if hp != h or wp != w:
            src = np.asarray(cv2.copyMakeBorder(phi, top, hp - h - top, left, wp - w - left,
                                                cv2.BORDER_REFLECT_101), dtype=np.float32)
        spectrum = scipy.fft.rfft2(src)
        spectrum *= kernel
        out = scipy.fft.irfft2(spectrum, s=(hp, wp))
        return np.ascontiguousarray(out[top:top + h, left:left + w], dtype=np.float32)

    def padding_px(self, pixel_nm: float, defocus_um: float) -> int:
        """Delocalisation at Nyquist in pixels (at most MAX_PAD_PX)."""
        lam = wavelength_nm(self.optics.high_voltage_kv)
        k = 0.5 / pixel_nm
        deloc_nm = abs(defocus_um) * 1e3 * lam * k + self.optics.cs_mm * 1e6 * lam ** 3 * k ** 3
        return int(min(MAX_PAD_PX, math.ceil(1.2 * deloc_nm / pixel_nm) + 2))


def intensity(transmission: NDArray[np.float32], contrast: NDArray[np.float32] | None,
              optics: OpticsModel) -> NDArray[np.float32]:
    """Relative intensity ``T (1 + C)`` (clipped) after the camera MTF; 1 = empty beam."""
    img: NDArray[np.float32] = transmission
    if contrast is not None:
        m = optics.max_phase_contrast
        np.clip(contrast, -m, 2 * m, out=contrast)
        contrast += np.float32(1.0)
        img = transmission * contrast
    if optics.camera_mtf_sigma_px > 0:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), optics.camera_mtf_sigma_px,
                                          borderType=cv2.BORDER_REFLECT), dtype=np.float32)
    return img


def electron_counts(rel_intensity: NDArray[np.float32], electrons_per_pixel: float,
                    rng: np.random.Generator) -> NDArray[np.uint16]:
    """Counting-mode frame: Poisson electrons per pixel, uint16, saturating at 65535.

    Pixels with a mean of at least ANSCOMBE_MIN_COUNTS use the inverse Anscombe form of a
    normal draw (mean exact, variance within 1/8 count of Poisson, several times faster);
    darker pixels draw true Poisson numbers. Works in row bands that stay in cache.
    """
    h, w = rel_intensity.shape
    out = np.empty((h, w), np.uint16)
    scale = np.float32(electrons_per_pixel)
    z_all = rng.standard_normal((h, w), dtype=np.float32)
    for r0 in range(0, h, _NOISE_BAND_ROWS):
        rows = slice(r0, min(h, r0 + _NOISE_BAND_ROWS))
        lam = rel_intensity[rows] * scale
        np.maximum(lam, 0, out=lam)
        z = z_all[rows]
        z *= np.float32(0.5)
        z += np.sqrt(lam)
        np.square(z, out=z)
        z -= np.float32(0.25)
        dark = np.flatnonzero(lam < ANSCOMBE_MIN_COUNTS)
        if dark.size:
            lam_dark = lam.reshape(-1)[dark]
            counts = np.zeros(dark.size, np.float32)
            lit = lam_dark > 0                    # metal and closed valves: no draw at all
            counts[lit] = rng.poisson(lam_dark[lit])
            z.reshape(-1)[dark] = counts
        np.clip(z, 0, 65535, out=z)
        z += np.float32(0.5)                  # the cast truncates: round half up
        out[rows] = z
    return out
