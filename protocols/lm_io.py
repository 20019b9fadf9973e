"""Files the light-microscope protocols write, and the step-result records that list them.

Every LM step writes its images under a name derived from its step key, through
protocols/ome_tiff.py (atomic, OME-XML with pixel sizes, channels, z, time and stage
positions, the 2x3 affine in a MapAnnotation), and lists the file under
``result["artifacts"]`` as ``{"path", "kind", "meta"}`` with a path relative to the
session folder: the daemon's step store fsyncs and journals listed files with the step, so
a rerun after a crash overwrites the same name and never counts a file twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from drivers.imaging import Image
from protocols.atomic_write import write_text_atomic
from protocols.ome_tiff import read_ome_tiff, write_ome_tiff
from protocols.plan import InvalidStep, StepContext

__all__ = ["affine_from_json", "affine_json", "artifact", "image_record", "load_images",
           "read_json", "save_images", "session_path", "write_json"]


def session_path(ctx: StepContext, rel: str) -> Path:
    """Absolute path of a session-relative file, its folder created; refuses escapes."""
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts):
        raise InvalidStep(f"data path {rel!r} must be relative to the session folder")
    target = ctx.data_dir / p
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def artifact(rel: str, kind: str, **meta: Any) -> dict[str, Any]:
    """The record a step lists under ``result["artifacts"]`` for a file it wrote."""
    return {"path": rel, "kind": kind, "meta": meta}


def affine_json(matrix: ArrayLike) -> list[list[float]]:
    """A 2x3 affine as nested lists of floats (JSON, strict: no NaN)."""
    a = np.asarray(matrix, dtype=float)
    if a.shape != (2, 3) or not np.all(np.isfinite(a)):
        raise InvalidStep(f"affine must be a finite 2x3 matrix, got {a.tolist()}")
    return [[float(v) for v in row] for row in a]


def affine_from_json(value: Any) -> NDArray[np.float64]:
    a = np.asarray(value, dtype=float)
    if a.shape != (2, 3):
        raise InvalidStep(f"stored affine has shape {a.shape}, expected (2, 3)")
    return a


def image_record(img: Image) -> dict[str, Any]:
    """Acquisition metadata of one frame as strict JSON (for step results and reports).

    ``extra`` keeps backend metadata (Micro-Manager tags, a simulator's frame id) so a
    result can be traced back to the instrument's own record of the frame.
    """
    extra = {str(k): v for k, v in img.extra.items()
             if isinstance(v, (str, int, bool)) or (isinstance(v, float) and math.isfinite(v))}
    return {"channel": img.channel, "objective": img.objective,
            "stage_um": [float(v) for v in img.stage_um],
            "z_um": None if img.z_um is None else float(img.z_um),
            "time_s": float(img.time_s), "exposure_s": img.exposure_s,
            "pixel_size_um": float(img.pixel_size_um), "shape": list(img.shape),
            "pixel_to_stage": affine_json(img.pixel_to_stage), "index": dict(img.index),
            "extra": extra}


def save_images(ctx: StepContext, rel: str, images: Image | Sequence[Image], kind: str,
                name: str | None = None, **meta: Any) -> dict[str, Any]:
    """Write one image or a T/C/Z set as an OME-TIFF at ``rel``; return its artifact record."""
    write_ome_tiff(session_path(ctx, rel), images, name=name)
    return artifact(rel, kind, **meta)


def load_images(ctx: StepContext, rel: str) -> list[Image]:
    """Re-open an OME-TIFF written by ``save_images`` (planes in T, C, Z order)."""
    return read_ome_tiff(ctx.data_dir / PurePosixPath(rel))


def write_json(ctx: StepContext, rel: str, obj: Any, kind: str, **meta: Any) -> dict[str, Any]:
    """Write a JSON report atomically (strict: NaN refused); return its artifact record."""
    text = json.dumps(obj, indent=1, allow_nan=False, sort_keys=False)
    write_text_atomic(session_path(ctx, rel), text + "\n")
    return artifact(rel, kind, **meta)


def read_json(ctx: StepContext, rel: str) -> Any:
    return json.loads((ctx.data_dir / PurePosixPath(rel)).read_text(encoding="utf-8"))
