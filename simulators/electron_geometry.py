"""True imaging geometry of one simulated EM frame: pixels <-> EM stage, with tilt.

Only the simulator and tests use this; it is the ground truth behind the nominal
``Image.pixel_to_stage``. Conventions:

- EM stage coordinates ``q`` (um) of a specimen point are where the stage must be for the
  point to sit on the optical axis at zero tilt (``GroundTruth.grid_to_em_stage``).
- Heights are EM stage z (um). The specimen film at ``q`` lies at ``height.height(q)``; an
  object ``h_obj`` above the film lies at ``height(q) + h_obj``. Stage z is the height of
  the tilt axis in the same coordinates, so a point is at eucentric height when
  ``height == z`` and its eucentric error is ``dz = height - z``.
- The tilt axis runs through the optical axis along unit vector ``u`` (``axis_deg`` from
  stage x); ``v`` is perpendicular. A point whose in-plane offset from the stage position is
  ``d`` appears in the image plane at ``e = (d.u) u + ((d.v) cos t + dz sin t) v``: features
  foreshorten by cos(tilt) across the axis and shift by ``dz sin(tilt)``.
- The camera sees image-plane offset ``e = L (p - c) + beam_offset`` at pixel ``p``, with
  ``L = pixel_size * R(rotation)`` and ``c`` the image centre (drivers/imaging.py
  ``affine_from``). ``beam_offset`` is image shift plus the low-dose area offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulators.placement import FocusPlane


@dataclass(frozen=True)
class FrameGeometry:
    """Where a frame really looked: true stage pose, true pixel size and rotation, tilt."""

    shape: tuple[int, int]                 # (rows, columns) of the binned frame
    pixel_size_um: float                   # true binned pixel
    rotation_deg: float                    # true image-to-stage rotation
    stage_xy_um: tuple[float, float]       # true stage x, y (command + errors + runout)
    stage_z_um: float                      # true stage z (height of the tilt axis)
    tilt_deg: float                        # true tilt
    axis_deg: float                        # tilt axis direction from stage x
    beam_offset_um: tuple[float, float]    # image shift + low-dose offset, image plane
    height: FocusPlane                     # specimen film height (EM stage z)

    # ------------------------------------------------------------------ pieces

    @property
    def linear(self) -> NDArray[np.float64]:
        t = math.radians(self.rotation_deg)
        c, s = math.cos(t), math.sin(t)
        return self.pixel_size_um * np.array([[c, -s], [s, c]])

    @property
    def centre_px(self) -> NDArray[np.float64]:
        h, w = self.shape
        return np.array([(w - 1) / 2.0, (h - 1) / 2.0])

    @property
    def axes(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        a = math.radians(self.axis_deg)
        return np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])

    def pixel_to_image_plane(self, p: ArrayLike) -> NDArray[np.float64]:
        pp = np.asarray(p, dtype=float)
        out: NDArray[np.float64] = (pp - self.centre_px) @ self.linear.T + np.asarray(
            self.beam_offset_um)
        return out

    def image_plane_to_pixel(self, e: ArrayLike) -> NDArray[np.float64]:
        ee = np.asarray(e, dtype=float) - np.asarray(self.beam_offset_um)
        out: NDArray[np.float64] = ee @ np.linalg.inv(self.linear).T + self.centre_px
        return out

    # ------------------------------------------------------------------ projection

    def project(self, q: ArrayLike, object_height_um: ArrayLike = 0.0) -> NDArray[np.float64]:
        """Image-plane offsets of points at stage coords ``q`` (N, 2), ``object_height_um``
        above the film."""
        qq = np.asarray(q, dtype=float).reshape(-1, 2)
        u, v = self.axes
        d = qq - np.asarray(self.stage_xy_um)
        dz = self.height.height(qq) + np.asarray(object_height_um, dtype=float) - self.stage_z_um
        t = math.radians(self.tilt_deg)
        a = d @ u
        b = (d @ v) * math.cos(t) + dz * math.sin(t)
        out: NDArray[np.float64] = a[:, None] * u + b[:, None] * v
        return out

    def unproject_film(self, e: ArrayLike) -> NDArray[np.float64]:
        """Stage coords of the film point seen at image-plane offset ``e`` (exact: the film
        is a plane, so this map is affine)."""
        ee = np.asarray(e, dtype=float).reshape(-1, 2)
        u, v = self.axes
        t = math.radians(self.tilt_deg)
        s = np.asarray(self.stage_xy_um)
        g = np.asarray(self.height.slope, dtype=float)
        a = ee @ u
        base = self.height.z0_um + float(g @ s) - self.stage_z_um
        b = (ee @ v - math.sin(t) * (base + a * float(g @ u))) / (
            math.cos(t) + math.sin(t) * float(g @ v))
        return s + a[:, None] * u + b[:, None] * v

    def pixel_to_stage_affine(self) -> NDArray[np.float64]:
        """True 2x3 pixel -> EM stage affine for points on the film."""
        p = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        q = self.unproject_film(self.pixel_to_image_plane(p))
        return np.array([[q[1, 0] - q[0, 0], q[2, 0] - q[0, 0], q[0, 0]],
                         [q[1, 1] - q[0, 1], q[2, 1] - q[0, 1], q[0, 1]]])

    def stage_to_pixel(self, q: ArrayLike, object_height_um: ArrayLike = 0.0
                       ) -> NDArray[np.float64]:
        """Pixel coordinates (x = column, y = row) of points at stage coords ``q``."""
        return self.image_plane_to_pixel(self.project(q, object_height_um))

    def footprint_um(self) -> NDArray[np.float64]:
        """The frame's four corners on the film, EM stage coords (4, 2)."""
        h, w = self.shape
        corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
        return self.unproject_film(self.pixel_to_image_plane(corners))
