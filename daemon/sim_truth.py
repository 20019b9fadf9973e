"""The simulated world's truth probe: how far a tilt series really landed from its virus.

Simulation only. The AutoCLEM report (protocols/autoclem_report.py) shows a "true error"
column when ``ctx.params["truth_probe"]`` holds a ``TruthProbe``; the service puts one there
when its instruments are the simulators (so do tests and benchmarks), and protocols never
see the simulators themselves. The probe never feeds a decision.

The truth of a target is the virus it came from: the frozen virus nearest to the target's
position on the LM stage (the session knows targets in LM stage um; the LM stage misses by
~1 um, far less than the distance between viruses, which is checked), carried to the EM stage
by the specimen's ground truth (placement, freezing deformation). Where the tilt series
really looked is the true stage position of the centre of its record nearest 0 degrees,
from the EM simulator's record of that frame.
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
from simulators.specimen import Specimen

if TYPE_CHECKING:
    from daemon.instruments import Instruments

__all__ = ["SimulatedTruthProbe", "VirusMatch", "nearest_virus", "probe_for",
           "record_centre_true_um"]

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
    """``TruthProbe`` of the simulated world: ``probe(target_lm_stage_um, record) -> nm``.

    Returns None when the target matches no virus (further than ``MAX_MATCH_UM``, or two
    viruses equally near) or the frame is not this simulator's; each such case is logged.
    """

    def __init__(self, specimen: Specimen, em: SimulatedElectronMicroscope) -> None:
        self.specimen = specimen
        self.em = em

    def __call__(self, target_lm_stage_um: tuple[float, float],
                 record: Mapping[str, Any]) -> float | None:
        match = nearest_virus(self.specimen, target_lm_stage_um)
        if match.distance_um > MAX_MATCH_UM or match.runner_up_um < 2 * match.distance_um:
            log.info("sim_truth.no_virus", target_lm_stage_um=list(target_lm_stage_um),
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
        return SimulatedTruthProbe(specimen, instruments.em)
    return None
