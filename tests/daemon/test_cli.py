"""``clemd``: subcommand dispatch and delegation to the other tools."""

from __future__ import annotations

import pytest

from daemon.cli import _delegate, main


def test_sim_needs_a_simulator_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim"]) == 2
    assert main(["sim", "lightsheet"]) == 2
    assert "clemd sim serialem" in capsys.readouterr().err


def test_a_missing_tool_is_reported_not_crashed(capsys: pytest.CaptureFixture[str]) -> None:
    assert _delegate("simulators.no_such_server", "clemd sim nothing", []) == 2
    assert "clemd sim nothing is not available" in capsys.readouterr().err


def test_sim_serialem_is_delegated(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("simulators.serialem_server")
    with pytest.raises(SystemExit) as info:        # argparse of the delegated tool
        main(["sim", "serialem", "--help"])
    assert info.value.code == 0
    assert "simulated SerialEM" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["explode"])
    assert info.value.code == 2
