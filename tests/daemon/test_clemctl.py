"""clemctl against a running service: status, sessions, CSV targets, watch, control."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.clemctl import main, read_targets_csv
from tests.daemon.helpers import Running


def _ctl(service: Running, *args: str) -> int:
    return main(["--address", service.cfg.api.bind, "--events", service.cfg.api.events, *args])


def _json(service: Running, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    assert _ctl(service, "--json", *args) == 0
    return json.loads(capsys.readouterr().out)


def test_a_session_from_the_command_line(service: Running, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _ctl(service, "status") == 0
    assert "serving" in capsys.readouterr().out
    s = _json(service, capsys, "create", "exercise", "--params",
              '{"positions": 2, "checkpoint": true}')
    sid = s["id"]
    csv_file = tmp_path / "targets.csv"
    csv_file.write_text("id,x,y,label\na1,1.5,2.5,virus\na2,-3,4,\n", encoding="utf-8")
    assert _json(service, capsys, "targets", "submit", sid, str(csv_file),
                 "--frame", "em_stage") == {"acknowledged": 2, "new": 2}
    assert _json(service, capsys, "targets", "submit", sid, str(csv_file),
                 "--frame", "em_stage") == {"acknowledged": 2, "new": 0}
    listed = _json(service, capsys, "targets", "list", sid)
    assert [(t["id"], t["x"], t["frame"]) for t in listed] == [
        ("a1", 1.5, "em_stage"), ("a2", -3.0, "em_stage")]
    assert _ctl(service, "start", sid) == 0
    capsys.readouterr()
    assert _ctl(service, "watch", sid, "--timeout", "60") == 3        # waits for the operator
    out = capsys.readouterr().out
    assert "operator/load-em" in out and "image lm/pos-001.npy" in out
    assert _ctl(service, "confirm", sid) == 0
    assert _ctl(service, "watch", sid, "--timeout", "60") == 0
    assert "completed" in capsys.readouterr().out
    rows = _json(service, capsys, "sessions", "--state", "completed")
    assert [r["id"] for r in rows] == [sid]
    assert _ctl(service, "targets", "remove", sid, "a1") == 1          # session has ended
    assert _ctl(service, "show", sid) == 0


def test_control_and_errors(service: Running, capsys: pytest.CaptureFixture[str]) -> None:
    s = _json(service, capsys, "create", "exercise")
    sid = s["id"]
    assert _ctl(service, "pause", sid) == 1                          # 409: not running
    assert "409" in capsys.readouterr().err
    assert _ctl(service, "abort", sid, "--reason", "test") == 0
    assert _ctl(service, "show", "s-nope") == 1
    assert _ctl(service, "devices") == 0 and _ctl(service, "queue") == 0
    assert main(["--address", "tcp://127.0.0.1:1", "--timeout", "0.2", "status"]) == 4


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("x,y\n1,2\n3,oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t.csv:3"):
        read_targets_csv(bad, "lm_stage")
    bad.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header needs x and y"):
        read_targets_csv(bad, "lm_stage")
