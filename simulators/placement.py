"""Where the grid really is: its placement on each stage and the freezing deformation.

This is the ground truth that correlation is measured against. Three frames:

- grid frame: micrometres on the grid as it was during the live (LM) phase, origin at
  the grid centre;
- LM stage: ``A_lm @ p + t_lm`` (the grid lies at some rotation in the dish);
- EM stage: ``A_em @ deform(p) + t_em``, where ``deform`` is what plunge freezing and
  transfer did (shrink/stretch and a smooth non-linear field) and ``A_em`` rotates, and
  in some sessions mirrors, the grid as it was loaded into the cartridge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def rotation(deg: float) -> NDArray[np.float64]:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s], [s, c]])


@dataclass(frozen=True)
class Deformation:
    """Freezing/transfer deformation: ``p' = L @ p + sum_k a_k u_k sin(2 pi f_k . p + phi_k)``.

    ``linear`` holds the (possibly anisotropic) shrink or stretch; the sinusoidal modes are
    the smooth non-linear part, with wavelengths of 60-300 um so that it bends a 90 um
    square by up to a few hundred nanometres, as blotting and freezing do.
    """

    linear: NDArray[np.float64]          # 2x2
    amplitudes_um: NDArray[np.float64]   # (K,)
    directions: NDArray[np.float64]      # (K, 2) unit displacement directions
    frequencies: NDArray[np.float64]     # (K, 2) cycles per um
    phases: NDArray[np.float64]          # (K,)

    def nonlinear(self, p: NDArray[np.float64]) -> NDArray[np.float64]:
        arg = 2 * np.pi * (p @ self.frequencies.T) + self.phases
        return (np.sin(arg) * self.amplitudes_um) @ self.directions

    def forward(self, p: ArrayLike) -> NDArray[np.float64]:
        q = np.asarray(p, dtype=float)
        return q @ self.linear.T + self.nonlinear(q)

    def inverse(self, q: ArrayLike, iterations: int = 6) -> NDArray[np.float64]:
        """Fixed-point inverse; converges because the non-linear part is small and smooth."""
        qq = np.asarray(q, dtype=float)
        linv = np.linalg.inv(self.linear)
        p = qq @ linv.T
        for _ in range(iterations):
            p = (qq - self.nonlinear(p)) @ linv.T
        return p

    @classmethod
    def random(cls, rng: np.random.Generator, stretch: tuple[float, float],
               distortion_um: float, span_um: float = 90.0, modes: int = 4) -> Deformation:
        sx, sy = rng.uniform(*stretch, size=2)
        axis = rotation(rng.uniform(0, 180))
        linear = axis @ np.diag([sx, sy]) @ axis.T
        wavelengths = rng.uniform(60.0, 300.0, size=modes)
        angles = rng.uniform(0, 2 * np.pi, size=modes)
        freqs = np.stack([np.cos(angles), np.sin(angles)], axis=1) / wavelengths[:, None]
        dir_angles = rng.uniform(0, 2 * np.pi, size=modes)
        directions = np.stack([np.cos(dir_angles), np.sin(dir_angles)], axis=1)
        weights = rng.uniform(0.5, 1.0, size=modes)
        # Largest change of one mode across ``span_um`` is a * min(2, 2 pi span / wavelength):
        # scale so that the modes together bend a square by at most ``distortion_um``.
        per_unit = np.minimum(2.0, 2 * np.pi * span_um / wavelengths)
        scale = distortion_um / float(np.sum(weights * per_unit)) if distortion_um > 0 else 0.0
        return cls(linear=linear, amplitudes_um=weights * scale, directions=directions,
                   frequencies=freqs, phases=rng.uniform(0, 2 * np.pi, size=modes))


@dataclass(frozen=True)
class Placement:
    """A rigid (optionally mirrored) placement of the grid on a stage: ``A @ p + t``."""

    rotation_deg: float
    mirrored: bool
    translation_um: NDArray[np.float64]

    @property
    def matrix(self) -> NDArray[np.float64]:
        m = rotation(self.rotation_deg)
        if self.mirrored:
            m = m @ np.diag([1.0, -1.0])
        return m

    def forward(self, p: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(p, dtype=float) @ self.matrix.T + self.translation_um

    def inverse(self, q: ArrayLike) -> NDArray[np.float64]:
        m = self.matrix
        return (np.asarray(q, dtype=float) - self.translation_um) @ np.linalg.inv(m).T


@dataclass(frozen=True)
class FocusPlane:
    """Height of the grid surface on a stage: ``z0 + gx * x + gy * y`` (um)."""

    z0_um: float
    slope: tuple[float, float]

    def height(self, xy: ArrayLike) -> NDArray[np.float64]:
        q = np.asarray(xy, dtype=float)
        return self.z0_um + q[..., 0] * self.slope[0] + q[..., 1] * self.slope[1]


@dataclass(frozen=True)
class GroundTruth:
    """True positions of any specimen point in both instruments' stage frames."""

    lm: Placement
    em: Placement
    deformation: Deformation
    lm_focus: FocusPlane
    em_height: FocusPlane

    def grid_to_lm_stage(self, p: ArrayLike) -> NDArray[np.float64]:
        return self.lm.forward(p)

    def lm_stage_to_grid(self, q: ArrayLike) -> NDArray[np.float64]:
        return self.lm.inverse(q)

    def grid_to_em_stage(self, p: ArrayLike) -> NDArray[np.float64]:
        return self.em.forward(self.deformation.forward(p))

    def em_stage_to_grid(self, q: ArrayLike) -> NDArray[np.float64]:
        return self.deformation.inverse(self.em.inverse(q))

    def lm_stage_to_em_stage(self, q: ArrayLike) -> NDArray[np.float64]:
        return self.grid_to_em_stage(self.lm_stage_to_grid(q))

    def em_stage_to_lm_stage(self, q: ArrayLike) -> NDArray[np.float64]:
        return self.grid_to_lm_stage(self.em_stage_to_grid(q))
