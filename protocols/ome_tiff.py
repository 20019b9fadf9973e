"""Light-microscope images as OME-TIFF (tifffile), and back.

What goes into the OME-XML, so that any OME reader (Fiji/Bio-Formats, napari, QuPath) places
the data without clemd: PhysicalSizeX/Y (and Z for a regular z-stack) in um, channel names,
per plane TheT/TheC/TheZ, PositionX/Y/Z (stage um), DeltaT (s) and ExposureTime (s).
OME has no element for a rotated pixel-to-stage mapping, so each plane's 2x3 affine and the
instrument fields clemd needs to rebuild an ``Image`` travel in one MapAnnotation (namespace
``clemd``) as JSON; ``read_ome_tiff`` restores them, and falls back to PhysicalSize and
Position (no rotation) for files written by other programs.

Planes are laid out T, C, Z: T from ``index["t"]``, C from channel names in order of first
appearance, Z from ``index["z"]`` or else the rank of ``z_um``. Every (t, c, z) must be present
exactly once; a missing or duplicated plane is refused before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from drivers.errors import ClemdError
from drivers.imaging import Image, affine_from
from protocols.atomic_write import atomic_path

__all__ = ["OmeTiffError", "ome_layout", "read_ome_tiff", "write_ome_tiff"]

_NAMESPACE = "clemd"
_KEY = "clemd.planes"
_UM = "µm"


class OmeTiffError(ClemdError, ValueError):
    """Images that cannot form one OME-TIFF (mixed shapes, missing planes), or a file that
    is not a readable OME-TIFF. Raised before anything is written."""


def _layout(images: Sequence[Image]) -> tuple[list[str], list[int], list[tuple[int, int, int]]]:
    """Channel names, sorted z keys and each image's (t, c, z) position."""
    channels: list[str] = []
    for im in images:
        name = im.channel or "default"
        if name not in channels:
            channels.append(name)
    z_values = sorted({float(im.z_um) for im in images if im.z_um is not None})
    positions = []
    for im in images:
        c = channels.index(im.channel or "default")
        if "z" in im.index:
            z = int(im.index["z"])
        else:
            z = z_values.index(float(im.z_um)) if im.z_um is not None else 0
        positions.append((int(im.index.get("t", 0)), c, z))
    return channels, sorted({p[2] for p in positions}), positions


def _plane_record(im: Image) -> dict[str, Any]:
    return {"pixel_to_stage": np.asarray(im.pixel_to_stage, float).tolist(),
            "instrument": im.instrument, "objective": im.objective, "channel": im.channel,
            "z_um": im.z_um, "time_s": im.time_s, "exposure_s": im.exposure_s,
            "stage_um": list(im.stage_um), "index": dict(im.index)}


def ome_layout(images: Image | Sequence[Image], *, name: str | None = None
               ) -> tuple[list[Image], tuple[int, int, int], dict[str, Any]]:
    """The planes in T, C, Z order, the (T, C, Z) shape and the OME metadata tifffile writes.

    Raises OmeTiffError for an inconsistent set (mixed shapes, dtypes or pixel sizes, a
    missing or duplicated plane).
    """
    planes = [images] if isinstance(images, Image) else list(images)
    if not planes:
        raise OmeTiffError("no images to write")
    first = planes[0]
    for k, im in enumerate(planes):
        if im.shape != first.shape or im.data.dtype != first.data.dtype:
            raise OmeTiffError(f"plane {k}: shape {im.shape} {im.data.dtype} differs from plane 0 "
                               f"{first.shape} {first.data.dtype}")
        if not np.isclose(im.pixel_size_um, first.pixel_size_um, rtol=1e-9):
            raise OmeTiffError(f"plane {k}: pixel size {im.pixel_size_um} um differs from plane 0 "
                               f"{first.pixel_size_um} um")
    channels, z_keys, positions = _layout(planes)
    t_keys = sorted({p[0] for p in positions})
    shape = (len(t_keys), len(channels), len(z_keys))
    slot: dict[tuple[int, int, int], int] = {}
    for k, (t, c, z) in enumerate(positions):
        key = (t_keys.index(t), c, z_keys.index(z))
        if key in slot:
            raise OmeTiffError(f"planes {slot[key]} and {k} both claim t={t} "
                               f"channel={channels[c]!r} z={z}")
        slot[key] = k
    missing = [(t_keys[t], channels[c], z_keys[z]) for t in range(shape[0])
               for c in range(shape[1]) for z in range(shape[2]) if (t, c, z) not in slot]
    if missing:
        raise OmeTiffError(f"incomplete T/C/Z set: missing (t, channel, z) {missing[:5]}")
    order = [slot[(t, c, z)] for t in range(shape[0]) for c in range(shape[1])
             for z in range(shape[2])]
    ordered = [planes[k] for k in order]
    metadata: dict[str, Any] = {
        "axes": "TCZYX",
        "PhysicalSizeX": first.pixel_size_um, "PhysicalSizeXUnit": _UM,
        "PhysicalSizeY": first.pixel_size_um, "PhysicalSizeYUnit": _UM,
        "Channel": {"Name": channels},
        "Plane": {
            "PositionX": [im.stage_um[0] for im in ordered], "PositionXUnit": [_UM] * len(order),
            "PositionY": [im.stage_um[1] for im in ordered], "PositionYUnit": [_UM] * len(order),
            "PositionZ": [im.z_um if im.z_um is not None else im.stage_um[2] for im in ordered],
            "PositionZUnit": [_UM] * len(order),
            "DeltaT": [im.time_s for im in ordered], "DeltaTUnit": ["s"] * len(order),
        },
        "MapAnnotation": {"Namespace": _NAMESPACE,
                          "Value": {_KEY: json.dumps([_plane_record(im) for im in ordered])}},
    }
    if all(im.exposure_s is not None for im in ordered):
        metadata["Plane"]["ExposureTime"] = [im.exposure_s for im in ordered]
        metadata["Plane"]["ExposureTimeUnit"] = ["s"] * len(order)
    z_um = [planes[slot[(0, 0, z)]].z_um for z in range(shape[2])]
    if shape[2] > 1 and all(z is not None for z in z_um):
        steps = np.diff(np.asarray(z_um, float))
        if np.allclose(steps, steps[0]) and steps[0] > 0:
            metadata["PhysicalSizeZ"] = float(steps[0])
            metadata["PhysicalSizeZUnit"] = _UM
    if name:
        metadata["Name"] = name
    return ordered, shape, metadata


