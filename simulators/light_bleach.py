"""Photobleaching bookkeeping: which parts of the grid have had how much light.

Widefield epi-illumination bleaches the whole illuminated field (the camera's field of
view, as the field stop is set to it), through the whole depth. The ledger therefore keeps
the footprint of every fluorescence exposure in the grid frame with the dose it delivered
per fluorophore, and answers, for any grid point, the fraction of fluorophore left. Doses
are exposure seconds at 100x irradiance; a 20x field gets (20/100)^2 of that because the
same lamp power is spread over 25 times the area. Revisits of the same field (a z-stack,
a time-lapse) add to one footprint, so the ledger stays as small as the number of fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from drivers.imaging import invert_affine

REFERENCE_MAGNIFICATION = 100.0


@dataclass
class _Footprint:
    grid_to_pixel: NDArray[np.float64]      # 2x3
    shape: tuple[int, int]
    dose_s: dict[str, float] = field(default_factory=dict)


@dataclass
class BleachLedger:
    """Cumulative light dose per field and fluorophore (``contrast`` names the fluorophore)."""

    _fields: dict[tuple[object, ...], _Footprint] = field(default_factory=dict)

    def expose(self, fluorophore: str, pixel_to_grid: NDArray[np.float64], shape: tuple[int, int],
               exposure_s: float, magnification: float) -> None:
        """Record one exposure of the field ``pixel_to_grid`` x ``shape``."""
        # Fields closer than ~1 um and of the same geometry are one footprint.
        key = (shape, *np.round(np.asarray(pixel_to_grid)[:, :2].ravel(), 4),
               *np.round(np.asarray(pixel_to_grid)[:, 2], 0))
        fp = self._fields.get(key)
        if fp is None:
            fp = _Footprint(invert_affine(pixel_to_grid), shape)
            self._fields[key] = fp
        dose = exposure_s * (magnification / REFERENCE_MAGNIFICATION) ** 2
        fp.dose_s[fluorophore] = fp.dose_s.get(fluorophore, 0.0) + dose

    def remaining(self, fluorophore: str, tau_s: float | None, gx: NDArray[np.floating],
                  gy: NDArray[np.floating]) -> NDArray[np.float32]:
        """Fraction of ``fluorophore`` left at grid points (gx, gy), any array shape."""
        if tau_s is None:
            return np.ones(np.shape(gx), dtype=np.float32)
        dose = np.zeros(np.shape(gx), dtype=np.float32)
        for fp in self._fields.values():
            d = fp.dose_s.get(fluorophore, 0.0)
            if d <= 0:
                continue
            a = fp.grid_to_pixel
            px = a[0, 0] * gx + a[0, 1] * gy + a[0, 2]
            py = a[1, 0] * gx + a[1, 1] * gy + a[1, 2]
            h, w = fp.shape
            inside = (px >= -0.5) & (px < w - 0.5) & (py >= -0.5) & (py < h - 0.5)
            dose += np.float32(d) * inside
        out: NDArray[np.float32] = np.exp(-dose / np.float32(tau_s)).astype(np.float32)
        return out

    def __len__(self) -> int:
        return len(self._fields)


__all__ = ["REFERENCE_MAGNIFICATION", "BleachLedger"]
