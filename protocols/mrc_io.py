"""Electron-microscope images as MRC (mrcfile), tilt series with their per-tilt metadata.

An MRC file carries its pixel size in the header (voxel size in Å), which every EM program
reads; a 3D file is marked as an image stack (ispg 0), so IMOD and friends treat sections as
separate images, not a volume. Data are written in the dtype given (modes 0, 1, 6, 2 for
int8, int16, uint16, float32) and never converted silently: other dtypes are refused with
what to do instead.

A tilt series is three files, each written atomically: ``<name>.mrc`` (sections in
acquisition order), ``<name>.mrc.mdoc`` (SerialEM autodoc) and ``<name>.rawtlt`` (IMOD).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from numpy.typing import NDArray

from drivers.errors import ClemdError
from drivers.imaging import Image
from protocols.atomic_write import atomic_path
from protocols.mdoc import MdocHeader, tilt_record, write_mdoc, write_tilt_angles

__all__ = ["MrcData", "MrcWriteError", "TiltSeriesFiles", "read_mrc", "write_mrc",
           "write_tilt_series"]

_MODES = {np.dtype(np.int8): 0, np.dtype(np.int16): 1, np.dtype(np.uint16): 6,
          np.dtype(np.float32): 2}
UM_TO_A = 1e4


class MrcWriteError(ClemdError, ValueError):
    """Data that cannot be written as MRC as given (dtype, shape, mixed tilt images)."""


@dataclass(frozen=True)
class MrcData:
    """An MRC file as read back: data (2D, or 3D sections first), pixel size, header facts."""

    data: NDArray[Any]
    pixel_size_um: float
    is_image_stack: bool
    mode: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class TiltSeriesFiles:
    """Paths of the three files of one tilt series."""

    mrc: Path
    mdoc: Path
    rawtlt: Path


def write_mrc(path: str | os.PathLike[str], data: NDArray[Any], pixel_size_um: float,
              *, labels: Sequence[str] = ()) -> Path:
    """Write a 2D image or a 3D stack of images (sections first), atomically.

    Raises MrcWriteError for an unsupported dtype or dimension, DataWriteError on I/O failure.
    """
    arr = np.asarray(data)
    if arr.dtype not in _MODES:
        raise MrcWriteError(f"dtype {arr.dtype} has no MRC mode here; convert to one of "
                            f"{sorted(str(d) for d in _MODES)} first")
    if arr.ndim not in (2, 3):
        raise MrcWriteError(f"MRC data must be 2D or 3D (sections, y, x), got shape {arr.shape}")
    if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise MrcWriteError(f"pixel size must be > 0 um, got {pixel_size_um!r}")
    if len(labels) > 10 or any(len(lb) > 80 for lb in labels):
        raise MrcWriteError("MRC holds at most 10 labels of 80 characters")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(arr))
        if arr.ndim == 3:
            mrc.set_image_stack()
        mrc.voxel_size = pixel_size_um * UM_TO_A
        for label in labels:
            mrc.add_label(label)
        mrc.update_header_stats()
    return Path(path)


def read_mrc(path: str | os.PathLike[str]) -> MrcData:
    """Re-open an MRC file (permissive about header quirks of other writers)."""
    with mrcfile.open(path, permissive=True) as mrc:
        data = np.array(mrc.data)
        size = float(mrc.voxel_size.x) / UM_TO_A
        nlabl = int(mrc.header.nlabl)
        labels = tuple(bytes(mrc.header.label[k]).decode("ascii", "replace").rstrip()
                       for k in range(nlabl))
        return MrcData(data, size, bool(mrc.is_image_stack()), int(mrc.header.mode), labels)


def write_tilt_series(path: str | os.PathLike[str], images: Sequence[Image], *,
                      tilt_axis_deg: float | None = None, voltage_kv: float = 300.0,
                      start_time: datetime | None = None,
                      target_defocus_um: float | None = None) -> TiltSeriesFiles:
    """Write a tilt series in acquisition order: MRC stack, SerialEM mdoc, IMOD rawtlt.

    Per tilt the mdoc records angle, stage, dose (``image.dose_e_per_a2``) and the dose
    accumulated before it, defocus, image shift (``image.extra["image_shift_um"]``),
    magnification, exposure and time. All images must share shape, dtype and pixel size.
    ``path`` names the MRC file (suffix ``.mrc``); the others sit beside it.
    """
    mrc_path = Path(path)
    if mrc_path.suffix != ".mrc":
        raise MrcWriteError(f"tilt series path must end in .mrc, got {mrc_path.name}")
    if not images:
        raise MrcWriteError("no tilt images to write")
    first = images[0]
    for k, im in enumerate(images):
        if im.shape != first.shape or im.data.dtype != first.data.dtype \
                or not np.isclose(im.pixel_size_um, first.pixel_size_um, rtol=1e-9):
            raise MrcWriteError(f"tilt {k}: shape/dtype/pixel size {im.shape} {im.data.dtype} "
                                f"{im.pixel_size_um} differ from tilt 0")
    stack = np.stack([im.data for im in images])
    write_mrc(mrc_path, stack, first.pixel_size_um, labels=("clemd tilt series",))
    prior = np.concatenate([[0.0], np.cumsum([im.dose_e_per_a2 for im in images])[:-1]])
    records = [tilt_record(im, k, float(prior[k]), start_time=start_time,
                           target_defocus_um=target_defocus_um) for k, im in enumerate(images)]
    header = MdocHeader(image_file=mrc_path.name, image_size=(first.shape[1], first.shape[0]),
                        data_mode=_MODES[stack.dtype], pixel_spacing_a=first.pixel_size_um * UM_TO_A,
                        voltage_kv=voltage_kv, tilt_axis_deg=tilt_axis_deg, binning=first.binning,
                        title=f"clemd tilt series: {len(images)} tilts")
    mdoc_path = write_mdoc(mrc_path.with_name(mrc_path.name + ".mdoc"), header, records)
    rawtlt = write_tilt_angles(mrc_path.with_suffix(".rawtlt"), [im.tilt_deg for im in images])
    return TiltSeriesFiles(mrc_path, mdoc_path, rawtlt)