def write_ome_tiff(path: str | os.PathLike[str], images: Image | Sequence[Image],
                   *, name: str | None = None) -> Path:
    """Write one image or a T/C/Z set of planes as one OME-TIFF, atomically.

    All planes must share shape, dtype and pixel size. Returns the path. Raises OmeTiffError
    for an inconsistent set and DataWriteError if the file cannot be written.
    """
    ordered, shape, metadata = ome_layout(images, name=name)
    data = _stacked([im.data for im in ordered]).reshape(*shape, *ordered[0].shape)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, ome=True, metadata=metadata, photometric="minisblack")
    return Path(path)


def _stacked(arrays: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """The planes as one (N, H, W) array: the array they are consecutive planes of when they
    are (a mosaic's channels blended in one buffer), else a stacked copy. Why: an atlas is
    hundreds of MB, and a fresh copy costs as much in page faults as the write itself."""
    base = arrays[0].base
    if (isinstance(base, np.ndarray) and base.ndim == 3 and base.shape[0] == len(arrays)
            and base.flags.c_contiguous
            and all(a.base is base and a.shape == base.shape[1:]
                    and a.__array_interface__["data"][0] == base[k].__array_interface__["data"][0]
                    for k, a in enumerate(arrays))):
        return base
    return np.stack(arrays)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _clemd_planes(ome: dict[str, Any]) -> list[dict[str, Any]] | None:
    annotations = ome.get("StructuredAnnotations") or {}
    for ann in _as_list(annotations.get("MapAnnotation")):
        if ann.get("Namespace") != _NAMESPACE:
            continue
        for entry in _as_list((ann.get("Value") or {}).get("M")):
            if entry.get("K") == _KEY:
                planes: list[dict[str, Any]] = json.loads(str(entry["value"]))
                return planes
    return None


def read_ome_tiff(path: str | os.PathLike[str]) -> list[Image]:
    """Re-open an OME-TIFF as ``Image`` planes in T, C, Z order with their metadata.

    Files from other writers get an axis-aligned affine from PhysicalSize and PositionX/Y.
    Raises OmeTiffError if the file has no OME-XML.
    """
    with tifffile.TiffFile(path) as tif:
        if not tif.is_ome or tif.ome_metadata is None:
            raise OmeTiffError(f"{path}: not an OME-TIFF")
        series = tif.series[0]
        axes = series.get_axes(False)
        data = series.asarray().reshape(series.get_shape(False))
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
    image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
    pixels = image["Pixels"]
    keep = [a for a in "TCZYX" if a in axes]
    drop = tuple(i for i, a in enumerate(axes) if a not in "TCZYX")
    data = np.squeeze(data, axis=drop) if drop else data
    data = np.transpose(data, [axes.replace("S", "").index(a) for a in keep])
    for a in "TCZ":
        if a not in keep:
            data = np.expand_dims(data, "TCZ".index(a))
    nt, nc, nz = data.shape[:3]
    stack = data.reshape(nt * nc * nz, *data.shape[3:])
    px = float(pixels.get("PhysicalSizeX", 1.0))
    names = [str(ch.get("Name", f"C{k}")) for k, ch in enumerate(_as_list(pixels.get("Channel")))]
    plane_meta = {(int(p.get("TheT", 0)), int(p.get("TheC", 0)), int(p.get("TheZ", 0))): p
                  for p in _as_list(pixels.get("Plane"))}
    records = _clemd_planes(ome)
    out = []
    for k in range(stack.shape[0]):
        t, c, z = k // (nc * nz), (k // nz) % nc, k % nz
        p = plane_meta.get((t, c, z), {})
        if records is not None:
            r = records[k]
            out.append(Image(data=stack[k], pixel_size_um=px,
                             pixel_to_stage=np.asarray(r["pixel_to_stage"], float),
                             instrument=r["instrument"], stage_um=tuple(r["stage_um"]),
                             time_s=float(r["time_s"]), channel=r["channel"],
                             objective=r["objective"], z_um=r["z_um"],
                             exposure_s=r["exposure_s"], index=dict(r["index"])))
            continue
        stage = (float(p.get("PositionX", 0.0)), float(p.get("PositionY", 0.0)),
                 float(p.get("PositionZ", 0.0)))
        out.append(Image(data=stack[k], pixel_size_um=px,
                         pixel_to_stage=affine_from(px, 0.0, stage[:2], stack[k].shape),
                         instrument="lm", stage_um=stage, time_s=float(p.get("DeltaT", 0.0)),
                         channel=names[c] if c < len(names) else None, z_um=stage[2],
                         exposure_s=p.get("ExposureTime"), index={"t": t, "c": c, "z": z}))
    return out
