"""The session report: one static HTML page and the PNGs it shows.

An operator who left a session overnight opens ``report/index.html`` in the session folder
and sees what happened: the atlases with the chosen and mapped squares, bead matches per
square, targets on the EM maps, a table per target, and time per stage against AutoCLEM's.
The page has no scripts and no external resources, so it opens anywhere, from a file
share, years later.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from protocols.atomic_write import write_text_atomic

BGR = tuple[int, int, int]
GREEN: BGR = (60, 200, 60)
RED: BGR = (50, 50, 230)
YELLOW: BGR = (0, 210, 240)
CYAN: BGR = (230, 200, 0)
MAGENTA: BGR = (220, 60, 220)
GREY: BGR = (150, 150, 150)
WHITE: BGR = (255, 255, 255)


@dataclass(frozen=True)
class Marker:
    """A labelled point to draw on an image, in that image's pixels (x = column)."""

    x: float
    y: float
    label: str = ""
    color: BGR = GREEN
    radius_px: int = 8
    shape: str = "circle"            # circle | square | cross


@dataclass(frozen=True)
class Link:
    """A line between two markers (e.g. a bead pair drawn side by side)."""

    x0: float
    y0: float
    x1: float
    y1: float
    color: BGR = YELLOW


@dataclass(frozen=True)
class Figure:
    title: str
    png: str                         # file name relative to the report folder
    caption: str = ""


@dataclass(frozen=True)
class TargetRow:
    target_id: str
    square: str
    em_stage_um: tuple[float, float] | None
    predicted_error_nm: float | None
    true_error_nm: float | None      # simulation only
    tilt_series: str | None          # file name, or None if not collected
    status: str


@dataclass(frozen=True)
class StageTiming:
    stage: str
    compute_s: float
    hardware_s: float
    autoclem_s: float | None = None  # the paper's figure for the same stage, if any


@dataclass(frozen=True)
class ReportData:
    session_id: str
    title: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def to_display(image: NDArray[np.generic], max_side: int = 1200) -> tuple[NDArray[np.uint8], float]:
    """8-bit BGR picture of a microscope image (1-99.5 percentile stretch), and its scale."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {a.shape}")
    scale = min(1.0, max_side / max(a.shape))
    if scale < 1.0:
        a = np.asarray(cv2.resize(a, (max(1, round(a.shape[1] * scale)),
                                      max(1, round(a.shape[0] * scale))),
                                  interpolation=cv2.INTER_AREA), dtype=np.float32)
    finite = a[np.isfinite(a)]
    lo, hi = (np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0))
    norm = np.clip((a - lo) / max(float(hi - lo), 1e-12), 0, 1)
    gray = (norm * 255).astype(np.uint8)
    return np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), dtype=np.uint8), float(scale)


def font_scale(picture: NDArray[np.uint8]) -> float:
    """Label size that stays readable when the page shows the picture at ~1200 px wide."""
    return float(max(0.6, picture.shape[1] / 1500))


def label(picture: NDArray[np.uint8], text: str, org: tuple[int, int], color: BGR,
          scale: float | None = None) -> None:
    """Text with a dark outline, legible on bright film and on dark metal alike (in place)."""
    fs = font_scale(picture) if scale is None else scale
    thick = max(1, round(2 * fs))
    cv2.putText(picture, text, org, cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0), thick + 3,
                cv2.LINE_AA)
    cv2.putText(picture, text, org, cv2.FONT_HERSHEY_SIMPLEX, fs, color, thick, cv2.LINE_AA)


def draw(picture: NDArray[np.uint8], scale: float, markers: Sequence[Marker] = (),
         links: Sequence[Link] = ()) -> NDArray[np.uint8]:
    """Draw markers and links given in original-image pixels onto a display picture."""
    out = picture.copy()
    lw = max(2, round(font_scale(out) * 2.5))
    for ln in links:
        cv2.line(out, _pt(ln.x0, ln.y0, scale), _pt(ln.x1, ln.y1, scale), ln.color, 2,
                 cv2.LINE_AA)
    for m in markers:
        c = _pt(m.x, m.y, scale)
        r = max(3, m.radius_px)
        if m.shape == "square":
            cv2.rectangle(out, (c[0] - r, c[1] - r), (c[0] + r, c[1] + r), m.color, lw)
        elif m.shape == "cross":
            cv2.drawMarker(out, c, m.color, cv2.MARKER_CROSS, 2 * r, lw)
        else:
            cv2.circle(out, c, r, m.color, lw, cv2.LINE_AA)
        if m.label:
            label(out, m.label, (c[0] + r + 4, c[1] - r), m.color)
    return out


def side_by_side(left: NDArray[np.uint8], right: NDArray[np.uint8],
                 gap: int = 8) -> tuple[NDArray[np.uint8], int]:
    """Two pictures next to each other (top-aligned); returns the picture and right's x."""
    h = max(left.shape[0], right.shape[0])
    canvas = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + gap:] = right
    return canvas, left.shape[1] + gap


