"""Session templates of the EM protocols, for the daemon's registry (daemon/templates.py).

``clemd_templates()`` returns ``(name, params_model, factory, instruments, description)``
tuples; ``factory(params, env)`` builds the plan. The tilt-series template takes its targets
from the params, or, when none are given there, from the session's committed targets in the
``em_stage`` frame (``env.targets()``), each with the map named in the template params.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from protocols.em_atlas import EMAtlasParams, EMAtlasPlan
from protocols.em_navigator import EMNavigatorParams, EMNavigatorPlan
from protocols.em_params import FrozenParams
from protocols.plan import Plan
from protocols.square_map import SquareMapParams, SquareMapPlan
from protocols.tilt_series import TiltSeriesParams, TiltSeriesPlan

__all__ = ["SessionTiltSeriesParams", "clemd_templates"]

EM_ONLY = frozenset({"em"})


class SessionTiltSeriesParams(FrozenParams):
    """Tilt series of a session's submitted targets: everything of ``TiltSeriesParams`` but
    the targets, which come from the session (frame ``em_stage``), all on one map."""

    series: dict[str, Any] = Field(default_factory=dict)
    square_id: str | None = None
    map_json: str | None = None


def _tilt_series_from_session(params: SessionTiltSeriesParams, env: Any) -> Plan:
    targets = [{"id": str(t["id"]), "x_um": float(t["x"]), "y_um": float(t["y"]),
                "square_id": params.square_id, "map_json": params.map_json}
               for t in env.targets() if t.get("frame") == "em_stage"]
    return TiltSeriesPlan(TiltSeriesParams.model_validate({**params.series, "targets": targets}))


def clemd_templates() -> list[tuple[Any, ...]]:
    return [
        ("em_atlas", EMAtlasParams, lambda p, env: EMAtlasPlan(p), EM_ONLY,
         "EM atlas: low-magnification montage of the grid, stitched, with its affine"),
        ("square_map", SquareMapParams, lambda p, env: SquareMapPlan(p), EM_ONLY,
         "Square maps at 4,700x (20% overlap), stitched, with their affines"),
        ("tilt_series", TiltSeriesParams, lambda p, env: TiltSeriesPlan(p), EM_ONLY,
         "Eucentric height, realign and tracked tilt series at the given targets"),
        ("tilt_series_session_targets", SessionTiltSeriesParams, _tilt_series_from_session,
         EM_ONLY, "Tilt series at the session's submitted em_stage targets"),
        ("em_navigator", EMNavigatorParams, lambda p, env: EMNavigatorPlan(p), EM_ONLY,
         "SerialEM navigator with the session's maps and targets"),
    ]
