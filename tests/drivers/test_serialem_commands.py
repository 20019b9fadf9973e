"""The command table and the argument checks done before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.serialem import wire as w
from drivers.serialem.commands import (
    ArgumentError,
    CommandRefused,
    CommandTable,
    NotExternalCommand,
    UnknownCommand,
)

SHARED_TABLE = Path(__file__).parents[3] / "shared" / "serialem" / "commands.tsv"


@pytest.fixture
def table() -> CommandTable:
    return CommandTable.load()


def test_package_copy_matches_shared_table(table: CommandTable) -> None:
    if not SHARED_TABLE.exists():
        pytest.skip("../shared is not beside the repository")
    assert len(table) == len(SHARED_TABLE.read_text().splitlines()) - 1
    shipped = Path(__file__).parents[2] / "drivers" / "serialem" / "commands.tsv"
    assert shipped.read_bytes() == SHARED_TABLE.read_bytes()


# indices and keys quoted in docs/serialem-socket-protocol.md, section 6
@pytest.mark.parametrize(("name", "index", "keys"), [
    ("Exit", 8, "ds"), ("SetVariable", 2, "SS"), ("MoveStageTo", 286, "DDd"),
    ("MoveStage", 285, "DDd"), ("ReportStageXYZ", 293, ""), ("TiltTo", 65, "Didd"),
    ("SetMag", 212, "Di"), ("SetMagIndex", 213, "I"), ("AutoFocus", 117, "ii"),
    ("SetLowDoseMode", 527, "I"), ("GoToLowDoseArea", 525, "S"), ("Record", 75, ""),
    ("OpenNewMontage", 139, "IIS"), ("AlignTo", 113, "Siiiidddi"), ("ReadNavFile", 486, "S"),
    ("AddStagePosAsNavPoint", 616, "DDDii"), ("RealignToNavItem", 461, "Iidii"),
    ("NoMessageBoxOnError", 43, None), ("StartTry", 785, None), ("ReportNumExeFuncs", 710, None),
    ("IsVersionAtLeast", 356, None), ("ReportNavFile", 164, None), ("Eucentricity", 380, "ii"),
])
def test_indices_from_the_protocol_document(table: CommandTable, name: str, index: int,
                                            keys: str | None) -> None:
    spec = table.external(name)
    assert spec.index == index
    assert table.by_index(index) is spec
    if keys is not None:
        assert spec.arg_keys == keys


def test_move_stage_to_prepares_the_captured_request(table: CommandTable) -> None:
    request = table.prepare("MoveStageTo", (10, 20.0))
    assert request == w.RegularRequest(286, (w.WireArg("10.", 10.0), w.WireArg("20.", 20.0)))


def test_argument_text_and_numbers(table: CommandTable) -> None:
    request = table.prepare("AlignTo", ("B", 1, True, 0, 0, 0.5, -1.25))
    assert [a.text for a in request.args] == ["B", "1", "1", "0", "0", "0.5", "-1.25"]
    assert [a.number for a in request.args] == [0.0, 1.0, 1.0, 0.0, 0.0, 0.5, -1.25]
    assert all(a.integer == 0 for a in request.args)
    assert table.prepare("SetVariable", ("x", "2.5e1abc")).args[1].number == 25.0


@pytest.mark.parametrize(("name", "args"), [
    pytest.param("MoveStageTo", (10,), id="too-few"),
    pytest.param("MoveStageTo", (1, 2, 3, 4), id="too-many"),
    pytest.param("ReportStageXYZ", (1,), id="none-expected"),
    pytest.param("MoveStageTo", ("10", 20), id="str-for-double"),
    pytest.param("MoveStageTo", (True, 20), id="bool-for-double"),
    pytest.param("MoveStageTo", (float("nan"), 20), id="nan"),
    pytest.param("MoveStageTo", (float("inf"), 20), id="inf"),
    pytest.param("SetMagIndex", (3.0,), id="float-for-int"),
    pytest.param("SetMagIndex", ("3",), id="str-for-int"),
    pytest.param("SetMagIndex", (2**31,), id="int-overflow"),
    pytest.param("ReadNavFile", (3,), id="int-for-str"),
    pytest.param("ReadNavFile", (b"a.nav",), id="bytes-for-str"),
    pytest.param("ReadNavFile", ("",), id="empty-required-str"),
    pytest.param("ReadNavFile", ("a\0b",), id="nul-in-str"),
    pytest.param("ReadNavFile", ("x" * 1000,), id="request-over-1kb"),
])
def test_bad_arguments_refused(table: CommandTable, name: str, args: tuple[object, ...]) -> None:
    with pytest.raises(ArgumentError) as info:
        table.prepare(name, args)
    assert isinstance(info.value, CommandRefused)
    assert name in str(info.value)


def test_unknown_and_script_only_commands(table: CommandTable) -> None:
    with pytest.raises(UnknownCommand):
        table.prepare("MoveStageToo", (1, 2))
    with pytest.raises(UnknownCommand):
        table.by_index(100000)
    with pytest.raises(NotExternalCommand):
        table.prepare("Loop", (3,))     # a script-flow command, never sent externally
    assert not table.spec("Label").external


@pytest.mark.parametrize(("name", "status"), [
    ("ReportStageXYZ", True), ("IsVersionAtLeast", True), ("AreDewarsFilling", True),
    ("GetVariable", True), ("ReportVacuumGauge", True), ("DewarsRemainingTime", True),
    ("Montage", False), ("Record", False), ("AutoFocus", False), ("TiltTo", False),
    ("MoveStageTo", False), ("RealignToNavItem", False), ("Exit", False),
])
def test_status_classification(table: CommandTable, name: str, status: bool) -> None:
    assert table.spec(name)
    assert table.is_status(name) is status


def test_server_reads_arguments_back(table: CommandTable) -> None:
    request = table.prepare("AddStagePosAsNavPoint", (12.5, -3, 0.25, 7))
    decoded = w.decode_request(w.encode_request(request))
    assert isinstance(decoded, w.RegularRequest)
    spec, values = table.interpret(decoded)
    assert spec.name == "AddStagePosAsNavPoint"
    assert values == (12.5, -3.0, 0.25, 7)
    assert isinstance(values[3], int)


def test_parse_rejects_bad_tables() -> None:
    with pytest.raises(ValueError):
        CommandTable.parse("index\tname\tmin_args\texternal\targ_keys\n"
                           "0\tA\t0\tyes\tQ\n")
    with pytest.raises(ValueError):
        CommandTable.parse("index\tname\tmin_args\texternal\targ_keys\n"
                           "0\tA\t0\tyes\t\n0\tB\t0\tyes\t\n")
