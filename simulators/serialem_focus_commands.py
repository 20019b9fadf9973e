"""What the simulated SerialEM does for its autofocus commands.

Read in SerialEM's source (mastcu/SerialEM):

- ``AutoFocus [change] [area]`` (MacroCommands.cpp CMacCmd::AutoFocus): ``change`` defaults
  to 1; under -1 (i.e. -2) it only reports the beam-tilt displacement (DetectFocus
  FOCUS_REPORT, for calibration); otherwise CFocusManager::AutoFocusStart(change, area).
  There (FocusManager.cpp) ``change`` > 0 moves the focus by ``target - measured`` (clamped
  to +-2 max(8, refocus threshold) = +-16 um) and iterates while the change exceeds the
  refocus threshold; 0 or -1 only measure. ``area`` picks the low-dose area: 0 Focus, 1 or 2
  View, 3 or 4 Search, negative Record. With View/Search the area's defocus offset is
  subtracted from the measurement, except when only measuring with the odd value (1, 3).
  The measured defocus is SerialEM's (negative = underfocus) less the autofocus offset.
- ``ReportAutoFocus`` (CMacCmd::ReportAutoFocus): two values, the last measured defocus
  (CFocusManager::GetCurrentDefocus) and an error code: 0 ok, -1 if the last autofocus
  failed, else the abort reason (1-4: inconsistent, delta limit, absolute limit, near-zero
  correlation). A failed autofocus is not a script error: the script goes on and asks.
- ``SetTargetDefocus`` / ``ReportTargetDefocus``: the target ``change`` > 0 aims at.

The twin measures through the microscope's contract (``autofocus(area, apply=False)``: the
true error at the area with the simulator's noise, ``AutofocusFailed`` on a field with
nothing to correlate, which becomes error code -1 with the last defocus kept). Deviations:
one iteration only (the simulated measurement does not depend on the defocus, so a second
would change nothing); the autofocus offset is 0; the Search/View offset the twin knows is
the microscope's configured ``defocus_offset_um``.
"""

from __future__ import annotations

from dataclasses import replace

from drivers.base import AutofocusFailed, LowDoseArea
from drivers.serialem.commands import ArgValue
from simulators.serialem_state import (
    Handlers,
    ScriptError,
    SerialEMState,
    Values,
    optional,
    registrar,
)

FOCUS_COMMANDS: Handlers = {}
command = registrar(FOCUS_COMMANDS)

#: SerialEM's largest single focus change: 2 * max(8, refocus threshold 8) um.
CHANGE_LIMIT_UM = 16.0


def _area_of(use: int) -> LowDoseArea:
    """AutoFocus's second argument as a low-dose area (AutoFocusStart's useViewInLD)."""
    if use < 0:
        return LowDoseArea.RECORD
    if use == 0:
        return LowDoseArea.FOCUS
    return LowDoseArea.VIEW if use < 3 else LowDoseArea.SEARCH


@command("AutoFocus")
def _autofocus(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    change = int(optional(args, 0, 1.0))
    use = int(optional(args, 1, 0.0))
    if change < -1:
        raise ScriptError("AutoFocus -2 (report the beam-tilt displacement for calibration) "
                          "is not simulated in:")
    em = state.em
    area = _area_of(use) if state.low_dose_on else LowDoseArea.FOCUS
    settings = em.low_dose.get(area)
    if settings is None:
        raise ScriptError(f"The {area.name.title()} parameter set is not set up")
    base = em.defocus()
    try:
        if state.low_dose_on:
            error = em.autofocus(area, apply=False)
            state.area = area
        else:           # the Focus parameter set at the current magnification
            em.low_dose[area] = replace(settings, mag_index=em.mag_index(),
                                        defocus_offset_um=0.0)
            try:
                error = em.autofocus(area, apply=False)
            finally:
                em.low_dose[area] = settings
    except AutofocusFailed:
        state.autofocus_error = -1
        return
    offset = settings.defocus_offset_um if state.low_dose_on else 0.0
    measured = base + offset + error
    if area in (LowDoseArea.VIEW, LowDoseArea.SEARCH) and not (change == -1 and use % 2 == 1):
        measured -= offset
    state.autofocus_defocus_um = measured
    state.autofocus_error = 0
    if change > 0:
        diff = state.target_defocus_um - measured
        em.set_defocus(base + max(-CHANGE_LIMIT_UM, min(CHANGE_LIMIT_UM, diff)))


@command("ReportAutoFocus")
def _report_autofocus(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.autofocus_defocus_um, float(state.autofocus_error))


@command("SetTargetDefocus")
def _set_target(state: SerialEMState, args: tuple[ArgValue, ...]) -> None:
    state.target_defocus_um = float(args[0])


@command("ReportTargetDefocus")
def _report_target(state: SerialEMState, args: tuple[ArgValue, ...]) -> Values:
    return (state.target_defocus_um,)
