"""What the simulated SerialEM does for navigator and status commands.

The navigator table is SerialEM's (simulators/serialem_state.py ``NavRow``): indices from 1,
labels, notes and the Acquire flag live there, while each point is also added to the
microscope's own navigator so that ``RealignToOtherItem`` can use the microscope's
realignment. ``ReportOtherItem`` reports index, X, Y, Z, type and registration and sets the
``navLabel`` / ``navNote`` variables, as SerialEM does. Status commands read the microscope's
``EMStatus``; vacuum gauges have SerialEM's status codes (0 ok, 2 bad).
"""

from __future__ import annotations

from drivers.serialem.commands import ArgValue
from simulators.serialem_state import (
    Handlers,
    NavRow,
    ScriptError,
    SerialEMState,
    Values,
    flag,
    optional,
    registrar,
)

VACUUM_GAUGES = ("IGPco", "IGPa", "IGPf", "PPc1")
GAUGE_OK_PA, GAUGE_BAD_PA = 2.0e-6, 5.0e-3
_ITEM_TYPES = {"point": 0, "polygon": 1, "map": 2}

NAV_COMMANDS: Handlers = {}
command = registrar(NAV_COMMANDS)


# --------------------------------------------------------------------------- navigator


def _report_item(state: SerialEMState, index: int) -> Values:
    row = state.nav[index - 1]
    state.variables["navlabel"] = row.label
    state.variables["navnote"] = row.note
    x, y, z = row.stage_um
    return (float(index), x, y, z, float(_ITEM_TYPES.get(row.kind, 0)), float(row.regis))


@command("AddStagePosAsNavPoint")
def _add_point(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
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
        raise ScriptError("There is no current Navigator item")
    return _report_item(state, state.current_item)


@command("ChangeItemLabel")
def _label(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.nav[state.item_index(args[0]) - 1].label = str(args[1])


@command("ChangeItemNote")
def _note(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.nav[state.item_index(args[0]) - 1].note = str(args[1]) if len(args) > 1 else ""


@command("SetItemAcquire")
def _set_acquire(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = state.item_index(args[0] if args else 0, default_current=True)
    state.nav[index - 1].acquire = optional(args, 1, 1.0) != 0


@command("ReportItemAcquire")
def _item_acquire(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    index = state.item_index(args[0] if args else 0, default_current=True)
    return (flag(state.nav[index - 1].acquire),)


@command("NavIndexWithLabel")
def _index_with_label(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    label = str(args[0])
    return (float(next((i + 1 for i, r in enumerate(state.nav) if r.label == label), 0)),)


@command("MoveToNavItem")
def _move_to_item(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    index = state.item_index(args[0] if args else 0, default_current=True)
    x, y, z = state.nav[index - 1].stage_um
    state.em.move_stage(x, y, z)
    state.current_item = index


def _realign(state: SerialEMState, index: int) -> None:
    state.current_item = index
    state.last_realign_um = state.em.realign_to_item(state.nav[index - 1].em_item_id)


@command("RealignToOtherItem")
def _realign_other(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    _realign(state, state.item_index(args[0]))


@command("RealignToNavItem")
def _realign_current(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    if state.current_item == 0:
        raise ScriptError("There is no current Navigator item to realign to")
    _realign(state, state.current_item)


@command("GetRealignToItemError")
def _realign_error(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    x, y = state.last_realign_um
    return (x, y, x, y)      # first round, last round: the twin does one round


# --------------------------------------------------------------------------- status


@command("ReportVacuumGauge")
def _gauge(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
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
    return (state.em.status().high_voltage_kv,)


@command("AreDewarsFilling")
def _dewars(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (flag(state.em.status().dewar_filling),)
