"""Session templates for the light-microscope protocols, in daemon/templates.py's form.

``clemd_templates()`` returns ``(name, params_model, factory, instruments, description)``
tuples; the daemon loads the modules named in its ``TEMPLATE_MODULES`` and calls it, so this
module never imports the daemon. Factories take ``(params, env)``; the LM plans need nothing
from the session environment but their params (they write under ``ctx.data_dir``).
"""

from __future__ import annotations

from typing import Any

from protocols.lm_atlas import LMAtlasParams, LMAtlasPlan
from protocols.plan import Plan
from protocols.square_selection import SquareSelectionParams, SquareSelectionPlan
from protocols.target_extraction import TargetExtractionParams, TargetExtractionPlan
from protocols.time_lapse import TimeLapseParams, TimeLapsePlan

__all__ = ["clemd_templates"]

LM = frozenset({"lm"})


def _atlas(p: LMAtlasParams, env: Any) -> Plan:
    return LMAtlasPlan(p)


def _squares(p: SquareSelectionParams, env: Any) -> Plan:
    return SquareSelectionPlan(p)


def _time_lapse(p: TimeLapseParams, env: Any) -> Plan:
    return TimeLapsePlan(p)


def _targets(p: TargetExtractionParams, env: Any) -> Plan:
    return TargetExtractionPlan(p)


def clemd_templates() -> list[tuple[Any, ...]]:
    return [
        ("lm_atlas", LMAtlasParams, _atlas, LM,
         "20x grid atlas: focus map, tiles as OME-TIFF, stitched atlas with its affine"),
        ("square_selection", SquareSelectionParams, _squares, LM,
         ("find squares in the atlas, inspect the best at 100x, rank (override allowed); "
         "needs a committed lm-atlas/stitch in the same session")),
        ("time_lapse", TimeLapseParams, _time_lapse, LM,
         ("live 100x time-lapse from a useq MDASequence (default 488 + 640 every 5 min for "
         "40 min, 8 um at 1 um, then + 405)")),
        ("target_extraction", TargetExtractionParams, _targets, frozenset(),
         ("virus targets from the last time point (MIP, LoG, static-only filter); needs a "
         "committed timelapse/summary in the same session")),
    ]
