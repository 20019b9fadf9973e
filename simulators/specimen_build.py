"""Random generation of a Specimen from its config (seeded, deterministic).

Kept apart from specimen.py so that the geometry the renderers query stays short. Each
part draws from its own child generator, so adding a feature to one part does not change
the others for the same seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from simulators.placement import Deformation, FocusPlane, GroundTruth, Placement
from simulators.specimen_config import SpecimenConfig

if TYPE_CHECKING:
    from simulators.specimen import Cell, Specimen

CODE_BITS = 5
CODE_BLOCK_UM = (4.0, 5.0)    # along the bar, into the square
CODE_STEP_UM = 7.0


def build_specimen(cfg: SpecimenConfig, cls: type[Specimen]) -> Specimen:
    from simulators.specimen import (
        TRAJECTORY_STEP_S, Beads, Contamination, Square, SquareState, Viruses,
    )

    root = np.random.default_rng(cfg.seed)
    rng_sq, rng_cells, rng_beads, rng_vir, rng_frz, rng_place = root.spawn(6)
    pitch = cfg.pitch_um
    half_open = (pitch - cfg.bar_width_um) / 2
    mesh_r = cfg.grid_diameter_um / 2 - cfg.rim_width_um
    n = int(np.ceil(cfg.grid_diameter_um / 2 / pitch))

    # squares --------------------------------------------------------------------------
    layout: list[tuple[int, int, bool]] = []
    for i in range(-n, n + 1):
        for j in range(-n, n + 1):
            cx, cy = i * pitch, j * pitch
            corner = np.hypot(abs(cx) + half_open, abs(cy) + half_open)
            if np.hypot(cx, cy) - half_open * np.sqrt(2) > mesh_r:
                continue                                  # wholly under the rim
            layout.append((i, j, corner > mesh_r))
    states: dict[tuple[int, int], SquareState] = {}
    ice: dict[tuple[int, int], float] = {}
    for i, j, _ in layout:
        u = rng_sq.random()
        state = (SquareState.BROKEN if u < cfg.broken_fraction else
                 SquareState.THICK_ICE if u < cfg.broken_fraction + cfg.thick_ice_fraction else
                 SquareState.OK)
        if (i, j) == (0, 0):
            state = SquareState.OK                        # the centre mark lives here
        states[(i, j)] = state
        ice[(i, j)] = {SquareState.OK: rng_sq.uniform(20, 90),
                       SquareState.THICK_ICE: rng_sq.uniform(250, 500),
                       SquareState.BROKEN: 0.0}[state]

    # cells ----------------------------------------------------------------------------
    from simulators.specimen import Cell

    cells: list[Cell] = []
    cells_of: dict[tuple[int, int], list[int]] = {}
    for i, j, partial in layout:
        if partial or states[(i, j)] != SquareState.OK or (i, j) == (0, 0):
            continue
        if rng_cells.random() >= cfg.cell_square_fraction:
            continue
        count = int(rng_cells.integers(cfg.cells_per_square[0], cfg.cells_per_square[1] + 1))
        for _ in range(count):
            off = rng_cells.uniform(-22, 22, size=2)
            k = int(rng_cells.integers(2, 5))
            lobes = np.array([[h, rng_cells.uniform(0.05, 0.25), rng_cells.uniform(0, 2 * np.pi)]
                              for h in range(2, 2 + k)])
            cells.append(Cell(
                centre_um=(i * pitch + off[0], j * pitch + off[1]),
                body_radius_um=float(rng_cells.uniform(5, 9)),
                body_height_um=float(rng_cells.uniform(3, 6)),
                periphery_radius_um=float(rng_cells.uniform(18, 38)),
                periphery_thickness_um=float(rng_cells.uniform(0.25, 0.6)),
                lobes=lobes, seed=int(rng_cells.integers(2**31)),
            ))
            cells_of.setdefault((i, j), []).append(len(cells) - 1)

    # beads ----------------------------------------------------------------------------
    bead_xy: list[NDArray[np.float64]] = []
    beads_of: dict[tuple[int, int], list[int]] = {}
    margin = 1.5
    for i, j, partial in layout:
        if states[(i, j)] == SquareState.BROKEN:
            continue
        count = int(rng_beads.integers(cfg.beads_per_square[0], cfg.beads_per_square[1] + 1))
        pts: list[NDArray[np.float64]] = []
        for _ in range(20 * count):          # squares cut by the rim hold fewer beads
            if len(pts) >= count:
                break
            p = rng_beads.uniform(-half_open + margin, half_open - margin, size=2)
            p = p + (i * pitch, j * pitch)
            if np.hypot(*p) > mesh_r - margin:
                continue
            pts.append(p)
            if rng_beads.random() < 0.08 and len(pts) < count:   # a clump of two
                ang = rng_beads.uniform(0, 2 * np.pi)
                pts.append(p + rng_beads.uniform(0.25, 1.2) * np.array([np.cos(ang), np.sin(ang)]))
        ids = list(range(len(bead_xy), len(bead_xy) + len(pts)))
        bead_xy.extend(pts)
        beads_of[(i, j)] = ids
    xy = np.array(bead_xy).reshape(-1, 2)
    beads = Beads(xy_um=xy, brightness=rng_beads.lognormal(0.0, 0.25, size=len(xy)),
                  lost=rng_frz.random(len(xy)) < cfg.bead_loss, diameter_um=cfg.bead_diameter_um)

    # contamination (appears at freezing) ------------------------------------------------
    n_cont = int(round(cfg.contamination * int((~beads.lost).sum())))
    open_squares = [(i, j) for i, j, _ in layout if states[(i, j)] != SquareState.BROKEN]
    cont_xy = np.zeros((n_cont, 2))
    if n_cont and open_squares:
        pick = rng_frz.integers(0, len(open_squares), size=n_cont)
        base = np.array([(open_squares[k][0] * pitch, open_squares[k][1] * pitch) for k in pick])
        cont_xy = base + rng_frz.uniform(-half_open + 1, half_open - 1, size=(n_cont, 2))
    contamination = Contamination(
        xy_um=cont_xy,
        diameter_um=rng_frz.choice([0.18, 0.22, 0.35, 0.6], size=n_cont)
        * rng_frz.uniform(0.8, 1.2, size=n_cont),
        contrast=rng_frz.uniform(0.3, 1.2, size=n_cont))

    # viruses --------------------------------------------------------------------------
    steps = int(np.ceil(cfg.freeze_time_s / TRAJECTORY_STEP_S)) + 1
    trajectories, heights, motions, keys = [], [], [], []
    p_static, p_diff, _ = cfg.virus_motion
    for (i, j), cell_ids in sorted(cells_of.items()):
        count = int(rng_vir.integers(cfg.viruses_per_cell_square[0],
                                     cfg.viruses_per_cell_square[1] + 1))
        for _ in range(count):
            cell = cells[cell_ids[int(rng_vir.integers(len(cell_ids)))]]
            ang = rng_vir.uniform(0, 2 * np.pi)
            rr = rng_vir.uniform(0.25, 1.15) * float(cell.radius_at(np.array([ang]))[0])
            start = np.array(cell.centre_um) + rr * np.array([np.cos(ang), np.sin(ang)])
            lim = np.array([i * pitch, j * pitch])
            start = np.clip(start, lim - half_open + 1, lim + half_open - 1)
            u = rng_vir.random()
            motion = 0 if u < p_static else 1 if u < p_static + p_diff else 2
            traj = _trajectory(rng_vir, start, steps, motion, lim, half_open)
            trajectories.append(traj)
            heights.append(rng_vir.uniform(0.05, 0.6) if rr < float(cell.periphery_radius_um)
                           else 0.05)
            motions.append(motion)
            keys.append(f"{i:+d}{j:+d}")
    viruses = Viruses(
        trajectories_um=np.array(trajectories).reshape(-1, steps, 2),
        height_um=np.array(heights), motion=np.array(motions, dtype=int),
        brightness=rng_vir.lognormal(0.0, 0.3, size=len(trajectories)), square_keys=tuple(keys))

    # placement and freezing (ground truth) ---------------------------------------------
    flipped = (rng_place.random() < cfg.flip_fraction) if cfg.flipped is None else cfg.flipped
    em_rot = rng_place.uniform(0, 360) if cfg.em_rotation_deg is None else cfg.em_rotation_deg
    lm_rot = rng_place.uniform(0, 360) if cfg.lm_rotation_deg is None else cfg.lm_rotation_deg
    truth = GroundTruth(
        lm=Placement(lm_rot, False, rng_place.uniform(-150, 150, size=2)),
        em=Placement(em_rot, bool(flipped), rng_place.uniform(-100, 100, size=2)),
        deformation=Deformation.random(rng_frz, cfg.stretch, cfg.distortion_um,
                                       span_um=pitch - cfg.bar_width_um),
        lm_focus=FocusPlane(float(rng_place.uniform(-5, 5)),
                            tuple(rng_place.uniform(-2e-3, 2e-3, size=2))),  # type: ignore[arg-type]  # 2-tuple
        em_height=FocusPlane(float(rng_place.uniform(-8, 8)),
                             tuple(rng_place.uniform(-1e-3, 1e-3, size=2))),  # type: ignore[arg-type]  # 2-tuple
    )

    squares = [Square(i=i, j=j, centre_um=(i * pitch, j * pitch), state=states[(i, j)],
                      partial=partial, cell_ids=tuple(cells_of.get((i, j), ())),
                      bead_ids=tuple(beads_of.get((i, j), ())))
               for i, j, partial in layout]
    return cls(config=cfg, squares=squares, cells=cells, beads=beads,
               contamination=contamination, viruses=viruses, truth=truth,
               hole_lattice_deg=float(rng_sq.uniform(-3, 3)),
               hole_origin_um=(float(rng_sq.uniform(0, 4)), float(rng_sq.uniform(0, 4))),
               ice_nm=ice)


def _trajectory(rng: np.random.Generator, start: NDArray[np.float64], steps: int, motion: int,
                centre: NDArray[np.float64], half_open: float) -> NDArray[np.float64]:
    """Virus path: static (thermal jitter only), Brownian, or a slowly turning run."""
    from simulators.specimen import TRAJECTORY_STEP_S

    dt = TRAJECTORY_STEP_S
    if motion == 0:
        path = np.tile(start, (steps, 1))                   # stuck to the membrane
    elif motion == 1:
        d = rng.uniform(0.0005, 0.003)                       # um^2/s
        steps_xy = rng.normal(0, np.sqrt(2 * d * dt), size=(steps, 2))
        steps_xy[0] = 0
        path = start + np.cumsum(steps_xy, axis=0)
    else:
        speed = rng.uniform(0.003, 0.012)                    # um/s
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, size=steps))
        v = speed * dt * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        v[0] = 0
        path = start + np.cumsum(v, axis=0)
    return np.clip(path, centre - half_open + 0.5, centre + half_open - 0.5)


def finder_mark_rectangles(spec: Specimen) -> list[tuple[float, float, float, float]]:
    """Metal rectangles of the finder pattern, grid frame (x0, y0, x1, y1).

    A chiral 'F' fills the centre square, so rotation and handedness are recoverable; every
    other square carries binary codes of its (i, j) on two of its bars, like the letters
    and numbers of a finder grid.
    """
    cfg = spec.config
    half_open = (cfg.pitch_um - cfg.bar_width_um) / 2
    s = half_open / 45.0
    rects = [(-25 * s, -35 * s, -13 * s, 35 * s),     # stem
             (-13 * s, 23 * s, 25 * s, 35 * s),       # top arm
             (-13 * s, -4 * s, 12 * s, 8 * s)]        # middle arm
    bw, bd = CODE_BLOCK_UM
    for sq in spec.squares:
        if (sq.i, sq.j) == (0, 0) or sq.partial:
            continue
        cx, cy = sq.centre_um
        x_edge, y_edge = cx - half_open, cy - half_open
        for bit in range(CODE_BITS):
            if (sq.i + 16) >> bit & 1:    # along the -y bar, encodes i
                x0 = x_edge + 6 + bit * CODE_STEP_UM
                rects.append((x0, y_edge, x0 + bw, y_edge + bd))
            if (sq.j + 16) >> bit & 1:    # along the -x bar, encodes j
                y0 = y_edge + 6 + bit * CODE_STEP_UM
                rects.append((x_edge, y0, x_edge + bd, y0 + bw))
    return rects
