"""The pose told by closed squares: what is metal to light is metal to electrons.

Why a channel of its own: an orientation mark made of solid squares (or any square closed
by metal) is the clearest non-periodic feature a grid has, yet the metal channel cannot
see it - a whole closed square looks the same under every symmetry of the square and is
projected out of the patches (atlas_pose.content), because thick ice closes squares to the
electrons as well, and those must not decide. The film channel sees it, but weighed
against the brightness noise of hundreds of ordinary squares. Metal stops light and
electrons alike; ice, however thick, passes some electrons and lets light through. So an
EM square counts as metal only when it is as dark as the bars, and under the true pose the
LM's closed squares land on EM metal while its open film does not. Per pose, the chance
of that by accident is hypergeometric over the squares known in both, times the number of
poses tried - a number of false alarms (NFA), the a-contrario test of matching.py. Every
other pose's NFA is kept, so that a tie (a symmetric mark) is seen as one.

Scores are in decades: ``-log10(NFA)``, so 3 means one chance coincidence in 1000 grids.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.signal import correlate2d
from scipy.stats import hypergeom

from protocols.correlation.atlas_lattice import LatticeCells
from protocols.correlation.atlas_pose import (
    POSES,
    Pose,
    PoseDecision,
    closed_boundary,
    dihedral,
    lm_to_em_cells,
)

BoolArray = NDArray[np.bool_]

# A square is closed in the LM below this fraction of a typical opening's open area (as in
# atlas_pose.film_contrast), and counts as closed in the EM below the looser EM_CLOSED: the
# hit needs only "not open film", and a solid square's edge in a coarser EM atlas must not
# turn a hit into a miss.
LM_CLOSED = 0.15
EM_CLOSED = 0.5
# An EM square is closed by metal when its film is less than this fraction of a typical
# film's brightness above the metal: 5% transmission is ln(20) = 3 inelastic mean free
# paths (~1 um of ice at 300 kV) more than the film's. On the independent renderer solid
# squares sit at 0.00 +- 0.01, thick-ice squares at 0.10-0.12.
METAL_LIKE = 0.05
# LM closed clusters larger than this are no mark (a piece of rim, a closed region).
MAX_MARK_SQUARES = 12
# An LM cluster cut by the image edge counts as a mark from this many squares in the field.
MIN_CUT_MARK = 2
# ... and when every square around it is open to this fraction of a typical opening.
WHOLE_SQUARE = 0.8
# A pose counts as a hypothesis when this many LM marks land on squares known in the EM.
MIN_SQUARES = 3


def lm_marks(cells: LatticeCells) -> BoolArray:
    """LM squares closed by metal that are content, not boundary.

    A cluster touching the image edge is a mark only when the edge cuts off little of it
    (see _cut_marks): a piece of rim cut by a partial field is small and closed too, and
    would, under a wrong rotation, land on a piece of the EM rim.
    """
    if not (cells.found & cells.valid).any():
        return np.zeros(cells.shape, bool)
    typical = cells.typical_openness()
    closed = cells.valid & (cells.openness < LM_CLOSED * typical)
    lab, n = ndimage.label(closed, structure=np.ones((3, 3)))
    if n == 0:
        return closed
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum(np.ones(lab.shape), lab, idx)
    edge = ndimage.binary_dilation(~cells.valid, structure=np.ones((3, 3)),
                                   border_value=1)
    at_edge = ndimage.maximum(edge, lab, idx) > 0
    partial = cells.valid & ~closed & (cells.openness < WHOLE_SQUARE * typical)
    sides = ndimage.binary_dilation(~cells.valid, border_value=1)  # a side on the edge
    keep = (sizes <= MAX_MARK_SQUARES) & (~at_edge | _cut_marks(lab, idx, sizes, sides, partial))
    return np.asarray(np.isin(lab, 1 + np.flatnonzero(keep)), dtype=bool)


def _cut_marks(lab: NDArray[np.int32], idx: NDArray[np.int64], sizes: NDArray[np.float64],
               sides: BoolArray, partial: BoolArray) -> NDArray[np.bool_]:
    """Which closed clusters at the image edge are marks the edge cuts: at least
    MIN_CUT_MARK squares, at most a third of them (or one) with a side on the edge
    (``sides``), and only whole open squares (WHOLE_SQUARE of a typical opening) around.

    Why: an orientation mark near the edge of a partial field loses a square or two to it
    and was dropped whole (independent grids 1798679648 and 1024679390: a 7- and a
    4-square mark, 6 and 3 squares in the LM field, refused). A piece of rim runs along the
    edge it is cut by (the synthetic corner of rim in the tests: 6 of 12 squares on it),
    and the round mesh edge cuts the squares beside it part-way; a mark stands among whole
    squares (the two marks above: 2 of 6 and 1 of 3 squares on the edge).
    """
    against = ndimage.sum(sides, lab, idx)
    beside_partial = ndimage.maximum(
        ndimage.binary_dilation(partial, structure=np.ones((3, 3))), lab, idx) > 0
    return np.asarray((sizes >= MIN_CUT_MARK) & (against <= np.maximum(1.0, sizes / 3.0))
                      & ~beside_partial, dtype=bool)


def em_closed(cells: LatticeCells) -> tuple[BoolArray, BoolArray]:
    """(closed by metal, known) EM squares; the rim and the space beyond it are not known.

    Closed means as dark as the metal itself (below METAL_LIKE of the film's brightness
    above it) when the square's brightness is known: ice, however thick, passes some
    electrons, metal none, and every ice-closed square counted raises the chance level
    that the marks must beat.
    """
    found = cells.found & cells.valid
    known = cells.valid & ~closed_boundary(cells, edge_counts=False)
    closed = known & (cells.openness < EM_CLOSED * cells.typical_openness(default=1.0))
    b = cells.brightness
    if b is not None and found.any() and np.isfinite(cells.metal_level):
        span = float(np.nanmedian(b[found])) - cells.metal_level
        if span > 0:
            with np.errstate(invalid="ignore"):
                closed &= (b - cells.metal_level) < METAL_LIKE * span
    return np.asarray(closed, dtype=bool), known


def lm_known(cells: LatticeCells) -> tuple[BoolArray, BoolArray]:
    """(marks, known) LM squares: known are the marks and the squares light crosses (open
    film); partly covered squares (a ring, letters, the mesh edge) and closed regions that
    are no mark say nothing either way."""
    marks = lm_marks(cells)
    open_film = cells.valid & (cells.openness > 0.5 * cells.typical_openness(default=1.0))
    return marks, np.asarray(marks | open_film, dtype=bool)


def decide_closed(lm: LatticeCells, em: LatticeCells) -> PoseDecision | None:
    """The pose whose LM marks land on metal-dark EM squares least likely by chance, or
    None when the LM has fewer than MIN_SQUARES mark squares.

    Both ways: metal stops light and electrons alike, so under the true pose the LM's
    marks land on EM metal and the LM's open film does not. Per pose, over the squares
    known in both, the chance of ``h`` or more of the ``n`` marks landing on the ``K``
    metal squares among ``N`` is hypergeometric: a mark dropped into a piece of rim
    brings the rim's other squares, under the LM's open film, into ``K`` and so weighs
    little. ``z_of`` holds every pose's -log10(NFA) (poses with fewer than MIN_SQUARES
    marks on known squares cannot count: NFA = number of hypotheses); ``z_best``,
    ``z_gap`` and ``z_held`` are in the same decades, ``z_held`` being the best pose's
    significance with one of its hits taken away, against the runner-up.
    """
    marks, known_l = lm_known(lm)
    if int(marks.sum()) < MIN_SQUARES:
        return None
    metal, known_e = em_closed(em)
    tried: list[tuple[tuple[int, int, int, int], Pose]] = []  # ((N, K, n, h), pose)
    em_k, em_m = known_e.astype(np.float64), (metal & known_e).astype(np.float64)
    for mirrored, rot in POSES:
        kl = np.asarray(dihedral(known_l, rot, mirrored), np.float64)
        ml = np.asarray(dihedral(marks & known_l, rot, mirrored), np.float64)
        # full cross-correlation: output [i, j] pairs LM cell [r, c] with EM cell
        # [r + i - (h - 1), c + j - (w - 1)], i.e. dr = i - (h - 1), dc = j - (w - 1)
        counts = [np.rint(correlate2d(e, x, mode="full")).astype(int)
                  for e, x in ((em_k, kl), (em_m, kl), (em_k, ml), (em_m, ml))]
        h, w = kl.shape
        for i in range(counts[0].shape[0]):
            for j in range(counts[0].shape[1]):
                tried.append(((int(counts[0][i, j]), int(counts[1][i, j]),
                               int(counts[2][i, j]), int(counts[3][i, j])),
                              Pose(mirrored, rot, i - (h - 1), j - (w - 1))))
    counted = [t for t in tried if t[0][2] >= MIN_SQUARES]
    n_hyp = max(len(counted), 1)
    z_of = {pose: -np.log10(n_hyp) for _, pose in tried}

    def decades(big_n: int, k: int, n: int, hits: int) -> float:
        return float(-np.log10(n_hyp * max(float(hypergeom.sf(hits - 1, big_n, k, n)),
                                           1e-300)))

    for (big_n, k, n, hits), pose in counted:
        z_of[pose] = decades(big_n, k, n, hits)
    ranked = sorted(counted, key=lambda t: -z_of[t[1]])
    if len(ranked) < 2:
        return None
    (big_n, k, n, hits), pose = ranked[0]
    best = z_of[pose]
    runner_hits, runner_pose = _different_runner_up(marks, metal, ranked)
    runner = z_of[runner_pose] if runner_pose is not None else -np.log10(n_hyp)
    held = decades(big_n - 1, k - 1, n - 1, hits - 1) if hits >= 1 and n >= 2 else 0.0
    return PoseDecision(pose=pose, score=float(hits), runner_up=float(runner_hits),
                        z_best=float(best), z_gap=float(best - runner),
                        z_held=float(min(held, best) - runner), n_hypotheses=n_hyp,
                        n_candidates=n_hyp, mesh_score=float("nan"), z_of=z_of)


def _hits(marks: BoolArray, closed: BoolArray, pose: Pose) -> set[tuple[int, int]]:
    """EM squares on which the pose lands an LM mark square that is closed there."""
    lr, lc, er, ec = lm_to_em_cells(pose, marks.shape)
    on = marks[lr, lc] & (er >= 0) & (ec >= 0) & (er < closed.shape[0]) & \
        (ec < closed.shape[1])
    return {(int(r), int(c)) for r, c in zip(er[on], ec[on]) if closed[r, c]}


def _different_runner_up(marks: BoolArray, closed: BoolArray,
                         ranked: list[tuple[tuple[int, int, int, int], Pose]], look: int = 200
                         ) -> tuple[int, Pose | None]:
    """The best pose after the first that rests on other EM squares than the first's hits.

    Why: a mark shifted or turned so that it still covers most of itself keeps all but one
    hit - the same EM feature read in a worse pose, beaten by the first's extra hit and the
    miss of its own (metal in the LM on open film in the EM). It is no different answer;
    one that shares fewer than half of the first's hits is.
    """
    first = _hits(marks, closed, ranked[0][1])
    for counts, pose in ranked[1:look]:
        if 2 * len(first & _hits(marks, closed, pose)) < len(first):
            return counts[3], pose
    return 0, None
