"""Helpers for the correlation tests: small synthetic bead sets with known truth.

Deliberately simpler than (and different from) benchmarks/correlation.py's generator, so the
tests do not just re-check the benchmark's assumptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from numpy.typing import NDArray


@dataclass(frozen=True)
class BeadPair:
    """LM and EM detections, the true LM->EM linear map and shift, and the true pairs."""

    lm: NDArray[np.float64]
    em: NDArray[np.float64]
    linear: NDArray[np.float64]
    shift: NDArray[np.float64]
    pairs: NDArray[np.intp]

    def truth(self, lm_points: NDArray[np.float64]) -> NDArray[np.float64]:
        """True EM position of LM points."""
        return lm_points @ self.linear.T + self.shift


def similarity(angle_deg: float, scale: float = 1.0, mirrored: bool = False,
               aniso: float = 0.0) -> NDArray[np.float64]:
    """2x2 linear part: mirror (x -> -x) first, then anisotropic scale, then rotation."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return rot @ np.diag([scale * (1 + aniso), scale * (1 - aniso)]) @ (
        np.diag([-1.0, 1.0]) if mirrored else np.eye(2))


def make_beads(seed: int, n: int = 14, *, angle_deg: float | None = None, scale: float = 1.0,
               mirrored: bool = False, aniso: float = 0.0, lost: float = 0.0,
               spurious: int = 0, noise_lm: float = 0.0, noise_em: float = 0.0,
               width: float = 90.0) -> BeadPair:
    """Uniform beads in a ``width`` um square; ``lost`` fraction dropped on each side
    independently; ``spurious`` random points added to each side."""
    rng = np.random.default_rng(seed)
    grid = rng.uniform(0, width, (n, 2))
    lin = similarity(rng.uniform(0, 360) if angle_deg is None else angle_deg, scale,
                     mirrored, aniso)
    shift = rng.uniform(-1000, 1000, 2)
    keep_lm = rng.random(n) >= lost
    keep_em = rng.random(n) >= lost
    lm = grid[keep_lm] + rng.normal(0, noise_lm, (keep_lm.sum(), 2)) if noise_lm else grid[keep_lm]
    em_true = grid[keep_em] @ lin.T + shift
    em = em_true + rng.normal(0, noise_em, em_true.shape) if noise_em else em_true
    lm = np.concatenate([lm, rng.uniform(0, width, (spurious, 2))])
    em = np.concatenate([em, rng.uniform(0, width, (spurious, 2)) @ lin.T + shift])
    p_lm, p_em = rng.permutation(len(lm)), rng.permutation(len(em))
    inv_lm, inv_em = np.argsort(p_lm), np.argsort(p_em)
    idx_lm = np.full(n, -1)
    idx_lm[np.flatnonzero(keep_lm)] = inv_lm[: keep_lm.sum()]
    idx_em = np.full(n, -1)
    idx_em[np.flatnonzero(keep_em)] = inv_em[: keep_em.sum()]
    both = keep_lm & keep_em
    pairs = np.stack([idx_lm[both], idx_em[both]], axis=1).astype(np.intp)
    return BeadPair(lm=lm[p_lm], em=em[p_em], linear=lin, shift=shift, pairs=pairs)


@pytest.fixture
def beads() -> Callable[..., BeadPair]:
    """The :func:`make_beads` generator, as a fixture so test modules need no imports."""
    return make_beads
