"""How EM protocols move, acquire and keep their frames, written against drivers/base.py only.

- ``approach``: move the stage to a position from one fixed side. Goniometers lose ~0.5 um of
  motion when an axis reverses (backlash); approaching every tile and every target from
  -x, -y makes that loss the same everywhere, so neighbouring tiles differ only by the random
  part of the stage error, and a target is approached as its map tiles were.
- ``save_frame`` / ``load_frame``: a frame as an MRC file plus a JSON-safe metadata dict, the
  form in which a step commits it. A later step (stitching, stacking) rebuilds the ``Image``
  from the file and the committed dict, so resume never needs the microscope to re-expose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from drivers.base import ElectronMicroscope, Image
from protocols.mrc_io import read_mrc, write_mrc

__all__ = ["APPROACH_UM", "approach", "frame_meta", "load_frame", "save_frame"]

#: Distance of the take-up move before an approach; larger than any backlash (~0.5 um).
APPROACH_UM = 5.0


def approach(em: ElectronMicroscope, x_um: float, y_um: float, *,
             from_um: float = APPROACH_UM, force: bool = False) -> None:
    """Move to (x, y) arriving in +x and +y, so that backlash is taken up the same way.

    A take-up move to (x - from_um, y - from_um) comes first when either axis would move in
    -x or -y, or when ``force`` is set (the first tile of a montage, a target: the axes' last
    direction is unknown). Both points are checked against the limits (LimitViolation,
    nothing moved). ``from_um`` 0 moves directly.
    """
    em.limits.check_xy(x_um, y_um)
    if from_um > 0:
        em.limits.check_xy(x_um - from_um, y_um - from_um)
        cx, cy, _ = em.stage_position()
        if force or cx > x_um + 1e-4 or cy > y_um + 1e-4:
            em.move_stage(x_um - from_um, y_um - from_um)
    em.move_stage(x_um, y_um)


def frame_meta(img: Image, path: str) -> dict[str, Any]:
    """JSON-safe metadata of an EM frame saved at ``path`` (relative to the data folder)."""
    shift = img.extra.get("image_shift_um", (0.0, 0.0))
    return {
        "path": path, "shape": list(img.shape), "pixel_size_um": float(img.pixel_size_um),
        "pixel_to_stage": np.asarray(img.pixel_to_stage, float).tolist(),
        "stage_um": [float(v) for v in img.stage_um], "time_s": float(img.time_s),
        "exposure_s": None if img.exposure_s is None else float(img.exposure_s),
        "magnification": None if img.magnification is None else float(img.magnification),
        "mag_index": img.mag_index, "binning": int(img.binning),
        "tilt_deg": float(img.tilt_deg),
        "defocus_um": None if img.defocus_um is None else float(img.defocus_um),
        "dose_e_per_a2": float(img.dose_e_per_a2), "low_dose_area": img.low_dose_area,
        "image_shift_um": [float(shift[0]), float(shift[1])],
        # scalar backend facts (SerialEM buffer, simulator frame id) survive the round trip
        "extra": {k: v for k, v in img.extra.items()
                  if k != "image_shift_um" and isinstance(v, str | int | float | bool)},
    }


def save_frame(data_dir: Path, rel_path: str, img: Image) -> dict[str, Any]:
    """Write ``img`` as MRC under ``data_dir`` (folders made) and return its metadata.

    uint16/int16/float32 data are written as they are; other dtypes become float32.
    """
    path = data_dir / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = img.data
    if data.dtype not in (np.uint16, np.int16, np.float32, np.int8):
        data = data.astype(np.float32)
    write_mrc(path, data, img.pixel_size_um, labels=(f"clemd em frame {rel_path}"[:80],))
    return frame_meta(img, rel_path)


def load_frame(data_dir: Path, meta: dict[str, Any]) -> Image:
    """Rebuild a saved frame from its file and committed metadata."""
    mrc = read_mrc(data_dir / meta["path"])
    shift = meta.get("image_shift_um", [0.0, 0.0])
    return Image(
        data=mrc.data, pixel_size_um=float(meta["pixel_size_um"]),
        pixel_to_stage=np.asarray(meta["pixel_to_stage"], dtype=np.float64), instrument="em",
        stage_um=tuple(meta["stage_um"]), time_s=float(meta["time_s"]),
        exposure_s=meta.get("exposure_s"), magnification=meta.get("magnification"),
        mag_index=meta.get("mag_index"), binning=int(meta.get("binning", 1)),
        tilt_deg=float(meta.get("tilt_deg", 0.0)), defocus_um=meta.get("defocus_um"),
        dose_e_per_a2=float(meta.get("dose_e_per_a2", 0.0)),
        low_dose_area=meta.get("low_dose_area"),
        extra={**meta.get("extra", {}), "image_shift_um": (float(shift[0]), float(shift[1])),
               "path": meta["path"]})
