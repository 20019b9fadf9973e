"""Realign on the simulated TEM with stage error on: the target lands within 100 nm (the
issue's bound; in fact within 20 nm) of the centre of a 39,000x frame, where a plain stage
move misses by hundreds of nanometres."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from em_sim import MappedSquare, make_em, miss_nm

from drivers.base import LowDoseArea
from protocols.em_align import AlignmentError
from protocols.em_montage import map_image
from protocols.realign import RealignParams, realign
from simulators.specimen import Specimen

OFFSETS = [(3.0, 2.0), (-4.0, 1.0), (0.0, -5.0), (6.0, 6.0), (-7.0, -3.0), (8.0, -8.0)]


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> MappedSquare:
    spec = Specimen.generate(seed=4)
    return MappedSquare(make_em(spec), spec, tmp_path_factory.mktemp("realign"))


def test_realign_brings_targets_within_100nm_at_39000x(mapped: MappedSquare) -> None:
    em = mapped.em
    reference = map_image(mapped.result, mapped.data_dir)
    before, after = [], []
    for k, offset in enumerate(OFFSETS):
        nominal, truth = mapped.target(offset)
        em.set_image_shift(0.0, 0.0)
        em.move_stage(nominal[0] - 40 + 10 * k, nominal[1] + 30)
        em.move_stage(*nominal)
        before.append(miss_nm(em, em.acquire(LowDoseArea.RECORD), truth))
        res = realign(em, (float(nominal[0]), float(nominal[1])), reference, RealignParams())
        after.append(miss_nm(em, em.acquire(LowDoseArea.RECORD), truth))
        assert em.image_shift() == pytest.approx(res.image_shift_um)
        assert res.residual_um is not None and res.residual_um < 0.02   # converged
    print(f"realign miss before {np.round(before)} nm, after {np.round(after, 1)} nm")
    # every iteration at the map's own View preset: a few nm (benchmark: 3 nm median, 6 max)
    assert max(after) < 20.0 and np.median(after) < 10.0
    assert np.median(before) > 300.0


def test_realign_refuses_a_target_off_its_map(mapped: MappedSquare) -> None:
    reference = map_image(mapped.result, mapped.data_dir)
    far = mapped.centre + np.array([60.0, 0.0])
    with pytest.raises(AlignmentError, match="is the target on this map"):
        realign(mapped.em, (float(far[0]), float(far[1])), reference, RealignParams())


def test_realign_params_refuse_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        RealignParams.model_validate({"tolerance": 0.1})


@pytest.mark.parametrize(("found", "rim"), [((0.0, 0.0), False), ((0.12, 0.1), False),
                                            ((0.185, 0.094), True), ((-0.2, 0.0), True)],
                         ids=["centre", "inside", "seed-5-session-rim", "on-rim"])
def test_a_fine_match_on_the_search_rim_is_recognised(found: tuple[float, float],
                                                       rim: bool) -> None:
    """A fine iteration whose best match sits on the rim of its 0.2 um search found a slope,
    not a peak (the session's seed 5 walked 208 nm per iteration that way and never
    converged): realign then searches again at the coarse radius."""
    from protocols.realign import _on_window_edge
    assert _on_window_edge(found, (0.0, 0.0), 0.2, 0.0273) is rim
