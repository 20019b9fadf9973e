"""Per-tilt metadata that IMOD-style tools read: SerialEM ``.mdoc`` autodocs and angle files.

The ``.mdoc`` beside an MRC stack is an IMOD autodoc: global ``key = value`` lines, then one
``[ZValue = n]`` section per image in file order, plus ``[T = ...]`` title sections (IMOD reads
the tilt axis from ``Tilt axis angle = ...`` in a title). Key names and units follow SerialEM's
files, so Warp, RELION, AreTomo, etomo and friends read ours: TiltAngle (deg), StagePosition
(um, x y), StageZ (um), Magnification, MagIndex, ExposureDose (e/A^2 in this image),
PriorRecordDose (e/A^2 before it), PixelSpacing (A), Defocus (um, SerialEM's sign: negative is
underfocus, as our ``Image.defocus_um``), TargetDefocus, ImageShift (um, x y), ExposureTime (s),
Binning, MinMaxMean, DateTime (``dd-Mon-yy HH:MM:SS``).

``.rawtlt`` holds one angle per line in file order (IMOD's raw tilt angles); ``.tlt`` files
have the same format and are read by the same function.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from drivers.errors import ClemdError
from drivers.imaging import Image
from protocols.atomic_write import write_text_atomic

__all__ = ["Autodoc", "MdocError", "MdocHeader", "TiltRecord", "format_mdoc", "parse_autodoc",
           "read_mdoc", "read_tilt_angles", "tilt_record", "write_mdoc", "write_tilt_angles"]

_SECTION = re.compile(r"^\[\s*(\w+)\s*=\s*(.*?)\s*\]$")
_PAIR = re.compile(r"^([A-Za-z][\w.]*)\s*=\s*(.*)$")


class MdocError(ClemdError, ValueError):
    """An autodoc or angle file that cannot be parsed (the message gives file and line)."""


@dataclass(frozen=True)
class TiltRecord:
    """What one ``[ZValue = n]`` section says about one image of a tilt series."""

    z_value: int
    tilt_deg: float
    stage_um: tuple[float, float, float]
    dose_e_per_a2: float
    prior_dose_e_per_a2: float
    pixel_spacing_a: float
    defocus_um: float | None = None
    target_defocus_um: float | None = None
    image_shift_um: tuple[float, float] = (0.0, 0.0)
    magnification: float | None = None
    mag_index: int | None = None
    exposure_s: float | None = None
    binning: int = 1
    min_max_mean: tuple[float, float, float] | None = None
    date_time: datetime | None = None


@dataclass(frozen=True)
class MdocHeader:
    """Global lines and titles of an mdoc."""

    image_file: str
    image_size: tuple[int, int]  # (width, height) as SerialEM writes it
    data_mode: int
    pixel_spacing_a: float
    voltage_kv: float = 300.0
    tilt_axis_deg: float | None = None
    binning: int = 1
    title: str = "clemd"


def _num(value: float) -> str:
    """Numbers as SerialEM prints them: up to 6 significant digits, no trailing zeros."""
    return f"{float(value):.6g}"


def tilt_record(image: Image, z_value: int, prior_dose_e_per_a2: float, *,
                start_time: datetime | None = None, target_defocus_um: float | None = None
                ) -> TiltRecord:
    """A record from an acquired image; ``image_shift_um`` comes from ``image.extra`` if set.

    ``start_time`` (wall clock of the session's time zero) turns ``image.time_s`` into DateTime.
    """
    shift = image.extra.get("image_shift_um", (0.0, 0.0))
    data = np.asarray(image.data, dtype=np.float64)
    return TiltRecord(
        z_value=z_value, tilt_deg=float(image.tilt_deg),
        stage_um=(float(image.stage_um[0]), float(image.stage_um[1]), float(image.stage_um[2])),
        dose_e_per_a2=float(image.dose_e_per_a2), prior_dose_e_per_a2=float(prior_dose_e_per_a2),
        pixel_spacing_a=image.pixel_size_um * 1e4, defocus_um=image.defocus_um,
        target_defocus_um=target_defocus_um,
        image_shift_um=(float(shift[0]), float(shift[1])), magnification=image.magnification,
        mag_index=image.mag_index, exposure_s=image.exposure_s, binning=image.binning,
        min_max_mean=(float(data.min()), float(data.max()), float(data.mean())),
        date_time=None if start_time is None else start_time + timedelta(seconds=image.time_s))


def format_mdoc(header: MdocHeader, records: Sequence[TiltRecord]) -> str:
    """The mdoc text: deterministic, so that golden files can pin it."""
    lines = [f"PixelSpacing = {_num(header.pixel_spacing_a)}",
             f"Voltage = {_num(header.voltage_kv)}",
             f"ImageFile = {header.image_file}",
             f"ImageSize = {header.image_size[0]} {header.image_size[1]}",
             f"DataMode = {header.data_mode}", "",
             f"[T = {header.title}]", ""]
    if header.tilt_axis_deg is not None:
        lines += [(f"[T =     Tilt axis angle = {_num(header.tilt_axis_deg)}, "
                   f"binning = {header.binning}]"), ""]
    for r in records:
        lines.append(f"[ZValue = {r.z_value}]")
        if r.min_max_mean is not None:
            lines.append("MinMaxMean = " + " ".join(_num(v) for v in r.min_max_mean))
        lines += [f"TiltAngle = {_num(r.tilt_deg)}",
                  f"StagePosition = {_num(r.stage_um[0])} {_num(r.stage_um[1])}",
                  f"StageZ = {_num(r.stage_um[2])}"]
        if r.magnification is not None:
            lines.append(f"Magnification = {_num(r.magnification)}")
        if r.mag_index is not None:
            lines.append(f"MagIndex = {r.mag_index}")
        lines += [f"ExposureDose = {_num(r.dose_e_per_a2)}",
                  f"PriorRecordDose = {_num(r.prior_dose_e_per_a2)}",
                  f"PixelSpacing = {_num(r.pixel_spacing_a)}"]
        if r.defocus_um is not None:
            lines.append(f"Defocus = {_num(r.defocus_um)}")
        if r.target_defocus_um is not None:
            lines.append(f"TargetDefocus = {_num(r.target_defocus_um)}")
        lines.append(f"ImageShift = {_num(r.image_shift_um[0])} {_num(r.image_shift_um[1])}")
        if r.exposure_s is not None:
            lines.append(f"ExposureTime = {_num(r.exposure_s)}")
        lines.append(f"Binning = {r.binning}")
        if r.date_time is not None:
            lines.append(f"DateTime = {r.date_time.strftime('%d-%b-%y %H:%M:%S')}")
        lines.append("")
    return "\n".join(lines)


def write_mdoc(path: str | os.PathLike[str], header: MdocHeader,
               records: Sequence[TiltRecord]) -> Path:
    """Write an mdoc atomically; returns the path."""
    return write_text_atomic(path, format_mdoc(header, records))


@dataclass(frozen=True)
class Autodoc:
    """A parsed autodoc: global values, titles, and sections in file order (values as text)."""

    globals: dict[str, str]
    titles: list[str]
    sections: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def zvalues(self) -> list[dict[str, str]]:
        return [values for kind, _, values in self.sections if kind == "ZValue"]


def parse_autodoc(text: str, source: str = "<text>") -> Autodoc:
    """Parse IMOD autodoc text; raises MdocError on a line that is neither section nor pair."""
    globals_: dict[str, str] = {}
    titles: list[str] = []
    sections: list[tuple[str, str, dict[str, str]]] = []
    current = globals_
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SECTION.match(line)
        if m:
            if m.group(1) == "T":
                titles.append(m.group(2))
                continue
            current = {}
            sections.append((m.group(1), m.group(2), current))
            continue
        m = _PAIR.match(line)
        if m is None:
            raise MdocError(f"{source}:{n}: not a 'key = value' line: {raw!r}")
        current[m.group(1)] = m.group(2).strip()
    return Autodoc(globals_, titles, sections)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split()]


def read_mdoc(path: str | os.PathLike[str]) -> tuple[Autodoc, list[TiltRecord]]:
    """Parse an mdoc; also return typed records for its ZValue sections.

    Missing optional keys become None; a ZValue section without TiltAngle raises MdocError.
    """
    doc = parse_autodoc(Path(path).read_text(encoding="utf-8"), str(path))
    records = []
    spacing = doc.globals.get("PixelSpacing", "0")
    for kind, name, v in doc.sections:
        if kind != "ZValue":
            continue
        if "TiltAngle" not in v:
            raise MdocError(f"{path}: [ZValue = {name}] has no TiltAngle")
        sx, sy = _floats(v.get("StagePosition", "0 0"))
        shift = _floats(v.get("ImageShift", "0 0"))
        mmm = _floats(v["MinMaxMean"]) if "MinMaxMean" in v else None
        records.append(TiltRecord(
            z_value=int(name), tilt_deg=float(v["TiltAngle"]),
            stage_um=(sx, sy, float(v.get("StageZ", "0"))),
            dose_e_per_a2=float(v.get("ExposureDose", "0")),
            prior_dose_e_per_a2=float(v.get("PriorRecordDose", "0")),
            pixel_spacing_a=float(v.get("PixelSpacing", spacing)),
            defocus_um=float(v["Defocus"]) if "Defocus" in v else None,
            target_defocus_um=float(v["TargetDefocus"]) if "TargetDefocus" in v else None,
            image_shift_um=(shift[0], shift[1]),
            magnification=float(v["Magnification"]) if "Magnification" in v else None,
            mag_index=int(v["MagIndex"]) if "MagIndex" in v else None,
            exposure_s=float(v["ExposureTime"]) if "ExposureTime" in v else None,
            binning=int(float(v.get("Binning", "1"))),
            min_max_mean=(mmm[0], mmm[1], mmm[2]) if mmm else None,
            date_time=datetime.strptime(v["DateTime"], "%d-%b-%y %H:%M:%S")
            if "DateTime" in v else None))
    return doc, records


def write_tilt_angles(path: str | os.PathLike[str], angles: Sequence[float]) -> Path:
    """IMOD ``.rawtlt``/``.tlt``: one angle (deg) per line, in the stack's section order."""
    return write_text_atomic(path, "".join(f"{a:.2f}\n" for a in angles))


def read_tilt_angles(path: str | os.PathLike[str]) -> list[float]:
    """Angles from a ``.rawtlt``/``.tlt`` file; blank lines are skipped."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(float(line))
            except ValueError as err:
                raise MdocError(f"{path}:{n}: not an angle: {line!r}") from err
    return out
