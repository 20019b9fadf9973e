"""The session report: a static page and PNGs that show what happened."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from protocols.report import (
    Figure, Link, Marker, ReportData, StageTiming, TargetRow, draw, save_png, side_by_side,
    to_display, write_report,
)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_markers_land_on_the_original_pixels_after_downscaling(tmp_path: Path) -> None:
    img = np.zeros((2000, 3000), np.uint16)
    img[1000, 1500] = 1
    pic, scale = to_display(img, max_side=600)
    assert pic.shape == (400, 600, 3) and scale == pytest.approx(0.2)
    out = draw(pic, scale, [Marker(1500, 1000, "t1", shape="cross", radius_px=5)],
               [Link(0, 0, 1500, 1000)])
    diff = np.any(out != pic, axis=2)
    ys, xs = np.nonzero(diff)
    assert abs(np.median(xs[ys == 200]) - 300) <= 6   # the cross sits at (300, 200)
    png = save_png(out, tmp_path / "a.png")
    assert cv2.imread(str(png)).shape == out.shape


def test_side_by_side_keeps_both_pictures() -> None:
    a = np.full((10, 20, 3), 1, np.uint8)
    b = np.full((15, 5, 3), 2, np.uint8)
    canvas, x = side_by_side(a, b, gap=4)
    assert canvas.shape == (15, 29, 3) and x == 24
    assert (canvas[:10, :20] == 1).all() and (canvas[:, 24:] == 2).all()


def test_report_lists_targets_timings_and_figures_escaped(tmp_path: Path) -> None:
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "atlas.png")
    data = ReportData(
        session_id="s-1", title="AutoCLEM <sim>",
        summary=[("targets reached", "2 / 3")],
        figures=[Figure("LM atlas", "atlas.png", "chosen squares in green")],
        targets=[TargetRow("t1", "+1-2", (10.0, -3.5), 42.0, 61.0, "t1.mrc", "collected"),
                 TargetRow("t2", "+1-2", None, None, None, None, "no_confident_match")],
        timings=[StageTiming("atlas correlation", 3.2, 0.0, 600.0)],
        notes=["bead & virus"])
    path = write_report(data, tmp_path)
    page = path.read_text()
    parser = _Collect()
    parser.feed(page)
    assert parser.imgs == ["atlas.png"] and (tmp_path / parser.imgs[0]).exists()
    text = " ".join(parser.text)
    for needle in ("AutoCLEM <sim>", "t1.mrc", "no_confident_match", "61", "600", "bead & virus"):
        assert needle in text
    assert "<sim>" not in page   # escaped in the markup