def with_insets(picture: NDArray[np.uint8], insets: Sequence[NDArray[np.uint8]],
                gap: int = 8) -> NDArray[np.uint8]:
    """``picture`` with a row of close-ups under it (each scaled to the same height), so
    that a few marked squares on a whole-grid overview can be read at the page's width."""
    if not insets:
        return picture
    h = max(i.shape[0] for i in insets)
    row = [cv2.resize(i, (round(i.shape[1] * h / i.shape[0]), h),
                      interpolation=cv2.INTER_AREA) for i in insets]
    width = sum(r.shape[1] for r in row) + gap * (len(row) - 1)
    scale = min(1.0, picture.shape[1] / width)
    strip = np.full((h, width, 3), 255, np.uint8)
    x = 0
    for r in row:
        strip[:, x:x + r.shape[1]] = r
        x += r.shape[1] + gap
    if scale < 1.0:
        strip = cv2.resize(strip, (round(width * scale), round(h * scale)),
                           interpolation=cv2.INTER_AREA)
    out = np.full((picture.shape[0] + gap + strip.shape[0], picture.shape[1], 3), 255, np.uint8)
    out[:picture.shape[0]] = picture
    out[picture.shape[0] + gap:, :strip.shape[1]] = strip
    return out


def legend(picture: NDArray[np.uint8], entries: Sequence[tuple[str, BGR]]) -> NDArray[np.uint8]:
    """Write a colour key in the picture's top-left corner (on a dark band)."""
    out = picture.copy()
    fs = font_scale(out)
    line = round(32 * fs)
    cv2.rectangle(out, (0, 0), (round(min(out.shape[1], 14 * fs * max(len(t) for t, _ in
                                                                        entries) + 20)),
                                line * len(entries) + 10), (30, 30, 30), -1)
    for k, (text, color) in enumerate(entries):
        label(out, text, (8, line * (k + 1)), color)
    return out


def save_png(picture: NDArray[np.uint8], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    tmp = path.with_suffix(".png.part")
    tmp.write_bytes(buf.tobytes())
    tmp.replace(path)
    return path


def write_report(data: ReportData, folder: Path) -> Path:
    """Write ``folder/index.html`` (figures must already be in ``folder``); return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    e = html.escape
    parts = [
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(data.title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(data.title)}</h1>", f"<p class='sid'>session {e(data.session_id)}</p>",
    ]
    if data.summary:
        parts.append("<table class='summary'>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in data.summary]
        parts.append("</table>")
    if data.targets:
        parts.append("<h2>Targets</h2><table><tr><th>target</th><th>square</th>"
                     "<th>EM stage (um)</th><th>predicted error (nm)</th>"
                     "<th>true error (nm, simulation)</th><th>tilt series</th>"
                     "<th>status</th></tr>")
        for t in data.targets:
            stage = "-" if t.em_stage_um is None else f"{t.em_stage_um[0]:.2f}, {t.em_stage_um[1]:.2f}"
            parts.append(
                f"<tr><td>{e(t.target_id)}</td><td>{e(t.square)}</td><td>{stage}</td>"
                f"<td>{_num(t.predicted_error_nm)}</td><td>{_num(t.true_error_nm)}</td>"
                f"<td>{e(t.tilt_series or '-')}</td><td class='{_status_class(t.status)}'>"
                f"{e(t.status)}</td></tr>")
        parts.append("</table>")
    if data.timings:
        parts.append("<h2>Time per stage</h2><table><tr><th>stage</th><th>compute (s)</th>"
                     "<th>instrument, modelled (s)</th><th>AutoCLEM (s)</th></tr>")
        for s in data.timings:
            parts.append(f"<tr><td>{e(s.stage)}</td><td>{s.compute_s:.1f}</td>"
                         f"<td>{s.hardware_s:.0f}</td><td>{_num(s.autoclem_s, '.0f')}</td></tr>")
        parts.append("</table>")
    for fig in data.figures:
        parts.append(f"<figure><h2>{e(fig.title)}</h2><img src='{e(fig.png)}' "
                     f"alt='{e(fig.title)}'><figcaption>{e(fig.caption)}</figcaption></figure>")
    if data.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in data.notes)
                     + "</ul>")
    parts.append("</body></html>")
    path = folder / "index.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def _pt(x: float, y: float, scale: float) -> tuple[int, int]:
    return round(x * scale), round(y * scale)


def _num(v: float | None, fmt: str = ".0f") -> str:
    return "-" if v is None or not np.isfinite(v) else format(v, fmt)


def _status_class(status: str) -> str:
    return "ok" if status in {"ok", "collected", "done"} else "bad"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { margin-bottom: 0; } .sid { color: #666; margin-top: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
td:not(:last-child) { white-space: nowrap; }
th { background: #f2f2f2; } td.ok { color: #176b17; } td.bad { color: #b01919; }
figure { margin: 0 0 2em; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""
