"""Electron dose bookkeeping of the simulated TEM.

Cryo specimens are destroyed by the beam, so a session must know how much dose every place
has received (a tilt series budget is ~100 e/A^2; a View or a Focus image that lands on the
target spends part of it). Every exposure is kept with the four corners of its footprint on
the specimen, both on the EM stage and in the grid frame (ground truth), so that cumulative
dose can be asked at any point afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class Exposure:
    """One exposure: dose in the beam (e/A^2) and where it fell."""

    frame_id: int
    area: str
    dose_e_per_a2: float
    time_s: float
    corners_stage_um: NDArray[np.float64]   # (4, 2) true EM stage, on the film
    corners_grid_um: NDArray[np.float64]    # (4, 2) grid frame


class DoseLedger:
    """All exposures of one simulated microscope, queryable by place."""

    def __init__(self) -> None:
        self._exposures: list[Exposure] = []

    def record(self, exposure: Exposure) -> None:
        self._exposures.append(exposure)

    @property
    def exposures(self) -> tuple[Exposure, ...]:
        return tuple(self._exposures)

    @property
    def total_e_per_a2(self) -> float:
        """Sum of the dose of every exposure (e/A^2), wherever it fell."""
        return float(sum(e.dose_e_per_a2 for e in self._exposures))

    def at_stage(self, xy_um: ArrayLike) -> NDArray[np.float64]:
        """Cumulative dose (e/A^2) at true EM stage points (N, 2) or one point (2,)."""
        return self._at(xy_um, "corners_stage_um")

    def at_grid(self, xy_um: ArrayLike) -> NDArray[np.float64]:
        """Cumulative dose (e/A^2) at grid-frame points (N, 2) or one point (2,)."""
        return self._at(xy_um, "corners_grid_um")

    def _at(self, xy_um: ArrayLike, which: str) -> NDArray[np.float64]:
        p = np.asarray(xy_um, dtype=float)
        pts = p.reshape(-1, 2)
        total = np.zeros(len(pts))
        if self._exposures:
            corners = np.stack([getattr(e, which) for e in self._exposures])   # (E, 4, 2)
            doses = np.array([e.dose_e_per_a2 for e in self._exposures])
            total = doses @ _inside_quads(corners, pts).astype(float)
        return total if p.ndim > 1 else total.reshape(())


def _inside_quads(corners: NDArray[np.float64], pts: NDArray[np.float64]) -> NDArray[np.bool_]:
    """(E, N) whether each point lies inside each convex quadrilateral (either winding)."""
    a = corners[:, :, None, :]                             # (E, 4, 1, 2)
    b = np.roll(corners, -1, axis=1)[:, :, None, :]
    p = pts[None, None, :, :]                              # (1, 1, N, 2)
    cross = ((b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1])
             - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0]))   # (E, 4, N)
    inside: NDArray[np.bool_] = np.asarray((cross >= 0).all(axis=1) | (cross <= 0).all(axis=1))
    return inside
