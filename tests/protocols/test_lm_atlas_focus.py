"""The atlas's autofocus: the contract's search with its frame scores computed in the
background, giving the focus the contract's own autofocus gives."""

from __future__ import annotations

import numpy as np
import pytest
from lm_sim import grid_centre, scope, small_grid

from drivers.base import sharpness
from drivers.clock import VirtualClock
from protocols.compute_lane import ComputeLane
from protocols.lm_atlas_focus import autofocus, focus_score


@pytest.mark.parametrize("kind", ["noise", "frame", "flat", "zeros"])
def test_focus_score_is_the_contracts_sharpness(kind: str) -> None:
    rng = np.random.default_rng(3)
    data = {"noise": lambda: rng.integers(0, 4000, (300, 200), dtype=np.uint16),
            "frame": lambda: scope(small_grid(seed=3), (256, 256)).snap("BF").data,
            "flat": lambda: np.full((64, 64), 500, np.uint16),
            "zeros": lambda: np.zeros((64, 64), np.uint16)}[kind]()
    assert focus_score(data) == pytest.approx(sharpness(data), rel=1e-9, abs=1e-12)


def test_pipelined_autofocus_finds_what_the_contracts_finds() -> None:
    spec = small_grid(seed=3)
    a = scope(spec, (256, 256), clock=VirtualClock(), seed=4)
    b = scope(spec, (256, 256), clock=VirtualClock(), seed=4)
    for lm in (a, b):
        lm.move_xy(*grid_centre(spec))
        lm.move_z(3.0)
    lane = ComputeLane(b.clock, "test")
    expected = [a.autofocus(12.0, 2.0), a.autofocus(3.0, 0.5)]
    found = [autofocus(b, 12.0, 2.0, lane), autofocus(b, 3.0, 0.5, lane)]
    lane.close()
    assert found == pytest.approx(expected, abs=1e-9)
    assert b.clock.now() == pytest.approx(a.clock.now())
    assert b.position_z() == pytest.approx(a.position_z(), abs=1e-9)
