"""The virtual grid: deterministic, physically plausible, and its truth self-consistent."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.errors import ConfigError
from simulators.specimen import Specimen, SquareState, VirusMotion
from simulators.specimen_config import SpecimenConfig


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return Specimen.generate(seed=11)


def test_same_seed_same_specimen_different_seed_different() -> None:
    a, b, c = Specimen.generate(seed=5), Specimen.generate(seed=5), Specimen.generate(seed=6)
    assert np.array_equal(a.beads.xy_um, b.beads.xy_um)
    assert np.array_equal(a.viruses.trajectories_um, b.viruses.trajectories_um)
    assert a.truth.em.rotation_deg == b.truth.em.rotation_deg
    assert not np.array_equal(a.beads.xy_um[:50], c.beads.xy_um[:50])
    assert a.truth.em.rotation_deg != c.truth.em.rotation_deg


def test_grid_geometry_matches_a_200_mesh_grid(spec: Specimen) -> None:
    cfg = spec.config
    assert cfg.grid_diameter_um == 3050 and cfg.pitch_um == 125 and cfg.bar_width_um == 35
    # ~350 squares inside a 1325 um mesh radius
    assert 300 < len(spec.squares) < 420
    states = [s.state for s in spec.squares]
    assert states.count(SquareState.BROKEN) > 0 and states.count(SquareState.THICK_ICE) > 0
    # bars opaque, square centres open, hole lattice of 2 um on 4 um pitch
    sq = next(s for s in spec.squares if s.state == SquareState.OK and not s.partial
              and (s.i, s.j) != (0, 0))
    cx, cy = sq.centre_um
    pts = np.array([[cx, cy], [cx + 62.5, cy], [cx, cy - 62.5]], dtype=np.float32)
    metal = spec.metal(pts[:, 0], pts[:, 1], 0.1)
    assert metal[0] == pytest.approx(0.0, abs=1e-6) and metal[1] == 1 and metal[2] == 1
    line = np.arange(0, 40, 0.05, dtype=np.float32)
    holes = spec.hole_fraction(cx + line, np.full_like(line, cy), 0.05)
    assert 0.2 < holes.mean() < 0.6   # a line through a 2/4 lattice crosses holes ~half the time
    # outside the grid disc nothing is metal
    far = np.array([2000.0], dtype=np.float32)
    assert spec.metal(far, far, 1.0)[0] == 0


def test_centre_mark_is_chiral(spec: Specimen) -> None:
    """The 'F' and its mirror image differ, so handedness is recoverable from images."""
    ax = np.arange(-45, 45, 0.5, dtype=np.float32)
    gx, gy = np.meshgrid(ax, ax)
    mark = spec.metal(gx, gy, 0.5)
    mirrored = mark[::-1, :]
    assert mark.mean() > 0.1
    for k in range(4):
        assert np.abs(np.rot90(mirrored, k) - mark).mean() > 0.05


def test_beads_cells_viruses_within_spec(spec: Specimen) -> None:
    per_square = [len(s.bead_ids) for s in spec.squares
                  if s.state != SquareState.BROKEN and not s.partial]
    assert 5 <= np.median(per_square) <= 20 and min(per_square) >= 5
    lost = spec.beads.lost.mean()
    assert 0.25 < lost < 0.35
    n_survivors = int((~spec.beads.lost).sum())
    assert len(spec.contamination.xy_um) == round(0.2 * n_survivors)
    for s in spec.squares:
        if s.cell_ids:
            assert 1 <= len(s.cell_ids) <= 3 and s.state == SquareState.OK
    motion = spec.viruses.motion
    assert {int(VirusMotion.STATIC), int(VirusMotion.DIFFUSING)} <= set(motion.tolist())


def test_viruses_move_until_freezing_then_stay(spec: Specimen) -> None:
    v = spec.viruses
    t_f = spec.config.freeze_time_s
    moved = np.linalg.norm(v.at(t_f) - v.at(0.0), axis=1)
    static = v.motion == VirusMotion.STATIC
    assert np.all(moved[static] == 0)
    assert np.median(moved[~static]) > 0.5
    assert np.array_equal(v.at(t_f + 1000), v.frozen_um)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("rotation", [0.0, 73.0, 211.0])
def test_truth_round_trips_and_placement(rotation: float, flipped: bool) -> None:
    spec = Specimen.generate(seed=3, em_rotation_deg=rotation, flipped=flipped)
    p = spec.beads.xy_um[:200]
    em = spec.truth.grid_to_em_stage(p)
    assert np.abs(spec.truth.em_stage_to_grid(em) - p).max() < 1e-6
    lm = spec.truth.grid_to_lm_stage(p)
    assert np.abs(spec.truth.em_stage_to_lm_stage(em) - lm).max() < 1e-6
    # handedness: the signed area of a triangle flips sign exactly when the grid is flipped
    tri = np.array([[0, 0], [100, 0], [0, 100]], dtype=float)
    e = spec.truth.grid_to_em_stage(tri)
    u, v = e[1] - e[0], e[2] - e[0]
    cross = u[0] * v[1] - u[1] * v[0]
    assert (cross < 0) == flipped
    # rotation: the direction of the grid x axis on the EM stage
    d = spec.truth.grid_to_em_stage(np.array([[500.0, 0.0]])) - spec.truth.grid_to_em_stage(
        np.zeros((1, 2)))
    angle = np.rad2deg(np.arctan2(d[0, 1], d[0, 0]))
    assert (angle - rotation + 180) % 360 - 180 == pytest.approx(0.0, abs=1.0)


def test_freezing_deformation_is_within_the_configured_bounds() -> None:
    for seed in range(6):
        spec = Specimen.generate(seed=seed)
        d = spec.truth.deformation
        sv = np.linalg.svd(d.linear, compute_uv=False)
        assert 0.97 <= sv.min() and sv.max() <= 1.03
        # non-linear bend across one 90 um square: at most 0.5 um
        xs = np.linspace(-1200, 1200, 25)
        corners = np.array([[x, y] for x in xs for y in xs])
        bend = np.linalg.norm(d.nonlinear(corners + 90.0) - d.nonlinear(corners), axis=1)
        assert bend.max() <= 0.5 + 1e-9
        assert bend.max() > 0.05


def test_flip_fraction_is_honoured() -> None:
    flips = [Specimen.generate(seed=s, flip_fraction=0.3).truth.em.mirrored for s in range(60)]
    assert 0.15 < np.mean(flips) < 0.45
    assert not any(Specimen.generate(seed=s, flip_fraction=0.0).truth.em.mirrored
                   for s in range(10))


@pytest.mark.parametrize("field,value", [
    ("pitch_um", -125.0), ("bar_width_um", 200.0), ("bead_loss", 1.5),
    ("beads_per_square", (9, 3)), ("virus_motion", (0.5, 0.2, 0.2)), ("unknown_knob", 1),
])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        SpecimenConfig.build(**{field: value})
    assert info.value.field == f"specimen.{field}"
