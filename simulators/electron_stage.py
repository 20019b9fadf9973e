"""The simulated goniometer: where the stage was told to go and where it really is.

The stage reports its commanded position (an encoder reading that agrees with the command),
while the specimen really sits elsewhere: every move lands with a fresh random error
(repeatability), an axis that reverses direction loses ``backlash`` of motion, and tilting
walks the specimen sideways a little (runout). This is why a protocol that returns to a
navigator point must realign on an image, as on a real TEM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulators.electron_config import StageModel

#: Commands closer than this to the current one are not moves (no new error, no time).
MIN_MOVE_UM = 1e-4


@dataclass(frozen=True)
class StageMove:
    """What one command did, for the timing model."""

    dx_um: float
    dy_um: float
    dz_um: float

    @property
    def moved(self) -> bool:
        return max(abs(self.dx_um), abs(self.dy_um), abs(self.dz_um)) > 0


class StageMechanics:
    """Commanded and true X, Y, Z and tilt of one simulated stage."""

    def __init__(self, model: StageModel, rng: np.random.Generator) -> None:
        self.model = model
        self._rng = rng
        self.command = [0.0, 0.0, 0.0]
        self._error = [0.0, 0.0, 0.0]
        self._last_dir = [1, 1]                # backlash taken up in +x, +y at start
        self.tilt_command = 0.0
        self._tilt_error = 0.0
        a, b = rng.uniform(0, 2 * np.pi, size=2)
        self._runout_dirs = ((math.cos(a), math.sin(a)), (math.cos(b), math.sin(b)))

    # ------------------------------------------------------------------ moves

    def move(self, x_um: float, y_um: float, z_um: float | None) -> StageMove:
        """Command a move; draws the landing error of every axis that moves."""
        m = self.model
        deltas = [x_um - self.command[0], y_um - self.command[1],
                  0.0 if z_um is None else z_um - self.command[2]]
        sigma_xy = m.repeatability_rms_um / math.sqrt(2)
        for axis in (0, 1):
            d = deltas[axis]
            if abs(d) < MIN_MOVE_UM:
                deltas[axis] = 0.0
                continue
            direction = 1 if d > 0 else -1
            scale = min(1.0, math.sqrt(abs(d) / m.repeatability_full_distance_um))
            self._last_dir[axis] = direction
            self._error[axis] = (-direction * m.backlash_um / 2
                                 + float(self._rng.normal(0.0, sigma_xy * scale)))
            self.command[axis] = x_um if axis == 0 else y_um
        if z_um is not None and abs(deltas[2]) >= MIN_MOVE_UM:
            self._error[2] = float(self._rng.normal(0.0, m.z_repeatability_rms_um))
            self.command[2] = z_um
        else:
            deltas[2] = 0.0
        return StageMove(deltas[0], deltas[1], deltas[2])

    def tilt(self, tilt_deg: float) -> float:
        """Command a tilt; returns the angle travelled (deg)."""
        delta = tilt_deg - self.tilt_command
        if abs(delta) < 1e-6:
            return 0.0
        self.tilt_command = tilt_deg
        self._tilt_error = float(self._rng.normal(0.0, self.model.tilt_repeatability_rms_deg))
        return abs(delta)

    # ------------------------------------------------------------------ truth

    @property
    def true_tilt_deg(self) -> float:
        return self.tilt_command + self._tilt_error

    @property
    def true_xyz(self) -> tuple[float, float, float]:
        """Where the stage really is, including runout at the current tilt."""
        t = math.radians(self.true_tilt_deg)
        (ax, ay), (bx, by) = self._runout_dirs
        r = self.model.tilt_runout_um
        ox = r * (math.sin(t) * ax + (1 - math.cos(t)) * bx)
        oy = r * (math.sin(t) * ay + (1 - math.cos(t)) * by)
        return (self.command[0] + self._error[0] + ox, self.command[1] + self._error[1] + oy,
                self.command[2] + self._error[2])
