"""Atlas registration on synthetic grids (tests/protocols/grid_render.py, not the simulator):
every rotation and mirror state is answered right and decisively, or refused when the grid
carries nothing chiral; square-index space and pose bookkeeping are exact."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.correlation.atlas import register_atlas
from protocols.correlation.atlas_pose import Pose, dihedral, lm_to_em_cells
from protocols.correlation.errors import CorrelationInputError
from tests.protocols.grid_render import PITCH_UM, render_overview

POINTS_UM = np.array([[0.0, 0.0], [250.0, 125.0], [-500.0, 375.0], [875.0, -625.0],
                      [-1000.0, -250.0]])


def _lin(deg: float, scale: float, mirrored: bool) -> np.ndarray:
    t = np.deg2rad(deg)
    m = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return m @ np.diag([-1.0, 1.0]) if mirrored else m


def _register(seed: int, lm_deg: float, em_deg: float, mirrored: bool, marks: bool = True,
              em_pixel_claimed: float = 5.5):  # type: ignore[no-untyped-def]
    l1, l2 = _lin(lm_deg, 1.0, False), _lin(em_deg, 0.98, mirrored)
    lm = render_overview(l1, np.array([1600.0, 1600.0]), 5.0, 640, "lm", seed=seed, marks=marks)
    em = render_overview(l2, np.array([1600.0, 1650.0]), 5.5, 600, "em", seed=seed, marks=marks)
    res = register_atlas(lm, 5.0, em, em_pixel_claimed, (POINTS_UM @ l1.T + 1600.0) / 5.0)
    return res, (POINTS_UM @ l2.T + [1600.0, 1650.0]) / 5.5


@pytest.mark.parametrize(("seed", "lm_deg", "em_deg", "mirrored"), [
    (1, 20.0, -75.0, True), (2, 0.0, 10.0, False), (3, 33.0, 100.0, True),
    (4, -10.0, 200.0, False), (5, 50.0, 137.0, True), (7, 5.0, 275.0, False),
], ids=["rot-75-mirror", "rot10", "rot100-mirror", "rot200", "rot137-mirror", "rot275"])
def test_every_pose_is_answered_right_and_decisively(seed: int, lm_deg: float, em_deg: float,
                                                    mirrored: bool) -> None:
    """Torn and thick-ice squares and cells (EM), faint cells and uneven light (LM)."""
    res, truth = _register(seed, lm_deg, em_deg, mirrored)
    assert res.status == "ok", res.reason
    assert res.mirrored == mirrored
    assert res.points_em_px is not None and res.points_error_um is not None
    err_um = np.linalg.norm(res.points_em_px - truth, axis=1) * 5.5
    assert np.all(err_um < 5.0), err_um
    # Decisive, not marginal: far above the acceptance threshold.
    assert res.confidence > 8.0 and res.z_best > 10.0, (res.confidence, res.z_best)
    assert len(res.lm_squares_px) > 200
    assert np.median(res.square_residuals_um) < 0.05 * PITCH_UM


def test_a_grid_without_chiral_content_is_refused() -> None:
    """Bars and a round mesh only: every rotation and mirror fits equally, so no answer."""
    res, _ = _register(6, 20.0, -75.0, True, marks=False)
    assert res.status == "no_confident_match", res.reason
    assert "ambiguous" in res.reason


def test_wrong_pixel_size_is_unusable_input() -> None:
    with pytest.raises(CorrelationInputError, match="grid pitch"):
        _register(1, 20.0, -75.0, True, em_pixel_claimed=7.0)


def test_pose_bookkeeping_matches_the_array_transform() -> None:
    """lm_to_em_cells names the same cells as transforming the array by ``dihedral``."""
    rng = np.random.default_rng(0)
    lm = rng.random((5, 7))
    for mirrored in (False, True):
        for rot in range(4):
            pose = Pose(mirrored, rot, 2, -1)
            moved = dihedral(lm, rot, mirrored)
            lr, lc, er, ec = lm_to_em_cells(pose, lm.shape)
            np.testing.assert_array_equal(lm[lr, lc], moved[er - 2, ec + 1])
