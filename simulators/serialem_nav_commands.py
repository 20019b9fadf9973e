"""What the simulated SerialEM does for navigator and status commands.

The navigator table is SerialEM's (simulators/serialem_state.py ``NavRow``): indices from 1,
labels, notes and the Acquire flag live there, while each point is also added to the
microscope's own navigator so that ``RealignToOtherItem`` can use the microscope's
realignment. Reply values, index conventions and messages follow SerialEM's
MacroCommands.cpp (CMacCmd::ReportNavItem, ChangeItemRegistration, SetItemAcquire,
RealignToNavItem, GetRealignToItemError, ...; docs/serialem-commands-verified.md).

Status commands read the microscope's ``EMStatus``. SerialEM passes a vacuum gauge's status
straight from the scope plugin, and its meaning was not found in the source; the twin uses 0
for a good gauge and 2 for a bad one.
"""

from __future__ import annotations

from drivers.serialem.commands import ArgValue
from simulators.serialem_state import (
    Handlers,
    NavRow,
    ScriptError,
    ScriptErrorNoLine,
    SerialEMState,
    Values,
    flag,
    optional,
    registrar,
)

VACUUM_GAUGES = ("IGPco", "IGPa", "IGPf", "PPc1")
GAUGE_OK_PA, GAUGE_BAD_PA = 2.0e-6, 5.0e-3
_ITEM_TYPES = {"point": 0, "polygon": 1, "map": 2}
_COLOR_POINT = 0.0            # red, SerialEM's colour for a new point
_REALIGN_FAILED = "Script halted due to failure {code} in Realign to Item routine"

NAV_COMMANDS: Handlers = {}
command = registrar(NAV_COMMANDS)


# --------------------------------------------------------------------------- navigator


def _report_item(state: SerialEMState, index: int) -> Values:
    """Index, X, Y, Z, type; and the nav* variables SerialEM sets beside them."""
    row = state.nav[index - 1]
    digits = row.label[:len(row.label) - len(row.label.lstrip("+-0123456789"))] or "0"
    try:
        int_label = float(int(digits))
    except ValueError:
        int_label = 0.0
    state.variables.update({
        "navindex": float(index), "navlabel": row.label, "navnote": row.note,
        "navcolor": _COLOR_POINT, "navregis": float(row.regis), "navintlabel": int_label,
        "navnumholes": 0.0})
    x, y, z = row.stage_um
    return (float(index), x, y, z, float(_ITEM_TYPES.get(row.kind, 0)))


@command("AddStagePosAsNavPoint")
def _add_point(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Appends a point (optional 4th argument: group ID, 5th: skip redraw) and reports the
    number of items, which is the new item's index."""
    x, y, z = float(args[0]), float(args[1]), float(args[2])
    item = state.em.add_nav_point(x, y, z)
    state.nav.append(NavRow(em_item_id=item.item_id, stage_um=(x, y, z),
                            label=str(len(state.nav) + 1)))
    return (float(len(state.nav)),)


@command("ReportNumTableItems")
def _num_items(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (float(len(state.nav)),)


@command("ReportOtherItem")
def _other_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return _report_item(state, state.item_index(args[0]))


@command("ReportNavItem")
def _nav_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    if state.current_item == 0:
        raise ScriptError("There is no current Navigator item for line:")
    return _report_item(state, state.current_item)


_CHANGE_OUT_OF_RANGE = "The Navigator item index, {index}, is out of range in:"


@command("ChangeItemLabel")
def _label(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.nav[state.positive_index(args[0], _CHANGE_OUT_OF_RANGE) - 1].label = str(args[1])


@command("ChangeItemNote")
def _note(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = state.positive_index(args[0], _CHANGE_OUT_OF_RANGE)
    state.nav[index - 1].note = str(args[1]) if len(args) > 1 else ""


@command("SetItemAcquire")
def _set_acquire(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = state.item_index(args[0] if args else 0, zero_is_current=True)
    state.nav[index - 1].acquire = optional(args, 1, 1.0) != 0


@command("ReportItemAcquire")
def _item_acquire(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    index = state.item_index(args[0] if args else 0, zero_is_current=True)
    return (flag(state.nav[index - 1].acquire),)


@command("NavIndexWithLabel")
def _index_with_label(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """The first item whose label matches, ignoring case (SerialEM's help), else 0."""
    label = str(args[0]).lower()
    return (float(next((i + 1 for i, r in enumerate(state.nav) if r.label.lower() == label),
                       0)),)


@command("MoveToNavItem")
def _move_to_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if args:
        index = int(args[0]) if not isinstance(args[0], str) else 0
        if index < 1:
            raise ScriptError("The Navigator item index must be positive:")
        if index > len(state.nav):
            raise ScriptErrorNoLine("Error moving to Navigator item")
    elif state.current_item == 0:
        raise ScriptErrorNoLine("Error moving to Navigator item")
    else:
        index = state.current_item
    x, y, z = state.nav[index - 1].stage_um
    state.em.move_stage(x, y, z)
    state.current_item = index


def _realign(state: SerialEMState, index: int) -> None:
    """The microscope realigns in one round, so its shift is both the final stage error and
    the error found at the target."""
    state.current_item = index
    x, y = state.em.realign_to_item(state.nav[index - 1].em_item_id)
    state.realign_error_um = (x, y, x, y)


@command("RealignToOtherItem")
def _realign_other(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    """Item index from 1 (no negative or 0 forms); the second argument restores the imaging
    state afterwards, which the twin has no need to do."""
    index = int(args[0]) if not isinstance(args[0], str) else 0
    if not 1 <= index <= len(state.nav):       # "The Navigator item index is out of range"
        raise ScriptErrorNoLine(_REALIGN_FAILED.format(code=1))
    _realign(state, index)


@command("RealignToNavItem")
def _realign_current(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if state.current_item == 0:
        raise ScriptErrorNoLine(_REALIGN_FAILED.format(code=-1))
    _realign(state, state.current_item)


@command("GetRealignToItemError")
def _realign_error(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Stage error X, Y after the last Realign to Item, then the local error X, Y found in
    its alignment at the target (CNavHelper::GetLastStageError)."""
    return state.realign_error_um


# --------------------------------------------------------------------------- status


@command("ReportVacuumGauge")
def _gauge(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """Status, then pressure."""
    name = str(args[0])
    if name not in VACUUM_GAUGES:
        raise ScriptError(f"There is no vacuum gauge named {name} (known: "
                          f"{', '.join(VACUUM_GAUGES)})")
    ok = state.em.status().vacuum_ok
    return (0.0 if ok else 2.0, GAUGE_OK_PA if ok else GAUGE_BAD_PA)


@command("ReportColumnOrGunValve")
def _valve(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (flag(state.em.status().column_valve_open),)


@command("SetColumnOrGunValve")
def _set_valve(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    setter = getattr(state.em, "set_column_valve", None)
    if setter is None:
        raise ScriptError("This microscope's column valve cannot be operated")
    setter(int(args[0]) != 0)


@command("ReportHighVoltage")
def _high_voltage(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """kV."""
    return (state.em.status().high_voltage_kv,)


@command("AreDewarsFilling")
def _dewars(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    """0 or 1 as on FEI scopes (a JEOL reports 0-3: stage tank 1, transfer tank 2)."""
    return (flag(state.em.status().dewar_filling),)
