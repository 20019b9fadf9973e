"""``make demo`` pieces that can be checked in seconds: the service config it writes, the
session it asks for, and the summary it prints from a finished session's report."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from rich.console import Console

from daemon.config import load_config
from daemon.demo import (
    MARKER,
    DemoFolderInUse,
    _summary,
    _toml,
    demo_config,
    demo_params,
    fresh_folder,
)
from daemon.templates import default_registry


def test_config_is_a_valid_simulated_loopback_service(tmp_path: Path) -> None:
    text, bind, events = demo_config(tmp_path / "data", seed=5)
    path = tmp_path / "demo.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.api.bind == bind and cfg.api.events == events and bind != events
    assert bind.startswith("tcp://127.0.0.1:") and cfg.simulated
    assert cfg.lm is not None and cfg.lm.settings["objectives"]["5x"]["pixel_size_um"] == 1.3
    assert cfg.simulation.seed == 5


def test_toml_values_round_trip() -> None:
    value = {"a": [1, 2.5, -3e-05], "b c": {"d": True, "e": "x\"y"}, "5x": []}
    assert tomllib.loads(f"v = {_toml(value)}")["v"] == value


def test_session_params_are_accepted_by_the_autoclem_template() -> None:
    params = default_registry().validate("autoclem", demo_params(3, 2))
    assert params.n_squares == 3 and params.max_targets_per_square == 2  # type: ignore[attr-defined]


def test_summary_reads_the_report_and_fails_without_tilt_series(tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    row = {"id": "p0-t001", "square": "sq+0+1", "predicted_error_um": 0.05,
           "true_error_nm": 42.0, "tilt_series": "target-p0-t001/target-p0-t001.mrc",
           "status": "collected", "reason": ""}
    timing = {"stage": "atlas correlation", "compute_s": 3.0, "hardware_s": 0.0,
              "autoclem_s": 600.0}
    info = {"id": "s1", "state": "completed", "data_dir": str(tmp_path), "message": "",
            "error": None}
    report = tmp_path / "report" / "summary.json"
    report.write_text(json.dumps({"targets": [row], "timings": [timing], "summary": {}}))
    console = Console(record=True, width=200)
    assert _summary(console, info) == 0
    text = console.export_text()
    assert "p0-t001" in text and "42" in text and "index.html" in text and "600" in text
    report.write_text(json.dumps({"targets": [{**row, "status": "skipped", "tilt_series": None,
                                               "reason": "realign did not converge"}],
                                  "timings": [timing], "summary": {}}))
    assert _summary(Console(record=True), info) == 1
    assert _summary(Console(record=True), {**info, "state": "failed",
                                           "message": "step x failed"}) == 1


def test_demo_folder_is_emptied_only_if_a_demo_wrote_it(tmp_path: Path) -> None:
    """A left-over journal would resume the last demo; a user's folder is never deleted."""
    out = fresh_folder(tmp_path / "demo-output")
    (out / "data").mkdir()
    (out / "data" / "journal.sqlite").write_bytes(b"old session")
    again = fresh_folder(out)
    assert not (again / "data").exists() and (again / MARKER).exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious", encoding="utf-8")
    with pytest.raises(DemoFolderInUse):
        fresh_folder(mine)
    assert (mine / "thesis.tex").read_text(encoding="utf-8") == "precious"
