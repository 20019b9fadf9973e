"""Focus for one tilt of a series: measured by autofocus where it can be, else estimated.

Why measure: the record defocus is the lens setting less the height of the specimen under the
beam, and that height changes with tilt for any target reached by image shift (a point ``d``
across the axis rises by ``d sin t``); the tracking model's height (``ShiftModel.c``) sees
only the part that shifts the image. ``ElectronMicroscope.autofocus`` measures the error at
the Focus area (beside the target on the tilt axis, so the target takes no dose); the lens
is then set to ``target - offset - error`` for the record.

When not to measure: every ``every``-th tilt only (dose and ~2 s at the Focus area each), and
not after ``max_failures`` failures since the last success on this target (a Focus area that
lies in an empty hole will not start working at the next tilt). Then the last measured
correction is carried to this tilt by the height model's change between the two tilts
(``previous``), or, before any measurement, the height model alone sets it (``model``), or
nothing does (``none``). Each tilt's decision is committed with its result, so a resumed
series decides the same way.

The height model (``model_correction``): a target ``b`` across the axis from the stage
position and ``c`` above the tilt axis (protocols/tilt_tracking.py ``ShiftModel``) sits
``c cos t - b sin t`` above the eucentric focus at tilt t, which is the lens correction that
keeps it at the target defocus (the lens defocus is relative to eucentric focus).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from drivers.base import AutofocusFailed, ElectronMicroscope, LowDoseArea

__all__ = ["focus_for_tilt", "model_correction"]


def model_correction(b_um: float, c_um: float, tilt_deg: float) -> float:
    """Lens correction (um) for a target ``b_um`` across the axis and ``c_um`` above it."""
    t = math.radians(tilt_deg)
    return c_um * math.cos(t) - b_um * math.sin(t)


def focus_for_tilt(em: ElectronMicroscope, *, index: int, tilt_deg: float,
                   done: Sequence[dict[str, Any]], model: Callable[[float], float] | None,
                   area: LowDoseArea, every: int, max_failures: int,
                   log: Any) -> dict[str, Any]:
    """Decide (and, if due, measure) the lens correction for tilt number ``index``.

    ``done``: the ``focus`` records of the tilts already recorded on this target, in order.
    ``model``: the height model's correction at a tilt (None until it is fitted). Returns the
    record to commit: ``method`` (autofocus | previous | model | none), ``correction_um``
    (add to the lens), the tilt, and what was measured or why it failed. The lens is not
    changed here.
    """
    measured = [f for f in done if f.get("method") == "autofocus"]
    failures = 0            # since the last measurement that worked
    for f in reversed(done):
        if f.get("method") == "autofocus":
            break
        failures += int("autofocus_failed" in f)
    due = every > 0 and failures < max_failures and (index % every == 0 or not measured)
    failed: str | None = None
    if due:
        try:
            error = em.autofocus(area, apply=False)
        except AutofocusFailed as err:
            failed = str(err)
            log.warning("em.tilt.autofocus_failed", reason=failed, in_a_row=failures + 1)
        else:
            log.info("em.tilt.autofocus", error_um=round(error, 3))
            return {"method": "autofocus", "tilt_deg": tilt_deg, "measured_error_um": error,
                    "correction_um": -error}
    out: dict[str, Any]
    if measured:
        last = measured[-1]
        carried = 0.0 if model is None else model(tilt_deg) - model(float(last["tilt_deg"]))
        out = {"method": "previous", "from_tilt_deg": last["tilt_deg"],
               "correction_um": float(last["correction_um"]) + carried}
    elif model is not None:
        out = {"method": "model", "correction_um": float(model(tilt_deg))}
    else:
        out = {"method": "none", "correction_um": 0.0}
    out["tilt_deg"] = tilt_deg
    if failed is not None:
        out["autofocus_failed"] = failed
    return out
