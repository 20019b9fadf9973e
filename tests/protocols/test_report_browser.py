"""The report opened in a real headless browser (Debian's chromium), as an operator would."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from protocols.report import (
    MAGENTA, Figure, Marker, ReportData, StageTiming, TargetRow, draw, save_png, to_display,
    write_report,
)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def screenshot(page: Path, out: Path, profile: Path, size: tuple[int, int] = (1200, 1600)) -> Path:
    """Render ``page`` with chromium into ``out`` (PNG)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: run `make system-deps` (make test does)")
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
           f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def test_report_renders_with_its_figures_in_chromium(tmp_path: Path) -> None:
    report = tmp_path / "report"
    rng = np.random.default_rng(0)
    img = rng.normal(1000, 30, (600, 800))
    pic, scale = to_display(img, max_side=800)
    save_png(draw(pic, scale, [Marker(400, 300, "t1", color=MAGENTA, radius_px=40)]),
             report / "em_map.png")
    data = ReportData(
        session_id="s-browser", title="AutoCLEM session",
        figures=[Figure("Targets on the EM square map", "em_map.png", "magenta: target t1")],
        targets=[TargetRow("t1", "+0+1", (1.0, 2.0), 40.0, 55.0, "t1.mrc", "collected")],
        timings=[StageTiming("bead correlation", 1.5, 0.0, 600.0)])
    page = write_report(data, report)
    shot = screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (1600, 1200)
    # the page is not blank: text and tables drew dark pixels on the white page
    assert (picture.min(axis=2) < 100).mean() > 0.002
    # the figure loaded: the magenta marker drawn into the PNG is on screen
    b, g, r = (picture[..., k].astype(int) for k in range(3))
    magenta = (b > 180) & (r > 180) & (g < 110)
    assert magenta.sum() > 50
