"""``Image``: pixels plus everything needed to place them in an instrument's stage frame.

Pixel (x, y) is (column, row) of ``data`` with pixel centres at integer coordinates. The
2x3 ``pixel_to_stage`` affine maps it to stage micrometres::

    [sx, sy] = A[:, :2] @ [x, y] + A[:, 2]

It is the *nominal* mapping the instrument believes (calibrated pixel size, rotation and
the stage position it reported); the truth may differ by stage error, which is why
correlation and realignment exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def affine_from(pixel_size_um: float, rotation_deg: float, centre_stage_um: tuple[float, float],
                shape: tuple[int, int], mirror: bool = False) -> NDArray[np.float64]:
    """Pixel-to-stage affine of a camera whose image centre sits at ``centre_stage_um``.

    ``rotation_deg`` rotates image axes into stage axes (counter-clockwise in a right-handed
    x-right, y-up picture of the stage); ``mirror`` flips the image y axis first, as some
    camera mounts do.
    """
    theta = np.deg2rad(rotation_deg)
    c, s = np.cos(theta), np.sin(theta)
    linear = pixel_size_um * np.array([[c, -s], [s, c]])
    if mirror:
        linear = linear @ np.diag([1.0, -1.0])
    h, w = shape
    centre_px = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    offset = np.asarray(centre_stage_um, dtype=float) - linear @ centre_px
    return np.hstack([linear, offset[:, None]])


def apply_affine(matrix: ArrayLike, points: ArrayLike) -> NDArray[np.float64]:
    """Apply a 2x3 affine to an (N, 2) array (or one (2,) point)."""
    a = np.asarray(matrix, dtype=float)
    p = np.asarray(points, dtype=float)
    return p @ a[:, :2].T + a[:, 2]


def invert_affine(matrix: ArrayLike) -> NDArray[np.float64]:
    """Inverse of a 2x3 affine, as a 2x3 affine."""
    a = np.asarray(matrix, dtype=float)
    inv = np.linalg.inv(a[:, :2])
    return np.hstack([inv, (-inv @ a[:, 2])[:, None]])


@dataclass(frozen=True)
class Image:
    """One acquired frame and its acquisition metadata.

    Units are in the field names. ``instrument`` is ``"lm"`` or ``"em"``.

    ``defocus_um`` (EM only) is the defocus the frame was taken at as the instrument reports
    it: the objective-lens defocus plus the low-dose area's (or the one-shot settings')
    ``defocus_offset_um``. Sign as SerialEM's ``ReportDefocus``: **negative = underfocus**
    (the usual cryo-EM record defocus of -2 to -6 um is negative; View at -50 um offset is
    strongly underfocused). It is the commanded value, not a measurement: the defocus the
    specimen really had differs by the specimen's height error (autofocus measures that
    difference, with the same sign convention). None for LM frames and where unknown.

    ``extra`` keeps backend-specific metadata (Micro-Manager tags, SerialEM buffer info)
    without widening this type for every backend.
    """

    data: NDArray[Any]
    pixel_size_um: float
    pixel_to_stage: NDArray[np.float64]
    instrument: str
    stage_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    time_s: float = 0.0
    channel: str | None = None
    objective: str | None = None
    z_um: float | None = None
    exposure_s: float | None = None
    magnification: float | None = None
    mag_index: int | None = None
    binning: int = 1
    tilt_deg: float = 0.0
    defocus_um: float | None = None
    dose_e_per_a2: float = 0.0
    low_dose_area: str | None = None
    index: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.ndim != 2:
            raise ValueError(f"Image.data must be 2D, got shape {self.data.shape}")
        if not self.pixel_size_um > 0:
            raise ValueError(f"Image.pixel_size_um must be > 0, got {self.pixel_size_um}")
        if np.shape(self.pixel_to_stage) != (2, 3):
            raise ValueError("Image.pixel_to_stage must be a 2x3 affine")

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.data.shape
        return int(h), int(w)

    def pixel_to_stage_xy(self, xy: ArrayLike) -> NDArray[np.float64]:
        """Stage micrometres of pixel coordinates (x = column, y = row)."""
        return apply_affine(self.pixel_to_stage, xy)

    def stage_to_pixel_xy(self, xy: ArrayLike) -> NDArray[np.float64]:
        """Pixel coordinates (x = column, y = row) of stage micrometres."""
        return apply_affine(invert_affine(self.pixel_to_stage), xy)

    def with_data(self, data: NDArray[Any], **changes: Any) -> Image:
        """A copy with new pixels (e.g. a binned or stitched product) and changed metadata."""
        return replace(self, data=data, **changes)
