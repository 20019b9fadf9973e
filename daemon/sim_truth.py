"""The simulated world's truth probe: how far a tilt series really landed from its virus.

Simulation only. The AutoCLEM report (protocols/autoclem_report.py) shows a "true error"
column when ``ctx.params["truth_probe"]`` holds a ``TruthProbe``; the service puts one there
when its instruments are the simulators (so do tests and benchmarks), and protocols never
see the simulators themselves. The probe never feeds a decision.

The truth of a target is the virus it came from: the frozen virus nearest to where the
target really was on the LM stage, carried to the EM stage by the specimen's ground truth
(placement, freezing deformation). Where the target really was comes from the LM simulator's
record of the frame the session placed it in (``lm_frame``, ``lm_px``: the final bead set),
so the LM stage's miss at that visit (~1-2 um, comparable to the distance between viruses)
does not pick the wrong virus; a frame the simulator did not take (a restarted service)
falls back to the nominal ``lm_stage_um``, and an ambiguous match (runner-up closer than
twice the nearest) is refused. Where the tilt series really looked is the true stage
position of the centre of its record nearest 0 degrees, from the EM simulator's record of
that frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.base import Image, InvalidState
from simulators.electron import SimulatedElectronMicroscope
from simulators.light import SimulatedLightMicroscope
from simulators.specimen import Specimen

if TYPE_CHECKING:
    from daemon.instruments import Instruments

__all__ = ["SimulatedTruthProbe", "VirusMatch", "match_target", "nearest_virus", "probe_for",
           "record_centre_true_um", "true_lm_stage_um"]

log = structlog.get_logger(__name__)

FloatArray = NDArray[np.float64]

#: A target further than this from every virus (LM stage um) came from no virus.
MAX_MATCH_UM = 3.0


@dataclass(frozen=True)
class VirusMatch:
    """The virus a target came from: its index, its true EM stage position, the distance
    from the target (LM stage um) and the distance of the next nearest virus."""

    index: int
    em_stage_um: FloatArray
    distance_um: float
    runner_up_um: float


def nearest_virus(spec: Specimen, target_lm_stage_um: tuple[float, float]) -> VirusMatch:
    """The frozen virus nearest to a target on the LM stage, and where it is on the EM stage."""
    frozen = spec.viruses.frozen_um
    lm = spec.truth.grid_to_lm_stage(frozen)
    d = np.hypot(*(lm - np.asarray(target_lm_stage_um, float)).T)
    order = np.argsort(d)
    k = int(order[0])
    runner = float(d[order[1]]) if len(order) > 1 else float("inf")
    em = np.asarray(spec.truth.grid_to_em_stage(frozen[k]), dtype=np.float64)
    return VirusMatch(k, em, float(d[k]), runner)


def true_lm_stage_um(lm: SimulatedLightMicroscope, target: Mapping[str, Any]
                     ) -> FloatArray | None:
    """Where a target really was on the LM stage: its pixel (``lm_px``) in the frame it was
    placed in (``lm_frame``, an image record) through the simulator's true pose of that
    frame; None when the target has no frame or ``lm`` did not take it."""
    frame, px = target.get("lm_frame"), target.get("lm_px")
    if not frame or px is None or None in px:
        return None
    stub = Image(data=np.zeros((2, 2)), pixel_size_um=float(frame["pixel_size_um"]),
                 pixel_to_stage=np.asarray(frame["pixel_to_stage"], float), instrument="lm",
                 extra=dict(frame.get("extra", {})))
    try:
        a = lm.true_pixel_to_stage(stub)
    except InvalidState:
        return None
    return np.asarray(a[:, :2] @ np.asarray(px, float) + a[:, 2], dtype=np.float64)


def match_target(spec: Specimen, target: Mapping[str, Any],
                 lms: tuple[SimulatedLightMicroscope, ...] = ()) -> tuple[VirusMatch, str]:
    """The virus a session target came from and how its LM position was known ("frame":
    the simulator's true pose of its frame; "nominal": the stage's reading)."""
    for lm in lms:
        xy = true_lm_stage_um(lm, target)
        if xy is not None:
            return nearest_virus(spec, (float(xy[0]), float(xy[1]))), "frame"
    x, y = target["lm_stage_um"]
    return nearest_virus(spec, (float(x), float(y))), "nominal"


def record_centre_true_um(em: SimulatedElectronMicroscope, record: Mapping[str, Any]
                          ) -> FloatArray:
    """True EM stage position of the centre of a saved frame (``frame_meta`` of a record).

    Raises InvalidState when ``em`` did not take the frame (another process's simulator).
    """
    extra = dict(record.get("extra", {}))
    h, w = (int(v) for v in record["shape"])
    stub = Image(data=np.zeros((2, 2)), pixel_size_um=float(record["pixel_size_um"]),
                 pixel_to_stage=np.asarray(record["pixel_to_stage"], float), instrument="em",
                 extra=extra)
    a = em.true_pixel_to_stage(stub)
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    return np.asarray(a[:, :2] @ centre + a[:, 2], dtype=np.float64)


class SimulatedTruthProbe:
    """``TruthProbe`` of the simulated world: ``probe(target, record) -> nm``.

    ``target`` is the session's record of a target (``lm_stage_um``, and ``lm_px`` in its
    ``lm_frame`` when it has one). Returns None when the target matches no virus (further
    than ``MAX_MATCH_UM``, or two viruses nearly as near) or the frame is not this
    simulator's; each such case is logged.
    """

    def __init__(self, specimen: Specimen, em: SimulatedElectronMicroscope,
                 lm: SimulatedLightMicroscope | None = None) -> None:
        self.specimen = specimen
        self.em = em
        self.lm = lm

    def __call__(self, target: Mapping[str, Any], record: Mapping[str, Any]) -> float | None:
        match, how = match_target(self.specimen, target, () if self.lm is None else (self.lm,))
        if match.distance_um > MAX_MATCH_UM or match.runner_up_um < 2 * match.distance_um:
            log.info("sim_truth.no_virus", target=target.get("id"), located_by=how,
                     distance_um=round(match.distance_um, 3),
                     runner_up_um=round(match.runner_up_um, 3))
            return None
        try:
            reached = record_centre_true_um(self.em, record)
        except InvalidState as err:
            log.info("sim_truth.unknown_frame", path=record.get("path"), reason=str(err))
            return None
        return float(np.hypot(*(reached - match.em_stage_um)) * 1e3)


def probe_for(instruments: Instruments) -> SimulatedTruthProbe | None:
    """The probe of a simulated world (a simulated EM and the specimen the simulators share),
    else None: real instruments have no truth to report. The service puts it in each
    session's ``StepContext.params["truth_probe"]``."""
    specimen = instruments.extra.get("specimen")
    if isinstance(instruments.em, SimulatedElectronMicroscope) and isinstance(specimen,
                                                                              Specimen):
        lm = instruments.lm if isinstance(instruments.lm, SimulatedLightMicroscope) else None
        return SimulatedTruthProbe(specimen, instruments.em, lm)
    return None
